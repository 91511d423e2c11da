#!/usr/bin/env bash
# Wall time of the `bench` preset's comparison grid on this machine (the issue's target: the grid of
# strategies x alphas {1.0, 0.1} x 1 seed within 60 minutes on the 2-core CPU).
# Usage: benchmarks/bench_grid.sh [strategies] [out_dir]
set -euo pipefail
cd "$(dirname "$0")/.."
strategies="${1:-local,centralised,fedavg,fedprox}"
out="${2:-benchmarks/results/bench-grid}"
mkdir -p "$out"
start=$(date +%s)
.venv/bin/fedalign-moe compare --preset bench --strategies "$strategies" --alphas 1.0,0.1 --seeds 0 --out "$out" \
  > "$out/console.log" 2>&1
end=$(date +%s)
{
  echo "strategies: $strategies"
  echo "cpu: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "wall_seconds: $((end - start))"
} | tee "$out/wall_time.txt"
