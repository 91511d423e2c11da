"""One adapter for transformers' MoE families, found from the model's own modules (transformers 5.x).

transformers 5 keeps a sparse block's experts as one module of stacked tensors (``experts.gate_up_proj``
[E, 2I, H], ``experts.down_proj`` [E, H, I], GPT-OSS adds per-expert biases [E, X]) beside a linear
router whose weight is [E, H]: ``gate`` (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, ERNIE-4.5, GLM-4-MoE,
HunYuan, FlexOlmo, MiniMax, Dots1) or ``router`` (GraniteMoE, PhiMoE, GPT-OSS, Llama-4). So a sparse block
is found by shape, not by name: a module with an ``experts`` child whose parameters all have E rows,
and a ``gate``/``router`` child holding exactly one [E, H] matrix (its own ``weight``, or that of one
linear inside it: HunYuan's ``wg``, Switch's ``classifier``). Layers a config keeps dense
(``first_k_dense_replace``, ``mlp_only_layers``) have no such block and stay ordinary parameters.

What the method sees of a family:
- routers: the [E, H] matrix; the routing statistics and the regulariser use its logits h W^T (+ the
  router's own bias [E] where it has one, GPT-OSS). Families that route by sigmoid scores plus a
  score-correction bias (DeepSeek-V3, GLM-4-MoE, ERNIE-4.5, Dots1) are recorded as top-k of these
  logits: the same choice whenever the correction bias is zero, which it is unless a checkpoint's
  training moved it.
- shared experts (DeepSeek's ``shared_experts``, Qwen2-MoE's ``shared_expert`` and its gate, Llama-4's
  ``shared_expert``) and router-side buffers are ordinary parameters, averaged like attention.

Checkpoints whose modelling code keeps the experts as a list of MLP modules (DeepSeek-MoE-16B's own code,
loaded with ``trust_remote_code``; older Mixtral-style code) are converted at load (``stack_listed_experts``):
the list becomes one ``StackedExperts`` module of the same [E, 2I, H] and [E, H, I] tensors, which the
block's own forward still indexes (``experts[e](x)``) and iterates, expert by expert, with the same result.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from .base import MoEAdapter, MoELayerLayout, MoELayout, backbone_layer_index

ROUTER_CHILDREN = ("gate", "router")
_EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_FIELDS = ("num_experts_per_tok", "moe_topk", "moe_k", "top_k", "num_selected_experts")


class NoMoEBlockError(ValueError):
    """A model without any sparse block this adapter recognises."""


def router_linear(block: nn.Module) -> nn.Module | None:
    """The module inside ``block``'s ``gate``/``router`` whose ``weight`` is the router matrix [E, H]."""
    for child in ROUTER_CHILDREN:
        router = getattr(block, child, None)
        if not isinstance(router, nn.Module):
            continue
        owners = [m for m in router.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)
                  and m.weight.dim() == 2]
        if len(owners) == 1:
            return owners[0]
    return None


class _StackedExpert(nn.Module):
    """Expert e of a ``StackedExperts``, as the list element it replaces: down(act(gate(x)) * up(x)), with the
    LoRA update of each stack peft put factors on (``with_indexable_lora``) added for expert e alone."""

    def __init__(self, stack: StackedExperts, e: int):
        super().__init__()
        object.__setattr__(self, "_stack", stack)  # not a submodule: the stack holds the parameters
        self.e = e

    def _weight(self, name: str) -> torch.Tensor:
        s, e = self._stack, self.e
        W = getattr(s, name)[e]
        for wrapper in s.lora_wrappers:
            if wrapper.parameter_name != name or wrapper.disable_adapters:
                continue
            for adapter in wrapper.active_adapters:
                if adapter in wrapper.lora_A:
                    lhs, rhs, scaling = wrapper.get_delta_factors(adapter)  # delta = scaling * lhs @ rhs, per expert
                    W = W + scaling * (lhs[e] @ rhs[e]).to(W.dtype)
        return W

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        gate_TI, up_TI = torch.nn.functional.linear(x_TH, self._weight("gate_up_proj")).chunk(2, dim=-1)
        return torch.nn.functional.linear(self._stack.act_fn(gate_TI) * up_TI, self._weight("down_proj"))


