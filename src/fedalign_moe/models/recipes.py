"""Recipes that give the experts of an upcycled encoder distinct roles before federated training.

Plain sparse upcycling (``encoder_moe.upcycle_bert_classifier``) starts every expert as a copy of one
FFN, so nothing tells the experts apart and clients route alike. Two published recipes do better:

- Drop-Upcycling (Nakamura et al., ICLR 2025, arXiv 2502.19261): each expert re-initialises a random
  share r of its FFN's inner dimensions (rows of the up projection, columns of the down projection)
  from the normal distribution of the original weights' mean and std (``drop_upcycle_``).
- Branch-Train-MiX (Sukhbaatar et al. 2024, arXiv 2403.07816): each expert's FFN is first trained as a
  dense copy on its own domain of a public split that no client and no test split holds; the copies
  become the experts of the MoE layers, and the routers are trained on the whole public split with the
  Switch load-balancing loss (``btx_state``). Objective [ours]: an encoder classifier has no language
  modelling head, so each copy learns to tell apart the groups (MMLU subjects, WordNet lexnames) of its
  domain, and the routers learn to tell apart all groups with the experts frozen.

A BTX build takes minutes on a CPU; ``cached_build`` keeps its tensors on disk under a key of the recipe,
the dense weights, the public texts and the library versions, so a machine builds each model once.
Shapes: N examples, S tokens, H hidden, I FFN inner size, E experts, G groups, T tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import ModelConfig
from ..files import load_or_build
from .encoder_moe import (
    EncoderMoEAdapter,
    MoEEncoderClassifier,
    StackedFFNExperts,
    upcycle_bert_classifier,
)

logger = logging.getLogger(__name__)
BUILD_FORMAT = 1  # bump when a recipe changes what it builds: older cached models are not reused


@dataclass(frozen=True)
class PublicCorpus:
    """The public split as a recipe reads it: each text's group id and domain id (``data.domains``)."""

    texts: list[str]
    group_ids: list[int]
    domain_ids: list[int]
    domain_names: list[str]

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for text, g, d in zip(self.texts, self.group_ids, self.domain_ids):
            digest.update(f"{g}/{d}/{len(text)}/".encode())
            digest.update(text.encode())
        return digest.hexdigest()


@torch.no_grad()
def drop_upcycle_(experts: StackedFFNExperts, ratio: float, generator: torch.Generator) -> None:
    """Re-initialise a share ``ratio`` of each expert's inner dimensions from the weights' statistics, in place."""
    E, I, H = experts.up_proj.shape
    n_drop = round(ratio * I)
    if n_drop == 0:
        return
    stats = {name: (float(t.mean()), float(t.std())) for name, t in
             (("up", experts.up_proj[0]), ("up_b", experts.up_bias[0]), ("down", experts.down_proj[0]))}

    def draw(name: str, *shape: int) -> torch.Tensor:
        mean, std = stats[name]
        return torch.randn(*shape, generator=generator) * std + mean

    for e in range(E):
        idx_D = torch.randperm(I, generator=generator)[:n_drop]
        experts.up_proj[e, idx_D] = draw("up", n_drop, H)
        experts.up_bias[e, idx_D] = draw("up_b", n_drop)
        experts.down_proj[e][:, idx_D] = draw("down", H, n_drop)


