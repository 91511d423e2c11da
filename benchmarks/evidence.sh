#!/usr/bin/env bash
# The paper-style comparison of docs/results.md on the `bench` preset, 3 seeds:
#   alpha 0.1: local, centralised, FedAvg, FedProx, FedMoE and FedAlign-MoE's ablation ladder;
#   alpha 1.0: local, centralised, FedAvg, FedProx, FedMoE, FedAlign-MoE (the paper has no ladder there).
# Finished cells are kept (compare skips runs whose summary.json has the same config), so the
# script resumes where an interrupted grid stopped. Ends with `fedalign-moe report`, which writes
# results.md, evidence.md and the figures over every finished run.
# Usage: benchmarks/evidence.sh [out_dir] [seeds]      defaults: benchmarks/results/evidence 0,1,2
# About 4 min a run on the 2-core CPU (docs/results.md); 45 runs.
# Its figures were measured with token-weighted expert aggregation, the default before issue 9 made
# `examples` the default: pinned here (fedalign.expert_weights=tokens) so the script reproduces them.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/evidence}"
seeds="${2:-0,1,2}"
cli=.venv/bin/fedalign-moe
for seed in ${seeds//,/ }; do  # one seed at a time: a partial grid still covers every strategy
  "$cli" compare --preset bench --alphas 0.1 --seeds "$seed" --out "$out" \
    --strategies fedavg,fedalign,fedprox,fedmoe,local,centralised,fedalign-uniform,fedalign-consistency,fedalign-adaptive \
    --set fedalign.expert_weights=tokens
done
for seed in ${seeds//,/ }; do
  "$cli" compare --preset bench --alphas 1.0 --seeds "$seed" --out "$out" \
    --strategies fedavg,fedalign,fedprox,fedmoe,local,centralised --set fedalign.expert_weights=tokens
done
"$cli" report "$out"
