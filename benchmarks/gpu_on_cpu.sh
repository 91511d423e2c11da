#!/usr/bin/env bash
# The `gpu` preset's model and data on the 2-core, 24 GiB CPU machine, cut to what fits in memory and in
# about half an hour: SmolLM2-135M-Instruct upcycled to Mixtral (4 experts, top-2, 373M parameters), MMLU
# multiple choice split over 10 clients by subject with Dirichlet alpha 0.1, FedAvg and FedAlign-MoE, seed 0.
# Cut: LoRA (rank 8) on the experts plus the routers train instead of the full experts (the full set,
# 318M parameters, is 1.27 GB per client reply: ten replies and two training processes ran the machine
# out of memory), 250 training and 100 test questions, 128 tokens, 3 rounds, batch 8.
# Results in docs/results.md ("The gpu preset"); the full preset needs a GPU host (docs/gpu.md).
# Usage: benchmarks/gpu_on_cpu.sh [out_dir]      default: benchmarks/results/gpu-on-cpu
# Its figures were measured with token-weighted expert aggregation, the default before issue 9 made
# `examples` the default: pinned here (fedalign.expert_weights=tokens) so the script reproduces them; and
# with a float32 base, before the preset's base became bfloat16 (model.dtype=float32 pinned likewise), each batch padded to max_length (train.padding pinned).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-benchmarks/results/gpu-on-cpu}"
.venv/bin/fedalign-moe compare --preset gpu --strategies fedavg,fedalign --alphas 0.1 --seeds 0 --rounds 3 \
  --out "$out" --set model.device=cpu --set federation.client_gpus=0 --set train.torch_threads=1 \
  --set model.trainable=lora-experts --set data.max_length=128 --set data.max_train=250 \
  --set data.max_test=100 --set train.batch_size=8 --set train.eval_batch_size=16 --set fedalign.expert_weights=tokens \
  --set model.dtype=float32 --set train.padding=max_length
