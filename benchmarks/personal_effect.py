"""What personalised experts bought, paired by seed: FedAlign-MoE with `fedalign.personal_experts` against
without, from two comparison folders (benchmarks/personal_experts.sh writes them).

Per seed: global and client-own accuracy (final round, last-5 mean) of both runs, and the share of
(client, layer, expert) the personalised run's clients kept (outside A(e) in the round before, so from round
2 on); then the paired difference over seeds (report.paired). Writes JSON to --out and prints a table.

Usage: .venv/bin/python benchmarks/personal_effect.py BASE_DIR PERSONAL_DIR --out FILE.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import write_result
from fedalign_moe.report.evidence import applied_layers, collect_summaries, complete_runs, run_dir
from fedalign_moe.report.paired import METRICS, paired_difference
from fedalign_moe.report.tables import split_name
from fedalign_moe.runlog import read_jsonl


def kept_share(run: Path) -> float:
    """Mean over rounds 2..R of the share of (client, layer, expert) outside the previous round's A(e)."""
    diags = read_jsonl(run / "diagnostics.jsonl")[:-1]  # the last round's sets decide no round
    shares = []
    for d in diags:
        clients = d["clients"]
        layers = applied_layers(d)
        outside = sum(c not in a for layer in layers for a in layer for c in clients)
        shares.append(outside / (len(clients) * sum(len(layer) for layer in layers)))
    return sum(shares) / len(shares) if shares else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("personal", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    runs = {name: {s["seed"]: s for s in complete_runs(collect_summaries(d))}
            for name, d in (("base", args.base), ("personal", args.personal))}
    seeds = sorted(set(runs["base"]) & set(runs["personal"]))
    if not seeds:
        raise SystemExit(f"error: no seed finished in both {args.base} and {args.personal}")
    split = split_name([r for name in runs for r in runs[name].values()])
    out = {"seeds": seeds, "split": split, "rounds": runs["base"][seeds[0]]["rounds"], "per_seed": {}, "paired": {}}
    for seed in seeds:
        b, p = runs["base"][seed], runs["personal"][seed]
        out["per_seed"][seed] = {"kept_share": kept_share(run_dir(p)),
                                 **{f"{k}_{name}": r.get(k) for k, _ in METRICS for name, r in (("base", b), ("personal", p))}}
    lines = ["| figure | without | with personal experts | with - without, points |", "|---|---|---|---|"]
    for key, label in METRICS:
        diff = paired_difference({s: runs["personal"][s][key] for s in seeds}, {s: runs["base"][s][key] for s in seeds})
        out["paired"][key] = {"mean": diff.mean, "half_width_95": diff.half_width, "n": diff.n}
        def mean(name: str, key: str = key) -> float:
            return sum(runs[name][s][key] for s in seeds) / len(seeds)
        ci = "" if diff.half_width is None else f" ± {100 * diff.half_width:.1f}"
        lines.append(f"| {label} | {mean('base'):.3f} | {mean('personal'):.3f} | {100 * diff.mean:+.1f}{ci} |")
    share = sum(v["kept_share"] for v in out["per_seed"].values()) / len(seeds)
    lines.append(f"| (client, layer, expert) kept, rounds 2-{out['rounds']} | - | {share:.3f} | - |")
    write_result(args.out, out)
    print(f"seeds {', '.join(map(str, seeds))}; {out['rounds']} rounds; accuracy on the {split} splits\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
