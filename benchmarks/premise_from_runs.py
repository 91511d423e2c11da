"""Add one entry to a premise.json from runs that already exist (or from the built model alone).

`fedalign-moe premise` runs FedAvg and centralised training for each recipe itself. This script covers the
other cases of docs/results.md's premise table: today's `bench` testbed, whose FedAvg and centralised runs
at alpha 0.1 are in benchmarks/results/evidence/ already, and a recipe measured on its built model only
(expert-label information and routing shares, no runs: those columns stay empty).

Usage:
  .venv/bin/python benchmarks/premise_from_runs.py OUT NAME --preset P [--runs DIR] [--seed 0] [--set k=v ...]
Example (the bench row):
  .venv/bin/python benchmarks/premise_from_runs.py benchmarks/results/specialised "upcycle (bench)" \
      --preset bench --runs benchmarks/results/evidence
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fedalign_moe.config import load_config, parse_overrides
from fedalign_moe.report.premise import is_recipe_figures, recipe_figures, write_premise
from fedalign_moe.runlog import read_summary
from fedalign_moe.training.local import routing_by_label
from fedalign_moe.training.setup import open_workspace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("name")
    ap.add_argument("--preset", required=True)
    ap.add_argument("--runs", type=Path, help="a comparison folder holding fedavg-alpha0.1-seedK and centralised-alpha0.1-seedK")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(2)
    overrides = parse_overrides(args.sets)
    overrides["seed"] = args.seed
    overrides.setdefault("partition", {})["alpha"] = 0.1
    cfg = load_config(args.preset, overrides=overrides)
    ws = open_workspace(cfg)
    counts = routing_by_label(ws.built.model, ws.built.adapter, ws.global_test(), len(ws.data.source.label_names),
                              cfg.train.eval_batch_size, ws.device).numpy()
    runs = {}
    for strategy in ("fedavg", "centralised"):
        folder = args.runs / f"{strategy}-alpha0.1-seed{args.seed}" if args.runs else None
        runs[strategy] = (folder, read_summary(folder / "summary.json") if folder else None)
    figures = recipe_figures(counts, ws.data.source.label_names, runs["fedavg"][1], runs["centralised"][1],
                             runs["fedavg"][0] if runs["fedavg"][1] else None, ws.built.build_seconds)
    premise = {k: v for k, v in (read_summary(args.out / "premise.json") or {}).items() if is_recipe_figures(v)}
    premise[args.name] = figures
    print(write_premise(premise, args.out))


if __name__ == "__main__":
    main()
