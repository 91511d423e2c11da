"""What a bfloat16 wire costs FedAlign-MoE on `specialised` (alpha 0.1): each seed's run with
``federation.wire_dtype = "bfloat16"`` (benchmarks/results/wire-bfloat16) against the stored float32 run of
the same seed (benchmarks/results/specialised, reproduced by today's code: rounds 1-3 of seed 0 give
0.5245, 0.5840, 0.5505 again), as paired differences over seeds (report/paired.py), and the bytes.

The bfloat16 runs: fedalign-moe compare --preset specialised --strategies fedalign --alphas 0.1 --seeds 0,1,2
  --set federation.wire_dtype=bfloat16 --out benchmarks/results/wire-bfloat16
Writes benchmarks/results/wire-bfloat16/paired.json and prints a markdown table.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedalign_moe.report.paired import METRICS, format_difference, paired_difference

ROOT = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def summaries(folder: Path) -> dict[int, dict]:
    return {json.loads(p.read_text())["seed"]: json.loads(p.read_text())
            for p in sorted(folder.glob("fedalign-alpha0.1-seed*/summary.json"))}


def _mean(values: dict[int, float]) -> float:
    return sum(values.values()) / len(values)


def main() -> None:
    narrow, wide = summaries(ROOT / "wire-bfloat16"), summaries(ROOT / "specialised")
    seeds = sorted(set(narrow) & set(wide))
    rows = {}
    print(f"| metric (seeds {', '.join(map(str, seeds))}) | float32 | bfloat16 | bfloat16 - float32 (points, 95% paired) |")
    print("|---|---|---|---|")
    for key, label in METRICS:
        a = {s: wide[s][key] for s in seeds}
        b = {s: narrow[s][key] for s in seeds}
        diff = paired_difference(b, a)
        rows[key] = {"float32": a, "bfloat16": b, "mean_difference": diff.mean if diff else None,
                     "half_width": diff.half_width if diff else None}
        print(f"| {label} | {_mean(a):.4f} | {_mean(b):.4f} | {format_difference(diff)} |")
    up = {s: (wide[s]["uplink_bytes_total"], narrow[s]["uplink_bytes_total"]) for s in seeds}
    print(f"\nuplink over 25 rounds, seed {seeds[0]}: {up[seeds[0]][0] / 1e9:.2f} GB float32, {up[seeds[0]][1] / 1e9:.2f} GB bfloat16")
    (ROOT / "wire-bfloat16" / "paired.json").write_text(json.dumps({"seeds": seeds, "metrics": rows, "uplink_bytes": up},
                                                                   indent=1) + "\n")


if __name__ == "__main__":
    main()
