"""Aligned-set figures of FedAlign-MoE runs (docs/results.md, "LoRA experts, aligned per expert").

Per round of each run: the mean share of clients merged per expert, how many experts merged every client,
the smallest aligned set; and, for two runs given, how many round-1 aligned sets agree and by how many
clients they differ on average (in round 1 both runs received identical replies, so only the aggregation
rule differs).
Usage: .venv/bin/python benchmarks/aligned_sets.py RUN_DIR [RUN_DIR]
Example: .venv/bin/python benchmarks/aligned_sets.py benchmarks/results/lora-direction/{product,factors}/fedalign-alpha0.1-seed0
"""

import sys
from pathlib import Path

from fedalign_moe.runlog import read_jsonl  # diagnostics.jsonl, or the .gz copy stored results keep


def rounds(run: Path) -> list[dict]:
    return read_jsonl(run / "diagnostics.jsonl")


def main() -> None:
    runs = [Path(a) for a in sys.argv[1:]]
    for run in runs:
        print(run)
        for r in rounds(run):
            C, sizes = len(r["clients"]), [len(s) for layer in r["aligned"] for s in layer]
            print(f"  round {r['round']}: merged share {sum(sizes) / len(sizes) / C:.3f}, experts merging all "
                  f"{sum(s == C for s in sizes)} of {len(sizes)}, smallest set {min(sizes)}")
    if len(runs) == 2:
        a, b = (rounds(run)[0]["aligned"] for run in runs)
        pairs = [(set(x), set(y)) for la, lb in zip(a, b) for x, y in zip(la, lb)]
        print(f"round 1: {sum(x == y for x, y in pairs)} of {len(pairs)} aligned sets identical, "
              f"{sum(len(x ^ y) for x, y in pairs) / len(pairs):.2f} clients differ per expert on average")


if __name__ == "__main__":
    main()
