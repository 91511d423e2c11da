"""Switch Transformers (Fedus et al. 2021, arXiv 2101.03961), the paper's Switch-base-16, as a task model.

transformers keeps a Switch sparse layer's experts as a ModuleDict of ``expert_i`` FFNs (``wi`` [F, H],
``wo`` [H, F]) behind a top-1 router (``router.classifier``, weight [E, H]). The federated code works on
stacked expert tensors, so at load time each ModuleDict becomes ``StackedSwitchExperts`` holding the same
weights as ``wi`` [E, F, H] and ``wo`` [E, H, F] and computing the same function (tests check equal
outputs); ``to_transformers_state`` renames a trained state back for transformers' own classes. Then
the generic adapter (``hf_moe``) finds the routers and experts.

Routing is transformers' own: the raw softmax probability of the chosen expert scales its output; the
router's multiplicative jitter noise applies in training only (``router_jitter_noise``); a sequence sends
at most ``expert_capacity`` tokens to one expert and tokens over it skip the layer (the residual carries
them). With at most 64 tokens a text and the default capacity 64, no token is dropped here.

Tasks: classification reads the encoder alone (mean-pooled over real tokens, a linear head), as the
paper's AG News use of Switch-base suggests; multiple choice runs the sequence-to-sequence model one
decoder step and scores the answer letters' logits, the encoder-decoder way to answer MMLU.

Shape legend: B batch, S sequence, T tokens, H d_model, F d_ff, E experts, C classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SwitchTransformersEncoderModel

from .task import add_scoring


class StackedSwitchExperts(nn.Module):
    """E Switch FFNs (wi -> act -> dropout -> wo, no biases) stacked on dimension 0."""

    def __init__(self, wi_EFH: torch.Tensor, wo_EHF: torch.Tensor, act: nn.Module, dropout: nn.Module):
        super().__init__()
        self.wi = nn.Parameter(wi_EFH)
        self.wo = nn.Parameter(wo_EHF)
        self.act, self.dropout = act, dropout

    @classmethod
    def from_module_dict(cls, experts: nn.ModuleDict) -> StackedSwitchExperts:
        ffns = [experts[f"expert_{e}"] for e in range(len(experts))]
        wi_EFH = torch.stack([f.wi.weight.detach() for f in ffns]).clone()
        wo_EHF = torch.stack([f.wo.weight.detach() for f in ffns]).clone()
        return cls(wi_EFH, wo_EHF, ffns[0].act, ffns[0].dropout)

    def forward(self, hidden_TH: torch.Tensor, dispatch_T1E: torch.Tensor, weight_T1: torch.Tensor) -> torch.Tensor:
        """Same arguments as transformers' ``SwitchTransformersExperts``: a one-hot (capacity-masked)
        dispatch mask and the chosen expert's router probability."""
        out_TH = torch.zeros_like(hidden_TH)
        dispatch_TE = dispatch_T1E[:, 0, :]
        wi, wo = self.wi.unbind(0), self.wo.unbind(0)  # one view each: no full-size zero grads per expert
        for e in dispatch_TE.sum(0).nonzero().flatten().tolist():
            tokens = dispatch_TE[:, e].nonzero().flatten()
            h_NF = self.dropout(self.act(F.linear(hidden_TH[tokens], wi[e])))
            out_TH.index_add_(0, tokens, (F.linear(h_NF.to(wo[e].dtype), wo[e]) * weight_T1[tokens]).to(out_TH.dtype))
        return out_TH


def stack_switch_experts_(model: nn.Module) -> int:
    """Replace every Switch ModuleDict of experts in ``model`` by ``StackedSwitchExperts``; the count."""
    blocks = [m for m in model.modules() if isinstance(getattr(m, "experts", None), nn.ModuleDict)
              and hasattr(m, "router")]
    for block in blocks:
        block.experts = StackedSwitchExperts.from_module_dict(block.experts)
    return len(blocks)


class SwitchEncoderOnly(SwitchTransformersEncoderModel):
    """The encoder of a full Switch checkpoint: its decoder and LM head stay on disk, without a report."""

    _keys_to_ignore_on_load_unexpected = [r"^decoder\.", r"^lm_head\."]


def to_transformers_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state with stacked ``...experts.wi``/``...experts.wo`` renamed to transformers' per-expert
    ``...experts.expert_{e}.wi.weight`` (loadable by the ``SwitchTransformers*`` classes)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        stem, _, leaf = name.rpartition(".")
        if stem.endswith("experts") and leaf in ("wi", "wo"):
            for e, slice_ in enumerate(tensor.unbind(0)):
                out[f"{stem}.expert_{e}.{leaf}.weight"] = slice_.clone()
        else:
            out[name] = tensor
    return out


def _mean_pool(hidden_BSH: torch.Tensor, attention_mask_BS: torch.Tensor) -> torch.Tensor:
    mask_BS1 = attention_mask_BS.unsqueeze(-1).to(hidden_BSH.dtype)
    return (hidden_BSH * mask_BS1).sum(1) / mask_BS1.sum(1).clamp(min=1.0)


class SwitchTaskModel(nn.Module):
    """A Switch model as a C-way scorer: forward(input_ids_BS, attention_mask_BS) -> logits [B, C].

    ``switch`` is a ``SwitchTransformersEncoderModel`` (classification: pooled encoder + head) or a
    ``SwitchTransformersForConditionalGeneration`` (multiple choice: the letters' logits at the first
    decoder step)."""

    def __init__(self, switch: nn.Module, num_labels: int, label_token_ids: list[int] | None = None, seed: int = 0):
        super().__init__()
        stack_switch_experts_(switch)
        self.switch = switch
        self.config = switch.config
        self.frozen_prefix = 0
        add_scoring(self, switch.config.d_model, num_labels, label_token_ids, seed)

    def forward(self, input_ids_BS, attention_mask_BS, prefix_hidden_BSH=None) -> torch.Tensor:
        if self.head is not None:
            hidden_BSH = self.switch(input_ids=input_ids_BS, attention_mask=attention_mask_BS).last_hidden_state
            return self.head(_mean_pool(hidden_BSH, attention_mask_BS))
        start_B1 = torch.full((input_ids_BS.shape[0], 1), self.config.decoder_start_token_id, device=input_ids_BS.device)
        out = self.switch(input_ids=input_ids_BS, attention_mask=attention_mask_BS, decoder_input_ids=start_B1,
                          use_cache=False)
        return out.logits[:, 0, self.label_token_ids].float()


def tiny_switch_config(num_experts: int = 4, vocab_size: int = 512, hidden: int = 64, layers: int = 2):
    """A small random Switch Transformers configuration (every layer sparse), for tests."""
    from transformers import SwitchTransformersConfig

    return SwitchTransformersConfig(
        vocab_size=vocab_size, d_model=hidden, d_kv=16, d_ff=2 * hidden, expert_capacity=64, num_layers=layers,
        num_decoder_layers=layers, num_sparse_encoder_layers=layers, num_sparse_decoder_layers=layers,
        num_heads=4, num_experts=num_experts, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