def switch_balance_loss(logits_TE: torch.Tensor, keep_T: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch Transformer's load-balancing loss E * sum_e f_e P_e over the real tokens (arXiv 2101.03961)."""
    probs_TE = logits_TE[keep_T].float().softmax(-1)
    E = probs_TE.shape[1]
    chosen_TE = F.one_hot(probs_TE.topk(top_k, dim=-1).indices, E).sum(1).float()
    return E * (chosen_TE.mean(0) / top_k * probs_TE.mean(0)).sum()


def _fit(model: MoEEncoderClassifier, params: list[nn.Parameter], prefix_NSH: torch.Tensor, mask_NS: torch.Tensor,
         target_N: torch.Tensor, idx_N: torch.Tensor, epochs: int, lr: float, generator: torch.Generator,
         extra_loss: Callable[[torch.Tensor], torch.Tensor] | None = None, batch_size: int = 32) -> float:
    """AdamW on ``params`` over the examples ``idx_N`` from the cached prefix; the last epoch's mean loss."""
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    loss_sum, seen = 0.0, 0
    for _ in range(epochs):
        loss_sum, seen = 0.0, 0
        order_N = idx_N[torch.randperm(len(idx_N), generator=generator)]
        for batch_B in order_N.split(batch_size):
            logits_BG = model(attention_mask_BS=mask_NS[batch_B], prefix_hidden_BSH=prefix_NSH[batch_B])
            loss = F.cross_entropy(logits_BG, target_N[batch_B])
            total = loss if extra_loss is None else loss + extra_loss(mask_NS[batch_B].reshape(-1).bool())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            loss_sum, seen = loss_sum + float(loss.detach()) * len(batch_B), seen + len(batch_B)
    model.eval()
    return loss_sum / max(seen, 1)


def _ffn_names(layer: int) -> dict[str, str]:
    """The dense FFN's parameters of encoder layer ``layer`` by the stacked expert tensor they become."""
    return {"up_proj": f"layers.{layer}.intermediate.dense.weight", "up_bias": f"layers.{layer}.intermediate.dense.bias",
            "down_proj": f"layers.{layer}.output.dense.weight", "down_bias": f"layers.{layer}.output.dense.bias"}


def btx_state(load_dense: Callable[[], nn.Module], tokenizer, corpus: PublicCorpus, cfg: ModelConfig,
              max_length: int) -> dict[str, torch.Tensor]:
    """Branch-Train-MiX: the routers and experts of every MoE layer, named as in ``MoEEncoderClassifier``.

    ``load_dense`` returns a fresh dense ``BertModel``. Branch: expert e of every MoE layer is the FFN of a
    dense copy trained on domain e's public texts (the layers below the lowest MoE layer, and every
    attention, stay frozen). Mix: the copies become the experts; the routers (and a throwaway head) train
    on every public text with the experts frozen, plus ``btx_balance_coef`` x the Switch balance loss.
    """
    E, layers = cfg.num_experts, sorted(cfg.moe_layers)
    found = sorted(set(corpus.domain_ids))
    if found != list(range(E)):
        raise ValueError(f"btx needs one public domain per expert (0..{E - 1}), got domains {found}")
    torch.manual_seed(cfg.build_seed)  # dropout masks
    generator = torch.Generator().manual_seed(cfg.build_seed)
    enc = tokenizer(corpus.texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    mask_NS, group_N = enc["attention_mask"], torch.tensor(corpus.group_ids)
    domain_N, G = torch.tensor(corpus.domain_ids), int(group_N.max()) + 1
    bert = load_dense()
    dense = MoEEncoderClassifier(bert, G, ())
    dense.frozen_prefix = layers[0]
    prefix_NSH = torch.cat([dense.encode_prefix(ids_BS, m_BS) for ids_BS, m_BS in
                            zip(enc["input_ids"].split(128), mask_NS.split(128))])
    params = dict(dense.named_parameters())
    ffn_by_slot = {(l, stacked): params[name] for l in layers for stacked, name in _ffn_names(l).items()}
    ffn = list(ffn_by_slot.values())
    for p in dense.parameters():
        p.requires_grad_(False)
    initial = [p.detach().clone() for p in ffn]
    head0 = {n: t.detach().clone() for n, t in dense.head.state_dict().items()}
    branches = []  # per domain: (MoE layer, stacked expert tensor) -> the trained dense FFN tensor
    for e in range(E):
        with torch.no_grad():
            for p, p0 in zip(ffn, initial):
                p.copy_(p0)
            dense.head.load_state_dict(head0)
        for p in [*ffn, *dense.head.parameters()]:
            p.requires_grad_(True)
        loss = _fit(dense, [*ffn, *dense.head.parameters()], prefix_NSH, mask_NS, group_N,
                    torch.nonzero(domain_N == e).flatten(), cfg.btx_epochs, cfg.btx_lr, generator)
        logger.info("btx: expert %d trained on domain %s (%d texts, loss %.3f)", e, corpus.domain_names[e],
                    int((domain_N == e).sum()), loss)
        branches.append({slot: p.detach().clone() for slot, p in ffn_by_slot.items()})
    with torch.no_grad():
        for p, p0 in zip(ffn, initial):
            p.copy_(p0)
    moe = upcycle_bert_classifier(bert, G, tuple(layers), E, cfg.top_k, cfg.router_std, 0.0, cfg.build_seed)
    with torch.no_grad():
        for l in layers:
            experts = moe.layers[l].output.experts
            for e, branch in enumerate(branches):
                for stacked in _ffn_names(l):
                    target, trained = getattr(experts, stacked), branch[(l, stacked)]
                    if target[e].shape != trained.shape:
                        raise ValueError(f"btx: expert {e}'s {stacked} of layer {l} is {tuple(target[e].shape)}, "
                                         f"its trained FFN tensor {tuple(trained.shape)}")
                    target[e] = trained
    moe.frozen_prefix = layers[0]
    adapter = EncoderMoEAdapter.from_model(moe)
    for p in moe.parameters():
        p.requires_grad_(False)
    routers = [adapter.router_weight(l) for l in range(len(layers))]
    trainable = [*routers, *moe.head.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    with adapter.recorder(keep_grad=True) as rec:
        def balance(keep_T: torch.Tensor) -> torch.Tensor:
            return cfg.btx_balance_coef * sum(switch_balance_loss(r.logits_TE, r.real(keep_T), cfg.top_k) for r in rec.records)

        loss = _fit(moe, trainable, prefix_NSH, mask_NS, group_N, torch.arange(len(group_N)), cfg.btx_router_epochs,
                    cfg.btx_lr * 5, generator, balance)
    logger.info("btx: routers trained on %d public texts (loss %.3f)", len(group_N), loss)
    return {n: p.detach().clone() for n, p in moe.named_parameters() if n in adapter.layout.moe_parameter_names()}


def file_fingerprint(folder: Path) -> str:
    """SHA-256 over a model folder's files (names and bytes), or over one file's bytes."""
    digest = hashlib.sha256()
    for path in [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder) if path != folder else path.name).encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def build_key(cfg: ModelConfig, max_length: int, dense_fingerprint: str, corpus: PublicCorpus) -> str:
    """The cache key of a built model: everything that changes its tensors."""
    recipe = cfg.model_dump(include={"recipe", "num_experts", "top_k", "moe_layers", "router_std", "btx_epochs",
                                     "btx_router_epochs", "btx_lr", "btx_balance_coef", "build_seed"})
    parts = {"recipe": recipe, "max_length": max_length, "dense": dense_fingerprint, "corpus": corpus.fingerprint(),
             "torch": torch.__version__, "transformers": transformers.__version__, "format": BUILD_FORMAT}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def cached_build(key: str, cache_dir: str | None, build: Callable[[], dict[str, torch.Tensor]],
                 expected: dict[str, tuple[int, ...]]) -> tuple[dict[str, torch.Tensor], float, bool]:
    """(tensors, build seconds, whether they came from the cache); a cached file that does not hold exactly
    ``expected`` (names and shapes) is built again."""
    path = None if cache_dir is None else Path(cache_dir).expanduser() / f"{key}.safetensors"

    def load(path: Path) -> tuple[dict[str, torch.Tensor], float] | None:
        with safe_open(str(path), framework="pt") as f:
            state = {n: f.get_tensor(n) for n in f.keys()}
            seconds = float((f.metadata() or {}).get("build_seconds", "nan"))
        return (state, seconds) if {n: tuple(t.shape) for n, t in state.items()} == expected else None

    def timed_build() -> tuple[dict[str, torch.Tensor], float]:
        logger.info("building the model (%s); it is kept in %s", key, path.parent if path else "memory only")
        t0 = time.perf_counter()
        state = build()
        return state, time.perf_counter() - t0

    def save(built: tuple[dict[str, torch.Tensor], float], tmp: Path) -> None:
        state, seconds = built
        save_file({n: t.contiguous() for n, t in state.items()}, str(tmp), metadata={"build_seconds": f"{seconds:.1f}"})

    (state, seconds), cached = load_or_build(path, load, timed_build, save, "built model")
    return state, seconds, cached
