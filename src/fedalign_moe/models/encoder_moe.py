"""A BERT-style encoder whose chosen FFN layers are sparsely upcycled into MoE blocks.

Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): every expert starts as a copy of the
dense FFN (plus a little seeded noise to break symmetry), the router starts near zero. transformers
has no MoE variant of BERT, so the block is written here, in the layout of transformers' Mixtral
(router weight [E, H], stacked expert tensors with the expert on dimension 0) so the same federated
code handles both.

Shape legend: B batch, S sequence, T tokens (B*S), H hidden, I FFN inner size, E experts, K top-k.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from .base import MoEAdapter, MoELayerLayout, MoELayout, backbone_layer_index


class TopKRouter(nn.Module):
    """Linear router; returns (logits [T, E], weights [T, K], indices [T, K]) like transformers' routers.

    With ``renormalize`` the top-k probabilities are rescaled to sum to one (Mixtral); without it the
    raw softmax probability scales each expert (Switch Transformer, arXiv 2101.03961, eq. 2), which is
    what keeps a top-1 router trainable.
    """

    def __init__(self, hidden: int, num_experts: int, top_k: int, renormalize: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden))
        self.top_k, self.renormalize = top_k, renormalize

    def forward(self, hidden_TH: torch.Tensor):
        logits_TE = F.linear(hidden_TH, self.weight)
        probs_TE = logits_TE.float().softmax(dim=-1)
        weights_TK, index_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return logits_TE, weights_TK.to(hidden_TH.dtype), index_TK


class StackedFFNExperts(nn.Module):
    """E copies of BERT's FFN (dense -> GELU -> dense, with biases), stacked on dimension 0."""

    def __init__(self, num_experts: int, hidden: int, inner: int):
        super().__init__()
        self.up_proj = nn.Parameter(torch.zeros(num_experts, inner, hidden))
        self.up_bias = nn.Parameter(torch.zeros(num_experts, inner))
        self.down_proj = nn.Parameter(torch.zeros(num_experts, hidden, inner))
        self.down_bias = nn.Parameter(torch.zeros(num_experts, hidden))

    def forward(self, hidden_TH, weights_TK, index_TK) -> torch.Tensor:
        out_TH = torch.zeros_like(hidden_TH)
        # unbind once: indexing the stacked tensor per expert would make autograd build a full-size
        # [E, ...] zero gradient for every expert visited (a third of the step time on CPU)
        up, up_b, down, down_b = (p.unbind(0) for p in (self.up_proj, self.up_bias, self.down_proj, self.down_bias))
        for e in index_TK.unique().tolist():  # visit only experts that received tokens
            token_idx, slot = (index_TK == e).nonzero(as_tuple=True)
            x_tH = hidden_TH[token_idx]
            y_tH = F.linear(F.gelu(F.linear(x_tH, up[e], up_b[e])), down[e], down_b[e])
            out_TH.index_add_(0, token_idx, y_tH * weights_TK[token_idx, slot, None])
        return out_TH


class MoEOutput(nn.Module):
    """Replaces BERT's intermediate+output pair: LayerNorm(x + MoE(x))."""

    def __init__(self, router: TopKRouter, experts: StackedFFNExperts, layer_norm: nn.LayerNorm, dropout: float):
        super().__init__()
        self.router, self.experts, self.LayerNorm = router, experts, layer_norm
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden_BSH: torch.Tensor, input_BSH: torch.Tensor) -> torch.Tensor:
        B, S, H = hidden_BSH.shape
        hidden_TH = hidden_BSH.reshape(B * S, H)
        _, weights_TK, index_TK = self.router(hidden_TH)
        moe_BSH = self.experts(hidden_TH, weights_TK, index_TK).reshape(B, S, H)
        return self.LayerNorm(self.dropout(moe_BSH) + input_BSH)


def upcycle_bert_layer(layer: nn.Module, num_experts: int, top_k: int, router_std: float,
                       expert_noise: float, generator: torch.Generator) -> None:
    """Turn one BertLayer's FFN into an MoE block in place (experts = noisy copies of the FFN)."""
    up, down = layer.intermediate.dense, layer.output.dense
    inner, hidden = up.weight.shape
    experts = StackedFFNExperts(num_experts, hidden, inner)
    with torch.no_grad():
        for name, dense in (("up", up), ("down", down)):
            w = getattr(experts, f"{name}_proj")
            assert w.shape[1:] == dense.weight.shape, (name, w.shape, dense.weight.shape)
            noise = torch.randn(w.shape, generator=generator) * dense.weight.std() * expert_noise
            w.copy_(dense.weight.unsqueeze(0).expand_as(w) + noise)
            getattr(experts, f"{name}_bias").copy_(dense.bias.unsqueeze(0).expand(num_experts, -1))
    router = TopKRouter(hidden, num_experts, top_k, renormalize=top_k > 1)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=generator) * router_std)
    layer.intermediate = nn.Identity()
    layer.output = MoEOutput(router, experts, layer.output.LayerNorm, layer.output.dropout.p)


