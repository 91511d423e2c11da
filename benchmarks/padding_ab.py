"""Batches padded to data.max_length against batches cut to their own longest text (train.padding): the
seconds of one local epoch over the first clients' training data, from the same initial model, and whether
the trained parameters and the loss come out the same.

Setups: `bench` (MiniLM, 48 tokens; the frozen prefix cached, so only the MoE layer and above run per step),
and the `gpu` preset's model at its own 256 tokens on this CPU (SmolLM2 upcycled; 48 questions of client 0,
batch 8, bfloat16 base). Two torch threads. Writes benchmarks/results/llm_memory/padding_cpu.json.

Usage: .venv/bin/python benchmarks/padding_ab.py
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from common import write_result
from fedalign_moe.config import load_config
from fedalign_moe.training.local import ClientTensors, load_state, train_local, trainable_state
from fedalign_moe.training.setup import open_workspace

ROOT = Path(__file__).resolve().parents[1]
SETUPS = {
    "bench": ("bench", {}, 3),
    "gpu model, 256 tokens": ("gpu", {"model": {"device": "cpu"}, "data": {"max_train": 250, "max_test": 100},
                                      "train": {"batch_size": 8}}, 1),
}


def epoch(preset: str, overrides: dict, clients: int, padding: str) -> dict:
    over = {**overrides, "train": {**overrides.get("train", {}), "padding": padding}, "out_dir": "runs/padding-ab"}
    cfg = load_config(preset, overrides=over)
    ws = open_workspace(cfg)
    data = ClientTensors.concat([ws.client(p)[0] for p in range(clients)])
    if preset == "gpu":
        idx = torch.arange(min(48, len(data)))
        data = ClientTensors(data.input_ids_NS[idx], data.attention_mask_NS[idx], data.labels_N[idx], trim=data.trim)
    start = trainable_state(ws.built.model, ws.built.trainable)
    load_state(ws.built.model, start)
    t0 = time.perf_counter()
    res = train_local(ws.built.model, ws.built.adapter, data, ws.built.trainable, cfg.train, seed=1, device=ws.device)
    seconds = time.perf_counter() - t0
    state = trainable_state(ws.built.model, ws.built.trainable)
    return {"padding": padding, "examples": len(data), "steps": res.steps, "real_tokens": res.tokens,
            "padded_tokens": int(data.input_ids_NS.numel()), "seconds": round(seconds, 2), "loss": res.loss,
            "checksum": sum(float(v.double().sum()) for v in state.values())}


def main() -> None:
    torch.set_num_threads(2)
    rows = []
    for name, (preset, overrides, clients) in SETUPS.items():
        pair = [epoch(preset, overrides, clients, padding) for padding in ("max_length", "longest")]
        row = {"setup": name, "runs": pair, "speedup": round(pair[0]["seconds"] / pair[1]["seconds"], 2),
               "same_loss": pair[0]["loss"] == pair[1]["loss"], "loss_difference": pair[1]["loss"] - pair[0]["loss"]}
        rows.append(row)
        print(f"{name}: {pair[0]['seconds']} s padded to max_length, {pair[1]['seconds']} s cut to the longest "
              f"({row['speedup']}x; {pair[0]['real_tokens']} real of {pair[0]['padded_tokens']} padded tokens); loss "
              f"{pair[0]['loss']:.6f} / {pair[1]['loss']:.6f}")
    dest = ROOT / "benchmarks" / "results" / "llm_memory"
    dest.mkdir(parents=True, exist_ok=True)
    write_result(dest / "padding_cpu.json", rows)


if __name__ == "__main__":
    main()
