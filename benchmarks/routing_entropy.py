"""Clients' routing entropy per MoE layer at a run's last round (docs/results.md, the premise section).

Usage: .venv/bin/python benchmarks/routing_entropy.py RUN_DIR [RUN_DIR ...]
Example: .venv/bin/python benchmarks/routing_entropy.py benchmarks/results/specialised/premise/btx/fedavg-alpha0.1-seed0 \
    benchmarks/results/specialised/premise/btx-balance0/fedavg-alpha0.1-seed0
"""

import sys
from pathlib import Path

import numpy as np

from fedalign_moe.runlog import read_jsonl

for arg in sys.argv[1:]:
    last = [r for r in read_jsonl(Path(arg) / "routing.jsonl") if r.get("clients")][-1]
    p_CLE = np.array([last["clients"][c] for c in sorted(last["clients"])])
    entropy_L = -(p_CLE * np.log(np.clip(p_CLE, 1e-12, 1))).sum(-1).mean(0)
    print(f"{arg}: mean client routing entropy per layer {np.round(entropy_L, 3).tolist()} nats "
          f"(of ln {p_CLE.shape[-1]} = {np.log(p_CLE.shape[-1]):.3f}); experts above 5% mean share "
          f"{(p_CLE.mean(0) > 0.05).sum(-1).tolist()}")
