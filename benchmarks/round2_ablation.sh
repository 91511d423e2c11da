#!/usr/bin/env bash
# Where FedAlign-MoE's round-2 dip on `specialised` comes from (docs/fedalign.md#expert-weights): the four
# ablation rungs and FedAvg for two rounds on the VALIDATION split (seed 0, alpha 0.1), then `fedalign` with
# `fedalign.expert_weights=examples`. One Ray worker (client_cpus=2) keeps the memory low enough to run beside
# a grid stream. About 3 min a run alone on the 2-core CPU.
# Usage: benchmarks/round2_ablation.sh [out_dir]      default: benchmarks/results/round2-ablation
# Its figures were measured with token-weighted expert aggregation, the default before issue 9 made
# `examples` the default: pinned here (fedalign.expert_weights=tokens) so the script reproduces them.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/round2-ablation}"
cli=.venv/bin/fedalign-moe
common=(--preset specialised --alphas 0.1 --seeds 0 --rounds 2 --set data.holdout=validation --set federation.client_cpus=2)
"$cli" compare "${common[@]}" --strategies fedavg,fedalign-uniform,fedalign-consistency,fedalign-adaptive,fedalign \
  --out "$out/rungs" --set fedalign.expert_weights=tokens
"$cli" compare "${common[@]}" --strategies fedalign --set fedalign.expert_weights=examples --out "$out/fedalign-examples"
