"""A/B of one client's local training (docs/results.md, "LoRA experts, aligned per expert"): the gpu cut
(SmolLM2 upcycled, LoRA experts, a FedAlign-MoE target) trained on 24 examples of client 0, one thread,
with the code found first on PYTHONPATH. Usage, old commit against the working tree:
  git worktree add /tmp/old COMMIT
  PYTHONPATH=/tmp/old/src .venv/bin/python benchmarks/train_step_ab.py
  PYTHONPATH=src .venv/bin/python benchmarks/train_step_ab.py
"""
import time

import torch

torch.set_num_threads(1)
from fedalign_moe.config import load_config
from fedalign_moe.training.alignment import ClientAligner
from fedalign_moe.training.local import ClientTensors, train_local
from fedalign_moe.training.setup import open_workspace

cfg = load_config("gpu", overrides={"model": {"device": "cpu", "trainable": "lora-experts"}, "federation": {"client_gpus": 0},
      "data": {"max_length": 128, "max_train": 250, "max_test": 100}, "train": {"batch_size": 8, "torch_threads": 1},
      "out_dir": "runs/train-step-ab"})
ws = open_workspace(cfg)
train, _ = ws.client(0)
idx = torch.arange(min(24, len(train)))
L, E = len(ws.built.layout.layers), ws.built.layout.num_experts
aligner = ClientAligner(ws.built.adapter, torch.full((L, E), 1 / E), torch.ones(L, E), 0.1, 0.0, 0)
t = time.perf_counter()
part = ClientTensors(train.input_ids_NS[idx], train.attention_mask_NS[idx], train.labels_N[idx])
res = train_local(ws.built.model, ws.built.adapter, part, ws.built.trainable, cfg.train, seed=0, proximal_mu=0.0, device=ws.device,
                  aligner=aligner)
print(f"train {time.perf_counter() - t:.1f}s tokens {res.tokens}")
