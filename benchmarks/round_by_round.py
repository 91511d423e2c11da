"""Round by round, strategy A against strategy B on the same seed: in how many rounds A's global accuracy is
below B's, each run's range over the rounds and both runs' round-2 accuracy (issue 9's comparison on `specialised`, docs/results.md).

Usage: .venv/bin/python benchmarks/round_by_round.py benchmarks/results/specialised [--a fedalign] [--b fedavg]
       [--alpha 0.1]
"""

import argparse
import json
from pathlib import Path


def accuracy_per_round(run: Path) -> list[float] | None:
    try:
        return json.loads((run / "summary.json").read_text())["accuracy_per_round"]
    except (OSError, ValueError, KeyError):
        return None  # not finished


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--a", default="fedalign")
    parser.add_argument("--b", default="fedavg")
    parser.add_argument("--alpha", default="0.1")
    args = parser.parse_args()
    seeds = sorted(int(p.name.rsplit("seed", 1)[1]) for p in args.folder.glob(f"{args.a}-alpha{args.alpha}-seed*"))
    print(f"seed | rounds {args.a} < {args.b} | {args.a} range | {args.b} range | round 2, {args.a} / {args.b}")
    for seed in seeds:
        a, b = (accuracy_per_round(args.folder / f"{s}-alpha{args.alpha}-seed{seed}") for s in (args.a, args.b))
        if a is None or b is None:
            continue
        below = sum(x < y for x, y in zip(a, b))
        print(f"{seed} | {below} of {len(a)} | {min(a):.2f}-{max(a):.2f} | {min(b):.2f}-{max(b):.2f} | "
              f"{a[1]:.3f} / {b[1]:.3f}")


if __name__ == "__main__":
    main()
