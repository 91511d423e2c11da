#!/usr/bin/env bash
# Issue 9's comparison on the `specialised` preset (the testbed where the premise holds: docs/results.md),
# run in the order that makes a partial grid most useful: first FedAvg and FedAlign-MoE at alpha 0.1 seed
# by seed (the paired difference the issue asks about), then FedProx (the third key cell) beside the rung
# without semantic expert aggregation (fedalign-adaptive: does the aligned-set cut cost the global model
# its accuracy?), then centralised, FedMoE and local, the other two rungs, and alpha 1.0. Finished runs are kept and an interrupted run resumes
# from its last round's checkpoint (`compare` does both), so the script can be stopped and started again.
# Ends with `fedalign-moe report`, which writes results.json, results.md, evidence.md and the figures over
# every finished run in the folder.
# Usage: benchmarks/specialised_grid.sh [out_dir] [seeds]   defaults: benchmarks/results/specialised 0,1,2,3,4
# Alone on the 2-core CPU: 14-20 min a federated run, 12.5 min centralised, 39 min local (80 runs for 5 seeds: ~25 h).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/specialised}"
seeds="${2:-0,1,2,3,4}"
cli=.venv/bin/fedalign-moe
cell() {  # cell STRATEGIES ALPHA SEED
  "$cli" compare --preset specialised --alphas "$2" --seeds "$3" --out "$out" --strategies "$1"
}
for seed in ${seeds//,/ }; do cell fedavg,fedalign 0.1 "$seed"; done
for seed in ${seeds//,/ }; do cell fedprox,fedalign-adaptive 0.1 "$seed"; done
for seed in ${seeds//,/ }; do cell centralised,fedmoe,local 0.1 "$seed"; done
for seed in ${seeds//,/ }; do cell fedalign-uniform,fedalign-consistency 0.1 "$seed"; done
for seed in ${seeds//,/ }; do cell fedavg,fedalign,fedprox,fedmoe,local,centralised 1.0 "$seed"; done
"$cli" report "$out"