class StackedExperts(nn.Module):
    """A list of E gated MLP experts (``gate_proj``, ``up_proj``, ``down_proj``, no biases) as stacked
    tensors: ``gate_up_proj`` [E, 2I, H] (gate rows first, as transformers' Mixtral) and ``down_proj``
    [E, H, I]. Indexing and iterating give each expert as a module, so a block written for the list runs
    unchanged; ``to_list`` gives the list back (for saving in the checkpoint's own layout)."""

    lora_wrappers: tuple = ()  # peft's wrappers of these stacks (``with_indexable_lora``), not submodules

    def __init__(self, experts: nn.ModuleList):
        super().__init__()
        first = experts[0]
        self.act_fn = getattr(first, "act_fn", None) or nn.SiLU()
        self.gate_up_proj = nn.Parameter(torch.stack([torch.cat([m.gate_proj.weight, m.up_proj.weight]) for m in experts]).detach())
        self.down_proj = nn.Parameter(torch.stack([m.down_proj.weight for m in experts]).detach())

    def __len__(self) -> int:
        return self.gate_up_proj.shape[0]

    def __getitem__(self, e: int) -> nn.Module:
        if not -len(self) <= e < len(self):
            raise IndexError(f"expert {e} of {len(self)}")
        return _StackedExpert(self, e % len(self))

    def __iter__(self):
        return (self[e] for e in range(len(self)))

    def to_list(self, make_expert) -> nn.ModuleList:
        """The experts as a list again: ``make_expert()`` builds one empty expert of the original class."""
        I = self.down_proj.shape[-1]
        experts = nn.ModuleList(make_expert() for _ in range(len(self)))
        with torch.no_grad():
            for e, m in enumerate(experts):
                m.gate_proj.weight.copy_(self.gate_up_proj[e, :I])
                m.up_proj.weight.copy_(self.gate_up_proj[e, I:])
                m.down_proj.weight.copy_(self.down_proj[e])
        return experts


_INDEXABLE: dict[type, type] = {}


def _indexable(wrapper_class: type) -> type:
    """``wrapper_class`` (peft's ``ParamWrapper``) with the list interface of the ``StackedExperts`` it wraps."""
    if wrapper_class not in _INDEXABLE:
        def stack(self):
            m = self
            while not isinstance(m, StackedExperts):
                m = m.base_layer
            return m

        _INDEXABLE[wrapper_class] = type(f"Indexable{wrapper_class.__name__}", (wrapper_class,), {
            "__len__": lambda self: len(stack(self)), "__getitem__": lambda self, e: stack(self)[e],
            "__iter__": lambda self: iter(stack(self))})
    return _INDEXABLE[wrapper_class]


def with_indexable_lora(model: nn.Module) -> int:
    """After peft put LoRA factors on ``StackedExperts`` tensors (``target_parameters``), the block's own code
    still indexes its experts (``experts[e](x)``), now through peft's wrapper, which applies its update only
    when called as a whole. Give the wrapper the list interface and the stack its wrappers, so that each
    expert view adds its own slice of the update (the same W + scaling B A the wrapper would form); the
    number of blocks."""
    count = 0
    for block in model.modules():
        wrapper, chain = getattr(block, "experts", None), []
        m = wrapper
        while isinstance(m, nn.Module) and hasattr(m, "base_layer") and hasattr(m, "parameter_name"):
            chain.append(m)
            m = m.base_layer
        if chain and isinstance(m, StackedExperts):
            object.__setattr__(m, "lora_wrappers", tuple(chain))
            wrapper.__class__ = _indexable(type(wrapper))
            count += 1
    return count


