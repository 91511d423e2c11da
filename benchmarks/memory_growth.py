"""Resident memory of one client process over rounds of local training (the `bench` preset's model).

Run: .venv/bin/python benchmarks/memory_growth.py [rounds] [clients]
Prints the RSS after each round of `clients` local epochs; with `release_memory()` in `train_local`
it should stay flat. Results: docs/benchmarks.md.
"""

import os
import sys

import torch

from fedalign_moe.config import load_config
from fedalign_moe.training.local import evaluate, load_state, train_local, trainable_state
from fedalign_moe.training.setup import cached_workspace


def rss_gb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def main(rounds: int = 6, clients: int = 5) -> None:
    cfg = load_config("bench", overrides={"train": {"torch_threads": 1}})
    ws = cached_workspace(cfg.to_json())
    torch.set_num_threads(1)
    names = ws.built.trainable
    start = trainable_state(ws.built.model, names)
    print(f"start: {rss_gb():.2f} GB", flush=True)
    for rnd in range(rounds):
        for pid in range(clients):
            load_state(ws.built.model, start)
            train, test = ws.client(pid)
            train_local(ws.built.model, ws.built.adapter, train, names, cfg.train, seed=rnd * 100 + pid, proximal_mu=0.01)
            evaluate(ws.built.model, test, cfg.train.eval_batch_size)
        print(f"round {rnd + 1}: {rss_gb():.2f} GB", flush=True)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
