"""What FedAlign-MoE's client side costs per local step (issue 13: goal <= 1.10x a plain step).

On the `bench` preset's model and the first clients' data (one CPU thread, as a simulated client), the
same steps three ways, interleaved over --repeats rounds, from the same initial weights:
  plain     a textbook loop: forward, cross-entropy, backward, AdamW step (no hooks, no statistics)
  fedavg    training.local.train_local as every strategy runs it (routing statistics on)
  fedalign  train_local with FedAlign-MoE's gate regulariser (ClientAligner, lambda 0.1)
Prints the median seconds per step of each and the ratios; writes benchmarks/results/step_overhead/<host>.json.

Usage: .venv/bin/python benchmarks/step_overhead.py [--preset bench] [--clients 3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import write_result
from fedalign_moe.config import load_config
from fedalign_moe.training.alignment import ClientAligner
from fedalign_moe.training.local import ClientTensors, load_state, train_local, trainable_state
from fedalign_moe.training.setup import open_workspace

ROOT = Path(__file__).resolve().parents[1]


def plain_steps(model, data, names, cfg, seed: int) -> int:
    """The reference: the same batches (same generator draws as train_local) without anything else."""
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW([params[n] for n in names], lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    order = torch.randperm(len(data), generator=gen)
    model.train()
    steps = 0
    for idx in order.split(cfg.batch_size):
        logits_BC = model(**data.batch(idx, torch.device("cpu")))
        loss = F.cross_entropy(logits_BC.float(), data.labels_N[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    return steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cfg = load_config(args.preset)
    torch.set_num_threads(1)
    ws = open_workspace(cfg)
    built, L = ws.built, len(ws.built.layout.layers)
    E = built.layout.num_experts
    data = ClientTensors.concat([ws.client(p)[0] for p in range(args.clients)])
    start = trainable_state(built.model, built.trainable)
    per_step = {"plain": [], "fedavg": [], "fedalign": []}
    for _ in range(args.repeats):
        for kind in per_step:
            load_state(built.model, start)
            t0 = time.perf_counter()
            if kind == "plain":
                steps = plain_steps(built.model, data, built.trainable, cfg.train, seed=1)
            else:
                aligner = None if kind == "fedavg" else ClientAligner(built.adapter, torch.full((L, E), 1.0 / E),
                                                                       torch.ones(L, E), 0.1)
                steps = train_local(built.model, built.adapter, data, built.trainable, cfg.train, seed=1,
                                    aligner=aligner).steps
            per_step[kind].append((time.perf_counter() - t0) / steps)
    med = {k: statistics.median(v) for k, v in per_step.items()}
    out = {"host": platform.node(), "preset": args.preset, "examples": len(data), "steps": steps,
           "seconds_per_step": per_step, "median": med, "fedavg_over_plain": med["fedavg"] / med["plain"],
           "fedalign_over_plain": med["fedalign"] / med["plain"]}
    print(f"{len(data)} examples, {steps} steps of batch {cfg.train.batch_size}, median of {args.repeats}:")
    for k, v in med.items():
        print(f"  {k:9s} {v:.4f} s/step ({v / med['plain']:.3f}x plain)")
    dest = ROOT / "benchmarks" / "results" / "step_overhead"
    dest.mkdir(parents=True, exist_ok=True)
    write_result(dest / f"{out['host'] or 'host'}.json", out)


if __name__ == "__main__":
    main()
