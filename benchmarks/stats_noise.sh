#!/usr/bin/env bash
# Accuracy cost of noising FedAlign-MoE's uploaded routing statistics (fedalign.stats_noise_sigma),
# on the `quick` preset (10 clients, Dirichlet 0.1), two seeds per sigma.
# Usage: benchmarks/stats_noise.sh [sigmas] [seeds] [out_dir]
# Its figures were measured with token-weighted expert aggregation, the default before issue 9 made
# `examples` the default: pinned here (fedalign.expert_weights=tokens) so the script reproduces them.
set -euo pipefail
cd "$(dirname "$0")/.."
sigmas="${1:-0,0.5}"
seeds="${2:-0,1}"
out="${3:-benchmarks/results/stats-noise}"
for sigma in ${sigmas//,/ }; do
  .venv/bin/fedalign-moe compare --preset quick --strategies fedalign --alphas 0.1 --seeds "$seeds" \
    --set "fedalign.stats_noise_sigma=$sigma" --set fedalign.expert_weights=tokens --out "$out/sigma$sigma" > "$out-sigma$sigma.log" 2>&1
  echo "sigma=$sigma"; tail -n 2 "$out/sigma$sigma/results.md"
done
