"""What one hostile client (or a colluding pair) costs each strategy, paired by seed with the same run
without an attacker (issue 33, docs/robustness.md "Measured under attack").

Each cell is one `fedalign-moe run` on the `bench` preset (alpha 0.1, 10 clients, 25 rounds) with an
`attack` section (`federation/attacks.py`): sign-flip, scale (9x: just inside the 10x norm rule), inflate
(100x the examples, steps consistent; the screen checks counts by default, so the reply is dropped every
round), capture (FedAlign-MoE statistics on expert 0 that pass every consistency rule), and a colluding pair
of sign-flippers or capturers. The hostile client is the seed's largest partition (the two largest for
a pair: read from the `none` run's partition.json), the worst case for an example-weighted average (a
client of 14 examples in 2,000, partition 0 at seed 0, moves nothing whatever it sends). Setups: FedAvg,
FedAlign-MoE, FedAlign-MoE with `fedalign.router_share_factor = 3` (bounded) or `fedalign.expert_trim = 0.3`
(trim; both chosen a priori, not tuned), Flower's FedMedian, and FedAvg and FedAlign-MoE behind the server's
norm clip (clip: `federation.clip_update_norm_ratio = 3` scales an update whose norm per square root of its
steps is over 3x the round's median down to it; 3 is above the largest honest ratio of any stored run, 2.41x,
`benchmarks/honest_spread.py`; the clip acts on an update's size, so it runs against the scale attack). A finished cell
(summary.json present) is not run again, so an interrupted grid resumes.

Usage: .venv/bin/python benchmarks/attacks.py [--seeds 0,1,2] [--out benchmarks/results/attacks] [--report-only]
Writes OUT/attacks.md and OUT/attacks.json: final and last-5 global accuracy per cell, and attack - none per
seed with a 95% paired-t interval (``report.paired``).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import write_result
from fedalign_moe.files import write_atomic
from fedalign_moe.report.paired import format_difference, paired_difference
from fedalign_moe.report.tables import mean_std
from fedalign_moe.runlog import read_jsonl, read_summary

ATTACKS = {  # (the --set options, how many hostile clients)
    "none": ([], 0),
    "sign-flip": (["attack.kind=sign-flip"], 1),
    "scale-9x": (["attack.kind=scale", "attack.factor=9"], 1),
    "inflate-100x": (["attack.kind=inflate", "attack.factor=100"], 1),
    "capture": (["attack.kind=capture"], 1),
    "pair-sign-flip": (["attack.kind=sign-flip"], 2),
    "pair-capture": (["attack.kind=capture"], 2),
}
SETUPS = {
    "fedavg": ["federation.strategy=fedavg"],
    "fedalign": ["federation.strategy=fedalign"],
    "fedalign-bounded": ["federation.strategy=fedalign", "fedalign.router_share_factor=3"],
    "fedalign-trim": ["federation.strategy=fedalign", "fedalign.expert_trim=0.3"],
    "fedmedian": ["federation.strategy=fedmedian"],
    "fedavg-clip": ["federation.strategy=fedavg", "federation.clip_update_norm_ratio=3"],
    "fedalign-clip": ["federation.strategy=fedalign", "federation.clip_update_norm_ratio=3"],
}
# in the order they run; statistics travel with FedAlign-MoE only, the bound on router shares acts on them only
UPDATE_ATTACKS = ("none", "sign-flip", "scale-9x", "pair-sign-flip")
# inflate-100x: the reply is dropped every round (the count check), so the cell is the setup without its largest
# client: the floor under any attack by that client (docs/robustness.md)
SETUP_ATTACKS = {"fedavg": (*UPDATE_ATTACKS, "inflate-100x"), "fedalign": (*UPDATE_ATTACKS, "capture", "inflate-100x"),
                 "fedmedian": (*UPDATE_ATTACKS, "inflate-100x"), "fedalign-trim": (*UPDATE_ATTACKS, "inflate-100x"),
                 "fedalign-bounded": ("none", "capture"), "fedavg-clip": ("none", "scale-9x"),
                 "fedalign-clip": ("none", "scale-9x")}


# each setup against its base (the same strategy without the rule), and every setup over its base's floor
BASES = {"fedavg": "fedavg", "fedalign": "fedalign", "fedmedian": "fedmedian", "fedalign-trim": "fedalign",
         "fedalign-bounded": "fedalign", "fedavg-clip": "fedavg", "fedalign-clip": "fedalign"}


def cells(seeds: list[int]) -> list[tuple[str, str, int]]:
    return [(setup, attack, seed) for seed in seeds for setup in SETUP_ATTACKS for attack in SETUP_ATTACKS[setup]]


def largest_partitions(out: Path, seed: int, k: int) -> list[int]:
    """The k largest partitions of the seed, from a finished `none` run of any setup."""
    for folder in sorted(out.glob(f"*-none-seed{seed}")):
        if (folder / "partition.json").exists():
            sizes = [sum(row) for row in json.loads((folder / "partition.json").read_text())["counts"]]
            return sorted(range(len(sizes)), key=lambda p: -sizes[p])[:k]
    raise SystemExit(f"error: no finished none run of seed {seed} in {out} to read the partition sizes from")


def run_cell(out: Path, setup: str, attack: str, seed: int) -> Path:
    folder = out / f"{setup}-{attack}-seed{seed}"
    if read_summary(folder / "summary.json") is None:
        sets, hostile = ATTACKS[attack]
        if hostile:
            sets = [*sets, f"attack.clients={json.dumps(largest_partitions(out, seed, hostile))}"]
        sets = [f"seed={seed}", *SETUPS[setup], *sets]
        cmd = [sys.executable, "-m", "fedalign_moe", "run", "--preset", "bench", "--out", str(folder),
               *[a for s in sets for a in ("--set", s)]]
        print(f"running {folder.name}", flush=True)
        subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)
    return folder


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def hostile_figures(folder: Path, rounds: list[dict], watched: list[int]) -> dict:
    """What the server made of the ``watched`` partitions (the hostile ones, or in a `none` cell the ones an
    attack of the seed makes hostile): their mean share of FedAlign-MoE's router rows (omega) and of its
    aligned sets A(e) over every (round, layer, expert), from diagnostics.jsonl; how often the screen dropped
    them, and in how many client-rounds the norm clip scaled them and the honest clients (and by how much
    on average), from metrics.jsonl. The run folders' diagnostics stay out of git: these figures are what
    the docs cite from them."""
    out = {"watched": watched, "watched_dropped": sum(f.get("partition_id") in watched for r in rounds
                                                      for f in r.get("failure_reasons", []))}
    rows = [c for r in rounds for c in r.get("clients", [])]
    out["watched_scaled_rounds"] = sum("update_scaled_by" in c for c in rows if c["partition_id"] in watched)
    out["watched_scaled_by"] = _mean([c["update_scaled_by"] for c in rows if c["partition_id"] in watched and "update_scaled_by" in c])
    out["honest_scaled_rounds"] = sum("update_scaled_by" in c for c in rows if c["partition_id"] not in watched)
    omega, aligned = [], []
    for d in read_jsonl(folder / "diagnostics.jsonl"):
        where = {pid: i for i, pid in enumerate(d.get("clients", []))}
        for pid in (p for p in watched if p in where):
            omega += [row[where[pid]][e] for row in d.get("omega", []) for e in range(len(row[where[pid]]))]
            aligned += [pid in members for layer in d.get("aligned", []) for members in layer]
    out["watched_router_weight"] = _mean(omega)
    out["watched_aligned_share"] = _mean([float(a) for a in aligned])
    return out


def figures(folder: Path, watched: list[int] | None = None) -> dict | None:
    summary = read_summary(folder / "summary.json")
    if summary is None:
        return None
    rounds = [r for r in read_jsonl(folder / "metrics.jsonl") if "accuracy" in r and r.get("round")]
    accs = [r["accuracy"] for r in rounds if r["accuracy"] is not None]
    dropped = sum(r.get("failures", 0) for r in rounds)
    found = {"final": summary.get("final_accuracy"), "last5": sum(accs[-5:]) / len(accs[-5:]) if accs else None,
             "rounds": len(rounds), "dropped_replies": dropped, "stopped_early": summary.get("stopped_early")}
    return found | hostile_figures(folder, rounds, watched) if watched else found


def watched_partitions(out: Path, attack: str, seed: int) -> list[int] | None:
    """The partitions the attack makes hostile at this seed (for `none`: the single attacker's)."""
    try:
        return largest_partitions(out, seed, max(1, ATTACKS[attack][1]))
    except SystemExit:
        return None


FROM_DIAGNOSTICS = ("watched_router_weight", "watched_aligned_share")


def report(out: Path, seeds: list[int]) -> str:
    results = {f"{s}/{a}/{seed}": figures(out / f"{s}-{a}-seed{seed}", watched_partitions(out, a, seed))
               for s, a, seed in cells(seeds)}
    # diagnostics.jsonl stays out of git: a clone keeps the figures the last report read from it
    before = json.loads((out / "attacks.json").read_text()) if (out / "attacks.json").exists() else {}
    for key, found in results.items():
        for name in FROM_DIAGNOSTICS:
            if found and found.get(name) is None and (before.get(key) or {}).get(name) is not None:
                found[name] = before[key][name]
    lines = ["| setup | attack | seeds | final acc | last-5 acc | last 5: attack - none (points) | dropped replies / run |",
             "|---|---|---|---|---|---|---|"]
    for setup in SETUP_ATTACKS:
        none = {seed: results[f"{setup}/none/{seed}"] for seed in seeds if results.get(f"{setup}/none/{seed}")}
        for attack in SETUP_ATTACKS[setup]:
            got = {seed: results.get(f"{setup}/{attack}/{seed}") for seed in seeds}
            got = {k: v for k, v in got.items() if v}
            if not got:
                continue
            diff = None if attack == "none" else paired_difference({k: v["last5"] for k, v in got.items()},
                                                                   {k: v["last5"] for k, v in none.items()})
            lines.append(f"| {setup} | {attack} | {len(got)} | {mean_std([v['final'] for v in got.values()])} | "
                         f"{mean_std([v['last5'] for v in got.values()])} | {format_difference(diff) if diff else '-'} | "
                         f"{sum(v['dropped_replies'] for v in got.values()) / len(got):.0f} |")
    lines += ["", "| setup | attack | last 5: setup - its base under the same attack (points) | last 5: attack - the base's floor, "
              "its largest client absent (points) |", "|---|---|---|---|"]
    for setup, base in BASES.items():
        for attack in SETUP_ATTACKS[setup]:
            if attack in ("none", "inflate-100x"):
                continue
            last5 = {key: {seed: results[f"{key}/{seed}"]["last5"] for seed in seeds if results.get(f"{key}/{seed}")}
                     for key in (f"{setup}/{attack}", f"{base}/{attack}", f"{base}/inflate-100x")}
            if not last5[f"{setup}/{attack}"]:
                continue
            against = None if setup == base else paired_difference(last5[f"{setup}/{attack}"], last5[f"{base}/{attack}"])
            floor = paired_difference(last5[f"{setup}/{attack}"], last5[f"{base}/inflate-100x"])
            lines.append(f"| {setup} | {attack} | {format_difference(against) if against else '-'} | "
                         f"{format_difference(floor) if floor else '-'} |")
    table = "\n".join(lines)
    write_atomic(out / "attacks.md", table + "\n")
    write_result(out / "attacks.json", results)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/attacks"))
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--setups", default=",".join(SETUPS), help="which setups to run (all are reported)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.report_only:
        for setup, attack, seed in cells(seeds):
            if setup in args.setups.split(","):
                run_cell(args.out, setup, attack, seed)
    print(report(args.out, seeds))


if __name__ == "__main__":
    main()
