"""A bfloat16 base against a float32 one, and batches padded to their own longest question against 128
tokens, on the `gpu` preset's model on this CPU: the seconds and the loss of every local training step of
one client's round (client 0, its first 48 questions, batch 8, the preset's trainable experts and
routers, two threads), from the same initial model.

Writes benchmarks/results/llm_memory/precision_cpu.json. Usage: .venv/bin/python benchmarks/precision_ab.py
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from common import write_result
from fedalign_moe.config import load_config
from fedalign_moe.training.local import ClientTensors, train_local
from fedalign_moe.training.setup import open_workspace

ROOT = Path(__file__).resolve().parents[1]


def one_round(dtype: str, padding: str) -> dict:
    cfg = load_config("gpu", overrides={"model": {"device": "cpu", "dtype": dtype},
                                        "data": {"max_length": 128, "max_train": 250, "max_test": 100},
                                        "train": {"batch_size": 8, "padding": padding}, "out_dir": "runs/precision-ab"})
    ws = open_workspace(cfg)
    train, _ = ws.client(0)
    idx = torch.arange(min(48, len(train)))
    data = ClientTensors(train.input_ids_NS[idx], train.attention_mask_NS[idx], train.labels_N[idx])
    seconds, losses = [], []
    last = [time.perf_counter()]

    def on_step(step: int, loss: float) -> None:
        now = time.perf_counter()
        seconds.append(now - last[0])
        losses.append(loss)
        last[0] = now

    res = train_local(ws.built.model, ws.built.adapter, data, ws.built.trainable, cfg.train, seed=0, device=ws.device,
                      on_step=on_step)
    return {"dtype": dtype, "padding": padding, "steps": res.steps, "tokens": res.tokens,
            "seconds_per_step": [round(s, 2) for s in seconds],
            "median_step_seconds": round(statistics.median(seconds[1:] or seconds), 2),
            "loss_per_step": [round(x, 4) for x in losses], "mean_loss": round(res.loss, 4),
            "tokens_per_second": round(res.tokens / sum(seconds), 1)}


def main() -> None:
    torch.set_num_threads(2)
    rows = [one_round(*setting) for setting in (("float32", "max_length"), ("bfloat16", "max_length"),
                                                ("bfloat16", "longest"))]
    dest = ROOT / "benchmarks" / "results" / "llm_memory"
    dest.mkdir(parents=True, exist_ok=True)
    write_result(dest / "precision_cpu.json", rows)
    for r in rows:
        print(f"{r['dtype']}, padding {r['padding']}: {r['steps']} steps, median {r['median_step_seconds']} s a step, "
              f"{r['tokens_per_second']} tokens/s; loss per step {r['loss_per_step']}")


if __name__ == "__main__":
    main()