def _is_listed_gated_mlp(experts: object, E: int) -> bool:
    """A list of E modules each with bias-free gate/up/down linear layers of one shape."""
    if not isinstance(experts, nn.ModuleList) or len(experts) != E or E == 0:
        return False
    shapes = set()
    for m in experts:
        linears = [getattr(m, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(l, nn.Linear) and l.bias is None and l.weight.is_floating_point() for l in linears):
            return False
        shapes.add(tuple(tuple(l.weight.shape) for l in linears))
    return len(shapes) == 1


def _listed_blocks(model: nn.Module) -> list[nn.Module]:
    """Blocks whose ``experts`` are a list of E gated MLPs beside a router of weight [E, H]."""
    return [m for m in model.modules() if (linear := router_linear(m)) is not None
            and _is_listed_gated_mlp(getattr(m, "experts", None), linear.weight.shape[0])]


def listed_experts(model: nn.Module) -> list[nn.ModuleList]:
    """The expert lists ``stack_listed_experts`` would stack."""
    return [b.experts for b in _listed_blocks(model)]


def listed_expert_routers(model: nn.Module) -> list[nn.Module]:
    """The routers beside those lists."""
    return [router_linear(b) for b in _listed_blocks(model)]


def stack_listed_experts(model: nn.Module) -> int:
    """Convert, in place, every block whose ``experts`` are a list of gated MLPs beside an [E, H] router into
    a ``StackedExperts``; the number of blocks converted."""
    blocks = _listed_blocks(model)
    for block in blocks:
        block.experts = StackedExperts(block.experts)
    return len(blocks)


def _is_sparse_block(module: nn.Module) -> bool:
    experts, linear = getattr(module, "experts", None), router_linear(module)
    if not isinstance(experts, nn.Module) or linear is None:
        return False
    E = linear.weight.shape[0]
    params = list(experts.parameters(recurse=False))
    return bool(params) and all(p.dim() >= 2 and p.shape[0] == E for p in params)


def sparse_blocks(model: nn.Module) -> list[nn.Module]:
    """Every sparse MoE block of ``model``, in module order."""
    return [m for m in model.modules() if _is_sparse_block(m)]


def _first_int(config, fields: tuple[str, ...]) -> int | None:
    for name in fields:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and value:  # HunYuan may list one value per layer
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def moe_shape(config) -> tuple[int, int] | None:
    """(experts per MoE layer, top-k) of a transformers MoE config; None if it names neither."""
    if getattr(config, "model_type", None) == "switch_transformers":
        return int(config.num_experts), 1  # Switch routes every token to one expert
    E, k = _first_int(config, _EXPERT_COUNT_FIELDS), _first_int(config, _TOP_K_FIELDS)
    return None if E is None or k is None else (E, k)


class HFMoEAdapter(MoEAdapter):
    """Adapter for any model (possibly wrapped) holding transformers-style sparse MoE blocks."""

    @classmethod
    def from_model(cls, model: nn.Module, config) -> HFMoEAdapter:
        names = {id(p): n for n, p in model.named_parameters()}
        blocks = sparse_blocks(model)
        if not blocks:
            raise NoMoEBlockError(f"no sparse MoE block found in {type(model).__name__}: none of its modules has an "
                                  "`experts` child of stacked [E, ...] tensors beside a `gate`/`router` of weight [E, H]")
        linears = [router_linear(b) for b in blocks]
        layers = []
        for i, (block, linear) in enumerate(zip(blocks, linears)):
            router = names[id(linear.weight)]
            experts = tuple(names[id(p)] for p in block.experts.parameters(recurse=False))
            index = backbone_layer_index(router, i)
            if getattr(config, "is_encoder_decoder", False) and ".decoder." in f".{router}":
                index += int(getattr(config, "num_layers", 0))  # decoder layers follow the encoder's
            layers.append(MoELayerLayout(index, router, experts))
        counts = {int(l.weight.shape[0]) for l in linears}
        if len(counts) != 1:
            raise NoMoEBlockError(f"the sparse blocks of {type(model).__name__} hold different expert counts {sorted(counts)}")
        shape = moe_shape(config)
        top_k = shape[1] if shape else 1
        return cls(model, MoELayout(counts.pop(), top_k, tuple(layers)), linears)


# ------------------------------------------------------------------------------- tiny random configs
# Every family below builds from a config here, trains, and routes (tests/test_families.py runs each
# through two federated rounds). The extra fields are what each config class needs beyond the common ones.
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
_SHARED = dict(n_shared_experts=1, moe_intermediate_size=32)
FAMILIES: dict[str, dict] = {
    "mixtral": dict(num_local_experts="E"),
    "qwen2_moe": dict(num_experts="E", moe_intermediate_size=64, decoder_sparse_step=1, shared_expert_intermediate_size=64),
    "qwen3_moe": dict(num_experts="E", moe_intermediate_size=64, decoder_sparse_step=1),
    "olmoe": dict(num_experts="E"),
    "deepseek_v2": dict(n_routed_experts="E", first_k_dense_replace=0, n_group=1, topk_group=1, **_MLA, **_SHARED),
    "deepseek_v3": dict(n_routed_experts="E", first_k_dense_replace=0, n_group=1, topk_group=1, **_MLA, **_SHARED),
    "ernie4_5_moe": dict(moe_num_experts="E", moe_k="K", moe_layer_start_index=0, moe_intermediate_size=32,
                         moe_num_shared_experts=1),
    "glm4_moe": dict(n_routed_experts="E", first_k_dense_replace=0, n_group=1, topk_group=1, head_dim=16, **_SHARED),
    "granitemoe": dict(num_local_experts="E"),
    "phimoe": dict(num_local_experts="E"),
    "gpt_oss": dict(num_local_experts="E", head_dim=16, rope_parameters=None),
    "llama4_text": dict(num_local_experts="E", intermediate_size_mlp=128, head_dim=16, interleave_moe_layer_step=1),
    "hunyuan_v1_moe": dict(num_experts="E", moe_topk="K", head_dim=16),
    "flex_olmo": dict(num_experts="E"),
    "minimax": dict(num_local_experts="E", head_dim=16),
    "dots1": dict(n_routed_experts="E", first_k_dense_replace=0, n_group=1, topk_group=1, head_dim=16, **_SHARED),
}


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
    extra = {k: {"E": num_experts, "K": top_k}.get(v, v) if isinstance(v, str) else v
             for k, v in FAMILIES[family].items()}
    return CONFIG_MAPPING[family](**{**common, **{k: v for k, v in extra.items() if v is not None}})


def build_tiny_causal_lm(family: str, seed: int, **kwargs) -> nn.Module:
    """A seeded random causal LM of the family (float32)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, **kwargs))
