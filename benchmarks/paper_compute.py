"""What the paper's experiment costs on one GPU, by `fedalign-moe plan`'s compute estimate, offline.

`fedalign-moe plan --preset paper-switch` prints the estimate where the hub is reachable (it reads the
dataset and the model's config, no weights). Here, with no hub, the same formula
(`training.plan.estimate_compute`) runs on the models' published configurations, built on the meta device
(Switch-base-16: transformers' SwitchTransformersConfig with google/switch-base-16's sizes; DeepSeek-MoE-16B:
its sizes as `make_llm_checkpoint.py` writes them), and on AG News's published sizes (120,000 training
texts) split as the presets split them: a global test split of 7,600 (20% capped by `data.max_test`), a
training pool of 96,000, each client's own test split 20% of its share. One run: 10 clients, 25 rounds, one
local epoch, every sequence counted at 128 tokens (an upper bound). Writes
benchmarks/results/paper_compute.json and prints the table docs/reproduce.md shows.

Usage: .venv/bin/python benchmarks/paper_compute.py
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

from common import RESULTS, markdown_table, write_result
from fedalign_moe.config import load_config
from fedalign_moe.training.plan import H100_FLOPS_PER_SECOND, estimate_compute
from make_llm_checkpoint import architecture_config

AG_NEWS_TRAIN, GLOBAL_TEST = 120_000, 7_600


def switch_base_16():
    config = SwitchTransformersConfig(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_decoder_layers=12,
                                      num_heads=12, num_experts=16, expert_capacity=64, encoder_sparse_step=2,
                                      decoder_sparse_step=2)
    with torch.device("meta"):
        return SwitchTransformersForConditionalGeneration(config), "experts", 16, 1


def deepseek_moe_16b():
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(architecture_config("deepseek-moe-16b")), "mlp.experts", 64, 6


def facts(model, expert_marker: str, E: int, k: int, trainable: str) -> SimpleNamespace:
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    routed = sum(p.numel() for n, p in params.items() if expert_marker in n and "shared" not in n and "router" not in n)
    active = total - routed + routed * k // E
    # LoRA (paper-deepseek): its weight gradients are under 1% of the step's arithmetic; counted as none
    return SimpleNamespace(parameters=total, active_parameters=active, trainable_parameters=total if trainable == "all" else 0,
                           rows_per_example=1)


def ag_news(clients: int) -> SimpleNamespace:
    pool = AG_NEWS_TRAIN * 4 // 5  # the global test split takes 20% of each class, then is capped at 7,600
    share = pool // clients
    return SimpleNamespace(client_train=[range(share * 4 // 5)] * clients, client_test=[range(share // 5)] * clients,
                           global_test=range(GLOBAL_TEST))


def main() -> None:
    rows = []
    for preset, build in (("paper-switch", switch_base_16), ("paper-deepseek", deepseek_moe_16b)):
        cfg = load_config(preset)
        model, marker, E, k = build()
        f = facts(model, marker, E, k, cfg.model.trainable)
        estimate = estimate_compute(cfg, f, ag_news(cfg.partition.num_clients))
        fast, slow = estimate.gpu_hours()
        rows.append({"preset": preset, "parameters": f.parameters, "active_parameters": f.active_parameters,
                     "trainable": cfg.model.trainable, "train_tokens": estimate.train_tokens,
                     "eval_tokens": estimate.eval_tokens, "pflop": estimate.flops / 1e15,
                     "h100_hours": [round(fast, 2), round(slow, 2)], "flops_per_second": list(H100_FLOPS_PER_SECOND)})
    write_result(RESULTS / "paper_compute.json", rows)
    print(markdown_table(
        ["preset", "parameters (active)", "trains", "tokens trained / evaluated", "PFLOP", "hours a run on one H100"],
        [[f"`{r['preset']}`", f"{r['parameters'] / 1e9:.2f}B ({r['active_parameters'] / 1e9:.2f}B)", r["trainable"],
          f"{r['train_tokens'] / 1e6:,.0f}M / {r['eval_tokens'] / 1e6:,.0f}M", f"{r['pflop']:,.0f}",
          f"{r['h100_hours'][0]:.1f}-{r['h100_hours'][1]:.1f}"] for r in rows]))


if __name__ == "__main__":
    main()
