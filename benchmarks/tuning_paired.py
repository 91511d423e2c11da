"""Each tuning setup against a reference setup, paired by seed (issue 9, docs/results.md "Expert weights").

`benchmarks/tuning.sh` writes one comparison folder per setup (fedavg, fedalign, fedalign-examples, ...).
Several setups run the same strategy, so `fedalign-moe report` cannot pair them inside one folder; this
script names each run by its setup folder and prints the same tables the evidence report prints: mean ±
std per setup, then setup − reference per seed with a 95% paired-t interval (`report.paired`).

Usage: .venv/bin/python benchmarks/tuning_paired.py benchmarks/results/tuning-specialised [--reference fedavg]
"""

import argparse
from pathlib import Path

from fedalign_moe.report.evidence import collect_summaries, complete_runs
from fedalign_moe.report.paired import METRICS, _points, paired_difference, paired_rows, paired_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the tuning folder: one comparison folder per setup")
    parser.add_argument("--reference", default="fedavg", help="the setup every other one is paired with")
    args = parser.parse_args()
    runs = []
    for setup in sorted(p for p in args.folder.iterdir() if p.is_dir()):
        runs += [dict(s, strategy=setup.name) for s in complete_runs(collect_summaries(setup))]
    if not any(r["strategy"] == args.reference for r in runs):
        raise SystemExit(f"error: no finished run of the reference setup {args.reference!r} in {args.folder}")
    print("| setup | seeds | " + " | ".join(name for _, name in METRICS) + " |")
    print("|---|---|" + "---|" * len(METRICS))
    for name in sorted({r["strategy"] for r in runs}):
        mine = [r for r in runs if r["strategy"] == name]
        cells = []
        for key, _ in METRICS:
            xs = [r[key] for r in mine if r.get(key) is not None]
            mean = sum(xs) / len(xs)
            if len(xs) < 2:
                cells.append(f"{mean:.3f}")
                continue
            sd = (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5
            cells.append(f"{mean:.3f} ± {sd:.3f}")
        seeds = "/".join(str(r["seed"]) for r in sorted(mine, key=lambda r: r["seed"]))
        print(f"| {name} | {seeds} | " + " | ".join(cells) + " |")
    print("\nglobal accuracy, mean of rounds 1-10, per seed: " + "; ".join(
        f"{name} " + " / ".join(f"{sum(r['accuracy_per_round'][:10]) / 10:.3f}"
                                for r in sorted(runs, key=lambda r: r["seed"]) if r["strategy"] == name)
        for name in sorted({r["strategy"] for r in runs})))
    early = {name: {r["seed"]: sum(r["accuracy_per_round"][:10]) / 10 for r in runs if r["strategy"] == name}
             for name in {r["strategy"] for r in runs}}
    print("global accuracy, mean of rounds 1-10, paired with the reference: " + "; ".join(
        f"{name} {_points(paired_difference(early[name], early[args.reference]))}"
        for name in sorted(early) if name != args.reference))
    print()
    rows = paired_rows(runs, reference=args.reference)
    print(paired_table(rows, reference=args.reference), end="")
    print("\nper seed, global final (points): " + "; ".join(
        f"{r['strategy']} " + " / ".join(f"{100 * d:+.1f}" for d in r["final_accuracy"].per_seed.values())
        for r in rows if r["final_accuracy"] is not None))


if __name__ == "__main__":
    main()
