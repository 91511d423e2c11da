#!/usr/bin/env bash
# FedAlign-MoE with LoRA experts aligned per expert (issue 10, section 2), on the cut of the `gpu` preset
# that fits the 2-core CPU (benchmarks/gpu_on_cpu.sh: SmolLM2-135M-Instruct upcycled to Mixtral, 4 experts,
# top-2, LoRA rank 8 on the experts plus the routers, MMLU multiple choice over 10 clients, Dirichlet alpha
# 0.1, 250 training and 100 test questions, 128 tokens, 3 rounds, seed 0), once for each way of comparing
# expert e's LoRA update across clients: fedalign.lora_direction = product, then factors.
# Results in docs/results.md ("LoRA experts, aligned per expert"); about 16 min a run here.
# Usage: benchmarks/lora_direction.sh [out_dir]      default: benchmarks/results/lora-direction
# Its figures were measured with token-weighted expert aggregation, the default before issue 9 made
# `examples` the default: pinned here (fedalign.expert_weights=tokens) so the script reproduces them.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/lora-direction}"
for direction in product factors; do
  .venv/bin/fedalign-moe compare --preset gpu --strategies fedalign --alphas 0.1 --seeds 0 --rounds 3 \
    --out "$out/$direction" --set model.device=cpu --set federation.client_gpus=0 --set train.torch_threads=1 \
    --set model.trainable=lora-experts --set data.max_length=128 --set data.max_train=250 \
    --set data.max_test=100 --set train.batch_size=8 --set train.eval_batch_size=16 \
    --set fedalign.lora_direction="$direction" --set fedalign.expert_weights=tokens
done
