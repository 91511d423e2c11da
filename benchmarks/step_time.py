"""Seconds per local training step on the `bench` preset (one CPU thread, as a simulated client uses).

Usage: .venv/bin/python benchmarks/step_time.py [clients] [repeats]
Trains one local epoch over the first `clients` partitions' training data (alpha 0.1, seed 0) from
the same initial model `repeats` times and prints the median seconds per step, plus a checksum of
the trained parameters: equal checksums across code versions mean equal numbers.
"""

import statistics
import sys
import time

import torch

from fedalign_moe.config import load_config
from fedalign_moe.training.local import ClientTensors, load_state, train_local, trainable_state
from fedalign_moe.training.setup import open_workspace

clients = int(sys.argv[1]) if len(sys.argv) > 1 else 3
repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
cfg = load_config("bench")
torch.set_num_threads(1)
ws = open_workspace(cfg)
data = ClientTensors.concat([ws.client(p)[0] for p in range(clients)])
start = trainable_state(ws.built.model, ws.built.trainable)
per_step = []
for _ in range(repeats):
    load_state(ws.built.model, start)
    t0 = time.perf_counter()
    res = train_local(ws.built.model, ws.built.adapter, data, ws.built.trainable, cfg.train, seed=1)
    per_step.append((time.perf_counter() - t0) / res.steps)
state = trainable_state(ws.built.model, ws.built.trainable)
checksum = sum(float(v.double().sum()) for v in state.values())
print(f"{len(data)} examples, {res.steps} steps of batch {cfg.train.batch_size}: "
      f"median {statistics.median(per_step):.3f} s/step over {repeats} repeats (each: {', '.join(f'{s:.3f}' for s in per_step)}); "
      f"loss {res.loss:.6f}; checksum {checksum:.6f}")
