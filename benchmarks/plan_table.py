"""What fits where, from the memory plan: the published MoE LLMs on this 24 GB CPU machine and on one H100.

For each architecture of `make_llm_checkpoint.py` (its config.json and tokenizer only, no weights: the plan
builds the model on the meta device), and each setting below, the plan of a FedAlign-MoE run with 10
clients: parameters, per-worker memory, how many workers fit, and the whole run's need. Writes
benchmarks/results/llm_memory/plan_table.json and prints a markdown table.

Usage: .venv/bin/python benchmarks/plan_table.py [--folders /work/ckpt]   (folders named cfg-ARCH, as
`make_llm_checkpoint.py ARCH DIR/cfg-ARCH --config-only` writes them)
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from common import markdown_table, write_result
from fedalign_moe.config import load_config
from fedalign_moe.models.build import FOUR_BIT_BYTES, agree_with_checkpoint
from fedalign_moe.training.plan import make_plan, plan_model

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("olmoe-1b-7b", "qwen1.5-moe-a2.7b", "deepseek-moe-16b", "mixtral-8x7b")
# name -> (device, free bytes, CPU cores: the workers are also bounded by cores / client_cpus)
MACHINES = {"this CPU (24 GB)": ("cpu", 23.5e9, 2), "one H100 (80 GB)": ("cuda", 79e9, 16)}
SETTINGS = {  # name -> overrides on top of the common ones
    "bf16 LoRA r8, checkpointing, batch 8 x 256": {"train": {"gradient_checkpointing": True}},
    "bf16 LoRA r8, batch 8 x 256": {},
    "4-bit linears (QLoRA) r8, checkpointing, batch 8 x 256": {"train": {"gradient_checkpointing": True},
                                                               "model": {"quantize": "4bit"}},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folders", default="/work/ckpt")
    args = ap.parse_args()
    logging.getLogger("fedalign_moe").setLevel(logging.ERROR)  # the checkpoint's expert count is the one used
    rows = []
    for arch in ARCHS:
        for machine, (device, free, cores) in MACHINES.items():
            for setting, extra in SETTINGS.items():
                over = {"model": {"backbone": f"{args.folders}/cfg-{arch}", "trainable": "lora", "dtype": "bfloat16",
                                  "device": device, **extra.get("model", {})},
                        "train": {"batch_size": 8, "torch_threads": None, **extra.get("train", {})},
                        "data": {"max_length": 256}, "partition": {"num_clients": 10},
                        "federation": {"strategy": "fedalign", "client_cpus": (os.cpu_count() or 1) / cores}}
                cfg = agree_with_checkpoint(load_config("tiny", overrides=over))
                plan = make_plan(cfg, plan_model(cfg), available=(int(free), 1))
                rows.append({"architecture": arch, "machine": machine, "setting": setting,
                             "parameters": plan.facts.parameters, "active_parameters": plan.facts.active_parameters,
                             "trainable_parameters": plan.facts.trainable_parameters,
                             "peak_bytes": plan.worker.peak_bytes, "base_bytes": plan.worker.base_bytes,
                             "activation_bytes": plan.worker.activation_bytes, "workers": plan.workers,
                             "total_bytes": plan.total_bytes, "fits": plan.fits})
    dest = ROOT / "benchmarks" / "results" / "llm_memory"
    dest.mkdir(parents=True, exist_ok=True)
    write_result(dest / "plan_table.json", rows)
    print(markdown_table(
        ["model", "parameters (active per token)", "machine", "setting", "base", "per worker (`peak_bytes`)", "workers", "fits"],
        [[r["architecture"], f"{r['parameters'] / 1e9:.1f}B ({r['active_parameters'] / 1e9:.1f}B)", r["machine"], r["setting"],
          f"{r['base_bytes'] / 1e9:.1f} GB", f"{r['peak_bytes'] / 1e9:.1f} GB", str(r["workers"]), "yes" if r["fits"] else "no"]
         for r in rows]))
    # the share of the frozen weights a 4-bit load holds in 4 bits: each one saves 2 - FOUR_BIT_BYTES bytes
    bases = {(r["architecture"], r["setting"].split(" ")[0]): r["base_bytes"] for r in rows if r["machine"] == next(iter(MACHINES))}
    for arch in ARCHS:
        bf16, four = bases[(arch, "bf16")], bases[(arch, "4-bit")]
        print(f"{arch}: linear layers in 4 bits: {(bf16 - four) / (2 - FOUR_BIT_BYTES) / (bf16 / 2):.1%} of the frozen weights, "
              f"base {bf16 / 1e9:.1f} -> {four / 1e9:.1f} GB")

if __name__ == "__main__":
    main()
