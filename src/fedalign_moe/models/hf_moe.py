"""Adapters for transformers' MoE families: Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE (transformers 5.x).

All four put a sparse block at ``model.layers[i].mlp`` with a top-k router ``.gate`` (weight [E, H],
forward -> (router_logits [T, E], top_k_weights [T, K], top_k_index [T, K])) and stacked experts
``.experts`` (``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]). Qwen2-MoE adds a dense shared
expert and its gate; those are ordinary (non-MoE) parameters here and are averaged like attention.
Qwen2/3-MoE can keep some layers dense (``mlp_only_layers``, ``decoder_sparse_step``): only layers
whose ``mlp`` has both ``gate`` and ``experts`` count as MoE layers.
"""

from __future__ import annotations

from torch import nn
from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

from .base import MoEAdapter, MoELayerLayout, MoELayout, backbone_layer_index

FAMILIES = {"mixtral": MixtralConfig, "qwen2_moe": Qwen2MoeConfig, "qwen3_moe": Qwen3MoeConfig, "olmoe": OlmoeConfig}


def _is_sparse_block(module: nn.Module) -> bool:
    return hasattr(module, "gate") and hasattr(module, "experts") and hasattr(module.experts, "gate_up_proj")


def _top_k(config) -> int:
    return int(getattr(config, "num_experts_per_tok"))


def _num_experts(config) -> int:
    return int(getattr(config, "num_local_experts", None) or getattr(config, "num_experts"))


def moe_shape(config) -> tuple[int, int]:
    """(experts per MoE layer, top-k) of a transformers MoE config."""
    return _num_experts(config), _top_k(config)


class HFMoEAdapter(MoEAdapter):
    """Adapter for any model (possibly wrapped) containing transformers' sparse MoE blocks."""

    @classmethod
    def from_model(cls, model: nn.Module, config) -> "HFMoEAdapter":
        names = {id(p): n for n, p in model.named_parameters()}
        blocks = [m for _, m in model.named_modules() if _is_sparse_block(m)]
        if not blocks:
            raise ValueError(f"no sparse MoE block found in {type(model).__name__}")
        layers = []
        for i, block in enumerate(blocks):
            router = names[id(block.gate.weight)]
            experts = tuple(names[id(p)] for p in block.experts.parameters())
            layers.append(MoELayerLayout(backbone_layer_index(router, i), router, experts))
        layout = MoELayout(_num_experts(config), _top_k(config), tuple(layers))
        return cls(model, layout, [b.gate for b in blocks])


def tiny_config(family: str, num_experts: int = 4, top_k: int = 2, vocab_size: int = 512,
                hidden: int = 64, layers: int = 2):
    """A small random configuration of a family, for tests and smoke runs (builds offline)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown MoE family {family!r}; choose one of {', '.join(FAMILIES)}")
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, num_experts_per_tok=top_k,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    if family in ("mixtral",):
        extra = dict(num_local_experts=num_experts)
    elif family == "olmoe":
        extra = dict(num_experts=num_experts)
    else:
        extra = dict(num_experts=num_experts, moe_intermediate_size=hidden, decoder_sparse_step=1)
        if family == "qwen2_moe":
            extra["shared_expert_intermediate_size"] = hidden
    return FAMILIES[family](**common, **extra)


def build_tiny_causal_lm(family: str, seed: int, **kwargs) -> nn.Module:
    """A seeded random causal LM of the family (float32)."""
    import torch

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **kwargs))
