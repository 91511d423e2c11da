"""How far honest updates spread within a round: the largest client's update norm over the round's
median, raw and per local step (the server's outlier rule uses the latter; docs/robustness.md); and how
far clients move at all: the round's median update norm, averaged over rounds (issue 9: FedProx's anchor).

    .venv/bin/python benchmarks/update_norms.py runs/quick runs/bench-fedalign-a01
"""

import json
import math
import statistics
import sys
from pathlib import Path

from fedalign_moe.runlog import read_jsonl  # metrics.jsonl, or the .gz copy stored results keep


def spread(run: Path) -> dict:
    cfg = json.loads((run / "config.json").read_text())
    t = cfg["train"]
    raw, pace, median = [], [], []
    for record in read_jsonl(run / "metrics.jsonl"):
        rows = [c for c in record["clients"] if "update_norm" in c]
        if len(rows) < 3:
            continue
        steps = [t["local_steps"] or t["local_epochs"] * math.ceil(c["num_examples"] / t["batch_size"]) for c in rows]
        norms = [c["update_norm"] for c in rows]
        per_step = [n / s for n, s in zip(norms, steps)]
        median.append(statistics.median(norms))
        raw.append(max(norms) / median[-1])
        pace.append(max(per_step) / statistics.median(per_step))
    return {"run": str(run), "strategy": cfg["federation"]["strategy"], "alpha": cfg["partition"]["alpha"],
            "rounds": len(raw), "raw_max_over_median": [round(min(raw), 2), round(max(raw), 2)],
            "per_step_max_over_median": [round(min(pace), 2), round(max(pace), 2)],
            "median_norm_mean": round(statistics.mean(median), 2)}


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(json.dumps(spread(Path(arg))))