class MoEEncoderClassifier(nn.Module):
    """Embeddings, a stack of BERT layers (some MoE), mean pooling and a linear head -> logits [B, C].

    The frozen bottom can be run once and cached: with ``frozen_prefix = k`` layers 0..k-1 and the
    self-attention of layer k (the input of its MoE block) are frozen, ``encode_prefix`` returns
    that MoE input, and ``forward(prefix_hidden_BSH=...)`` resumes at layer k's feed-forward part.
    """

    def __init__(self, bert: nn.Module, num_labels: int, moe_layers: tuple[int, ...]):
        super().__init__()
        self.config = bert.config
        self.embeddings = bert.embeddings
        self.layers = bert.encoder.layer
        self.head = nn.Linear(bert.config.hidden_size, num_labels)
        self.moe_layers = tuple(sorted(moe_layers))
        self.frozen_prefix = 0  # set by the trainable-subset logic; 0 = nothing cached

    def _mask(self, hidden_BSH, attention_mask_BS):
        return create_bidirectional_mask(config=self.config, inputs_embeds=hidden_BSH, attention_mask=attention_mask_BS)

    def _run_layers(self, hidden_BSH, attention_mask_BS, start: int, stop: int):
        mask = self._mask(hidden_BSH, attention_mask_BS)
        for layer in self.layers[start:stop]:
            hidden_BSH = layer(hidden_BSH, attention_mask=mask)
        return hidden_BSH

    @torch.no_grad()
    def encode_prefix(self, input_ids_BS, attention_mask_BS) -> torch.Tensor:
        """Output of the frozen part: the input of layer ``frozen_prefix``'s feed-forward block."""
        k = self.frozen_prefix
        hidden_BSH = self._run_layers(self.embeddings(input_ids=input_ids_BS), attention_mask_BS, 0, k)
        attention_BSH, _ = self.layers[k].attention(hidden_BSH, self._mask(hidden_BSH, attention_mask_BS))
        return attention_BSH

    def prefix_fingerprint(self) -> str:
        """SHA-256 over the frozen part's parameters: equal fingerprints give equal ``encode_prefix``."""
        k = self.frozen_prefix
        digest = hashlib.sha256(f"prefix{k}".encode())
        modules = [self.embeddings, *self.layers[:k], self.layers[k].attention]
        for module in modules:
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                digest.update(name.encode())
                digest.update(str(tensor.dtype).encode())
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def forward(self, input_ids_BS=None, attention_mask_BS=None, prefix_hidden_BSH=None) -> torch.Tensor:
        if prefix_hidden_BSH is None:
            hidden_BSH = self._run_layers(self.embeddings(input_ids=input_ids_BS), attention_mask_BS, 0, len(self.layers))
        else:
            k = self.frozen_prefix
            hidden_BSH = self.layers[k].feed_forward_chunk(prefix_hidden_BSH)
            hidden_BSH = self._run_layers(hidden_BSH, attention_mask_BS, k + 1, len(self.layers))
        m_BS1 = attention_mask_BS.unsqueeze(-1).to(hidden_BSH.dtype)
        pooled_BH = (hidden_BSH * m_BS1).sum(1) / m_BS1.sum(1).clamp(min=1.0)  # mean over real tokens
        return self.head(pooled_BH)


def upcycle_bert_classifier(bert: nn.Module, num_labels: int, moe_layers: tuple[int, ...], num_experts: int,
                            top_k: int, router_std: float, expert_noise: float, seed: int) -> MoEEncoderClassifier:
    """Build a classifier from a dense ``BertModel``, upcycling ``moe_layers`` to ``num_experts`` experts."""
    n_layers = len(bert.encoder.layer)
    bad = [i for i in moe_layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"moe_layers {bad} outside the encoder's {n_layers} layers")
    generator = torch.Generator().manual_seed(seed)
    for i in sorted(moe_layers):
        upcycle_bert_layer(bert.encoder.layer[i], num_experts, top_k, router_std, expert_noise, generator)
    model = MoEEncoderClassifier(bert, num_labels, moe_layers)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=generator) * 0.02)
        model.head.bias.zero_()
    return model


class EncoderMoEAdapter(MoEAdapter):
    """Adapter for ``MoEEncoderClassifier`` (possibly wrapped, e.g. by peft): finds its MoE blocks."""

    @classmethod
    def from_model(cls, model: nn.Module) -> EncoderMoEAdapter:
        names = {id(p): n for n, p in model.named_parameters()}
        blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, MoEOutput)]
        if not blocks:
            raise ValueError("model has no MoE blocks")
        layers, routers = [], []
        for i, (_, block) in enumerate(blocks):
            experts = tuple(names[id(p)] for p in block.experts.parameters())
            router_name = names[id(block.router.weight)]
            layers.append(MoELayerLayout(backbone_layer_index(router_name, i), router_name, experts))
            routers.append(block.router)
        first = blocks[0][1].router
        layout = MoELayout(first.weight.shape[0], first.top_k, tuple(layers))
        return cls(model, layout, routers)
