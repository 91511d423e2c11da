#!/usr/bin/env bash
# What personalised experts buy (issue 9, section 4; `fedalign.personal_experts`): FedAlign-MoE with and
# without them on the `specialised` preset (where clients' experts do play different roles), alpha 0.1,
# tuned on VALIDATION splits only (`data.holdout=validation`; the test split is never read). One folder
# per setup; finished runs are kept, so the script resumes. Ends with benchmarks/personal_effect.py,
# which writes the paired table (client-own and global accuracy, the share of experts kept) to
# $out/personal_effect.json and prints it.
# Usage: benchmarks/personal_experts.sh [out_dir] [seeds] [rounds]
#        defaults: benchmarks/results/personal 0 10      (about 12 min a run alone on the 2-core CPU)
# Its figures were measured with token-weighted expert aggregation, the default before issue 9 made
# `examples` the default: pinned here (fedalign.expert_weights=tokens) so the script reproduces them.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/personal}"
seeds="${2:-0}"
rounds="${3:-10}"
cli=.venv/bin/fedalign-moe
for seed in ${seeds//,/ }; do
  for personal in false true; do
    name=fedalign; [[ "$personal" == true ]] && name=fedalign-personal
    "$cli" compare --preset specialised --alphas 0.1 --seeds "$seed" --strategies fedalign --rounds "$rounds" \
      --out "$out/$name" --set data.holdout=validation --set fedalign.personal_experts="$personal" \
      --set fedalign.expert_weights=tokens
  done
done
.venv/bin/python benchmarks/personal_effect.py "$out/fedalign" "$out/fedalign-personal" --out "$out/personal_effect.json"
