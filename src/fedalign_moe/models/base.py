"""What every MoE model family exposes to the rest of the package.

Shape legend: B batch, T tokens (flattened B*S where a block sees a flat token list), S sequence,
H hidden size, E experts, L MoE layers.

An adapter maps a concrete model onto three plain facts the federated code needs:
- ``MoELayout``: per MoE layer, the state-dict name of the router weight ``[E, H]`` and the names of
  the stacked expert tensors (dimension 0 indexes the expert). The server aggregates on names alone,
  so the layout is plain data that travels without the model.
- ``RoutingRecorder``: forward hooks on every router that capture the MoE-input hidden states ``[T, H]``
  of the current forward pass and their router logits ``[T, E]`` = h W^T (+ the router's bias).
- the modules holding the router matrices (each has ``weight`` [E, H]), so hooks can be registered and
  removed explicitly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.aggregate import LayerNames


@dataclass(frozen=True)
class MoELayerLayout:
    """One MoE layer: which state-dict entries hold its router and its experts."""

    index: int  # position of the layer in the backbone (0-based)
    router: str  # name of the router weight, shape [E, H]
    experts: tuple[str, ...]  # names of stacked expert tensors, each [E, ...]
    # (A, B) names of the LoRA factors on the stacked experts (peft: A [E*r, I], B [O, r*E]; core.lora_experts)
    lora: tuple[tuple[str, str], ...] = ()

    def names(self) -> LayerNames:
        """The layer as the aggregation math sees it (``core.aggregate.LayerNames``)."""
        return LayerNames(self.router, self.experts, self.lora)


@dataclass(frozen=True)
class MoELayout:
    """All MoE layers of a model, plus the routing hyper-parameters shared by them."""

    num_experts: int
    top_k: int
    layers: tuple[MoELayerLayout, ...]

    def moe_parameter_names(self) -> set[str]:
        """Names of every router and stacked expert tensor."""
        return {n for layer in self.layers for n in layer.names().tensor_names()}


@dataclass
class RoutingRecord:
    """What one router saw in one forward pass (tokens flattened)."""

    logits_TE: torch.Tensor
    hidden_TH: torch.Tensor

    def real(self, keep_T: torch.Tensor) -> torch.Tensor:
        """This record's real-token mask: the batch's padding mask ``keep_T`` [B*S], or every token of a
        record of another length (an encoder-decoder's decoder step: one token a row, none padding)."""
        T = self.logits_TE.shape[0]
        return keep_T if T == keep_T.shape[0] else torch.ones(T, dtype=torch.bool, device=keep_T.device)


@dataclass
class RoutingRecorder:
    """Captures router inputs and logits via forward hooks, one entry per MoE layer.

    Use as a context manager around forward passes; ``records[l]`` is overwritten by every pass, so
    read it after each forward. With ``keep_grad=False`` the tensors are detached (statistics); with
    ``keep_grad=True`` the logits keep their graph (a regulariser can back-propagate through them).
    """

    routers: list[nn.Module]
    keep_grad: bool = False
    records: list[RoutingRecord | None] = field(default_factory=list)
    _handles: list = field(default_factory=list)

    def __enter__(self) -> RoutingRecorder:
        self.records = [None] * len(self.routers)
        for l, router in enumerate(self.routers):
            self._handles.append(router.register_forward_hook(self._make_hook(l)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, l: int):
        def hook(module: nn.Module, args: tuple, output) -> None:
            # the logits are h W^T (+ b) whatever the router returns: families return logits, scores or
            # dispatch masks first, and some apply sigmoid or correction biases after the matrix
            hidden = args[0]
            hidden_TH = hidden.reshape(-1, hidden.shape[-1])
            if not self.keep_grad:
                hidden_TH = hidden_TH.detach()
            weight_EH, bias = module.weight, getattr(module, "bias", None)
            bias_E = bias.to(weight_EH.dtype) if isinstance(bias, torch.Tensor) and bias.shape == weight_EH.shape[:1] else None  # GPT-OSS
            # in the router's own dtype (float32 when it trains), also under a 16-bit autocast
            with (torch.set_grad_enabled(self.keep_grad and torch.is_grad_enabled()),
                  torch.autocast(hidden_TH.device.type, enabled=False)):
                logits_TE = F.linear(hidden_TH.to(weight_EH.dtype), weight_EH, bias_E)
            self.records[l] = RoutingRecord(logits_TE=logits_TE, hidden_TH=hidden_TH)

        return hook


def backbone_layer_index(param_name: str, fallback: int) -> int:
    """The decoder/encoder layer number in a name like ``model.layers.7.mlp.gate.weight`` (or T5/Switch's
    ``encoder.block.3.layer.1.mlp...``, where ``layer.1`` is a sub-layer)."""
    match = re.search(r"(?:^|\.)(?:layers|block)\.(\d+)\.", param_name) or re.search(r"layer\.(\d+)\.", param_name)
    return int(match.group(1)) if match else fallback


def _lora_pairs(params: dict[str, nn.Parameter], expert_modules: set[str]) -> tuple[tuple[str, str], ...]:
    """(A, B) names of the LoRA factors peft put on the stacked experts held by ``expert_modules`` (their
    names before wrapping): ``<module>.(base_layer.)*lora_A.<adapter>.weight`` and its ``lora_B`` twin."""
    pairs = []
    for name in sorted(params):
        head, sep, tail = name.partition(".lora_A.")
        if sep and head.split(".base_layer")[0] in expert_modules:
            twin = f"{head}.lora_B.{tail}"
            if twin in params:
                pairs.append((name, twin))
    return tuple(pairs)


class MoEAdapter:
    """Base class: a family adapter knows its model's routers and stacked experts."""

    def __init__(self, model: nn.Module, layout: MoELayout, routers: list[nn.Module]):
        if len(routers) != len(layout.layers):
            raise ValueError("one router module per MoE layer is required")
        self.model = model
        self.layout = layout
        self.routers = routers

    @property
    def num_experts(self) -> int:
        return self.layout.num_experts

    @property
    def top_k(self) -> int:
        return self.layout.top_k

    def _param(self, name: str) -> nn.Parameter:
        return self.model.get_parameter(name)  # walks the dotted path; no dict of every parameter per call

    def router_weight(self, l: int) -> nn.Parameter:
        """Router weight of MoE layer ``l``, shape [E, H]."""
        return self._param(self.layout.layers[l].router)

    def router_bias(self, l: int) -> torch.Tensor | None:
        """The router's own bias [E] of MoE layer ``l`` (GPT-OSS has one), or None."""
        bias = getattr(self.routers[l], "bias", None)
        return bias if isinstance(bias, torch.Tensor) and bias.shape == (self.num_experts,) else None

    def expert_slice(self, l: int, e: int) -> dict[str, torch.Tensor]:
        """Views of expert ``e`` in MoE layer ``l``: one tensor per stacked expert parameter."""
        return {name: self._param(name)[e] for name in self.layout.layers[l].experts}

    def renamed(self, before: dict[str, nn.Parameter]) -> MoEAdapter:
        """The same adapter after the model was wrapped in place (e.g. peft LoRA injection).

        ``before`` is ``dict(model.named_parameters())`` taken before wrapping; parameters are matched
        by identity, so the layout follows the same tensors under their new names.
        """
        now = {id(p): n for n, p in self.model.named_parameters()}

        def rename(name: str) -> str:
            return now[id(before[name])]

        params = dict(self.model.named_parameters())
        layers = tuple(
            MoELayerLayout(l.index, rename(l.router), tuple(rename(e) for e in l.experts),
                           _lora_pairs(params, {before_name.rpartition(".")[0] for before_name in l.experts}))
            for l in self.layout.layers
        )
        return type(self)(self.model, MoELayout(self.num_experts, self.top_k, layers), self.routers)

    def recorder(self, keep_grad: bool = False) -> RoutingRecorder:
        return RoutingRecorder(self.routers, keep_grad=keep_grad)
