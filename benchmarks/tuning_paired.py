"""Each tuning setup against a reference setup, paired by seed (issue 9, docs/results.md "Expert weights").

`benchmarks/tuning.sh` writes one comparison folder per setup (fedavg, fedalign, fedalign-examples, ...).
Several setups run the same strategy, so `fedalign-moe report` cannot pair them inside one folder; this
script names each run by its setup folder and prints the same tables the evidence report prints: mean ±
std per setup, then setup − reference per seed with a 95% paired-t interval (`report.paired`).

Given one comparison folder instead (its runs directly inside, as `compare` writes them), its strategies at
``--alpha`` are the setups: FedProx against FedAlign-MoE on the test-split grid, with the rounds-1-10 means.

``--also FOLDER`` (repeatable) adds the runs of another comparison folder at ``--alpha`` as a setup named
after that folder: a setting run apart from the grid (issue 33: FedAlign-MoE with
``fedalign.router_share_factor = 3`` on the test split, paired with the grid's FedAlign-MoE seeds).

Usage: .venv/bin/python benchmarks/tuning_paired.py benchmarks/results/tuning-specialised [--reference fedavg]
       .venv/bin/python benchmarks/tuning_paired.py benchmarks/results/specialised --reference fedalign [--alpha 0.1]
           [--also benchmarks/results/robust-specialised/fedalign-bounded]
"""

import argparse
from pathlib import Path

from fedalign_moe.report.evidence import collect_summaries, complete_runs
from fedalign_moe.report.paired import METRICS, format_difference, paired_difference, paired_rows, paired_table
from fedalign_moe.report.tables import mean_std


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the tuning folder: one comparison folder per setup")
    parser.add_argument("--reference", default="fedavg", help="the setup every other one is paired with")
    parser.add_argument("--alpha", type=float, default=0.1, help="a comparison folder's alpha to pair at")
    parser.add_argument("--also", type=Path, action="append", default=[],
                        help="another comparison folder whose runs join as a setup named after it")
    args = parser.parse_args()
    if not args.folder.is_dir():
        raise SystemExit(f"error: {args.folder} is not a folder")
    direct = complete_runs(collect_summaries(args.folder))
    runs = [r for r in direct if r["alpha"] == args.alpha]
    if direct and not runs:
        alphas = ", ".join(f"{a:g}" for a in sorted({r["alpha"] for r in direct}))
        raise SystemExit(f"error: no finished run at alpha {args.alpha:g} in {args.folder} (its alphas: {alphas})")
    if not direct:  # a tuning folder: one comparison folder per setup, named after it
        for setup in sorted(p for p in args.folder.iterdir() if p.is_dir()):
            runs += [dict(s, strategy=setup.name) for s in complete_runs(collect_summaries(setup))]
    for folder in args.also:
        extra = [dict(r, strategy=folder.name) for r in complete_runs(collect_summaries(folder)) if r["alpha"] == args.alpha]
        if not extra:
            raise SystemExit(f"error: no finished run at alpha {args.alpha:g} in {folder}")
        runs += extra
    if not any(r["strategy"] == args.reference for r in runs):
        raise SystemExit(f"error: no finished run of the reference setup {args.reference!r} in {args.folder}")
    print("| setup | seeds | " + " | ".join(name for _, name in METRICS) + " |")
    print("|---|---|" + "---|" * len(METRICS))
    names = sorted({r["strategy"] for r in runs})
    for name in names:
        mine = sorted((r for r in runs if r["strategy"] == name), key=lambda r: r["seed"])
        seeds = "/".join(str(r["seed"]) for r in mine)
        print(f"| {name} | {seeds} | " + " | ".join(mean_std([r.get(key) for r in mine]) for key, _ in METRICS) + " |")
    early = {name: {r["seed"]: sum(r["accuracy_per_round"][:10]) / 10 for r in runs if r["strategy"] == name}
             for name in names}
    print("\nglobal accuracy, mean of rounds 1-10, per seed: " + "; ".join(
        f"{name} " + " / ".join(f"{early[name][seed]:.3f}" for seed in sorted(early[name])) for name in names))
    print("global accuracy, mean of rounds 1-10, paired with the reference: " + "; ".join(
        f"{name} {format_difference(paired_difference(early[name], early[args.reference]))}"
        for name in names if name != args.reference))
    print()
    rows = paired_rows(runs, reference=args.reference)
    print(paired_table(rows, reference=args.reference), end="")
    for key, label in (("final_accuracy", "global final"), ("last5_accuracy", "global last 5")):
        print(f"\nper seed, {label} (points): " + "; ".join(
            f"{r['strategy']} " + " / ".join(f"{100 * d:+.1f}" for d in r[key].per_seed.values())
            for r in rows if r[key] is not None))


if __name__ == "__main__":
    main()
