"""Local training and evaluation of one model on one client's tensors (no Flower here).

Shape legend: N examples, B batch, S sequence, H hidden, L MoE layers, E experts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig
from ..core.statistics import ModelRoutingStatistics
from ..models.base import MoEAdapter
from .alignment import RoutingObserver


@dataclass
class ClientTensors:
    """A tokenised split: right-padded ids and mask [N, S], labels [N], optional cached prefix [N, S, H].

    Choices scored by their likelihood (``tokenize_choices``): C rows a example, example-major ([N*C, S]:
    row n*C + c is example n's context followed by its choice c), and ``target_mask_NS`` [N*C, S] marks
    the choice's tokens; a batch of B examples holds their B*C rows."""

    input_ids_NS: torch.Tensor
    attention_mask_NS: torch.Tensor
    labels_N: torch.Tensor
    prefix_hidden_NSH: torch.Tensor | None = None
    trim: bool = False  # each batch padded to its own longest sequence, not to S (train.padding = "longest")
    target_mask_NS: torch.Tensor | None = None  # choices scored by likelihood: 1 on each choice's tokens
    choices: int = 1  # rows a example (C)

    def __len__(self) -> int:
        return int(self.labels_N.shape[0])

    @classmethod
    def concat(cls, parts: list[ClientTensors]) -> ClientTensors:
        """The splits one after the other (the centralised baseline's union of the clients' data)."""
        def cat(name: str) -> torch.Tensor | None:
            tensors = [getattr(p, name) for p in parts]
            return None if tensors[0] is None else torch.cat(tensors)
        if len({(p.trim, p.choices) for p in parts}) > 1:
            raise ValueError("splits of different padding or choice counts cannot be joined")
        return cls(cat("input_ids_NS"), cat("attention_mask_NS"), cat("labels_N"), cat("prefix_hidden_NSH"),
                   trim=parts[0].trim, target_mask_NS=cat("target_mask_NS"), choices=parts[0].choices)

    def batch(self, idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        if self.choices > 1:
            idx = (idx[:, None] * self.choices + torch.arange(self.choices)).reshape(-1)
        mask_BS = self.attention_mask_NS[idx]
        S = max(int(mask_BS.sum(1).max()), 1) if self.trim and len(idx) else mask_BS.shape[1]
        out = {"input_ids_BS": self.input_ids_NS[idx, :S].to(device), "attention_mask_BS": mask_BS[:, :S].to(device)}
        if self.prefix_hidden_NSH is not None:
            out["prefix_hidden_BSH"] = self.prefix_hidden_NSH[idx, :S].to(device)
        if self.target_mask_NS is not None:
            out["target_mask_BS"] = self.target_mask_NS[idx, :S].to(device)
        return out


def tokenize(tokenizer, texts: list[str], labels: list[int], max_length: int, trim: bool = False) -> ClientTensors:
    """Right-padded to ``max_length``; ``trim``: each batch later cut to its own longest sequence."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return ClientTensors(enc["input_ids"], enc["attention_mask"], torch.tensor(labels, dtype=torch.long), trim=trim)


def tokenize_choices(tokenizer, contexts: list[str], choices: list[list[str]], labels: list[int], max_length: int,
                     trim: bool = False) -> ClientTensors:
    """Each example's context followed by each of its C choices, one row each (``ClientTensors``' choice
    layout), the choice's tokens marked in ``target_mask_NS``. Context and choice are tokenised apart (the
    choice with its leading space, as lm-evaluation-harness does) and joined; a row longer than
    ``max_length`` loses the start of its context, never its choice (which keeps at most max_length - 1)."""
    C = len(choices[0]) if choices else 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids_NS = torch.full((len(contexts) * C, max_length), pad, dtype=torch.long)
    mask_NS = torch.zeros_like(ids_NS)
    target_NS = torch.zeros_like(ids_NS)
    for n, (context, options) in enumerate(zip(contexts, choices)):
        head = tokenizer.encode(context, add_special_tokens=True)
        for c, option in enumerate(options):
            tail = tokenizer.encode(" " + option.strip(), add_special_tokens=False)[: max_length - 1] or [pad]
            row = head[-(max_length - len(tail)):] + tail
            r = n * C + c
            ids_NS[r, : len(row)] = torch.tensor(row)
            mask_NS[r, : len(row)] = 1
            target_NS[r, len(row) - len(tail): len(row)] = 1
    return ClientTensors(ids_NS, mask_NS, torch.tensor(labels, dtype=torch.long), trim=trim, target_mask_NS=target_NS,
                         choices=C)


def autocast(model: nn.Module, device: torch.device):
    """Mixed precision for a model whose frozen base is in a 16-bit dtype (``model.compute_dtype``, set by
    ``models.build.set_precision_``): the forward runs under autocast in that dtype; nothing for float32."""
    dtype = getattr(model, "compute_dtype", torch.float32)
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def cache_prefix(model: nn.Module, data: ClientTensors, batch_size: int, device: torch.device) -> ClientTensors:
    """Run the frozen bottom layers once; later passes start from their output."""
    if getattr(model, "frozen_prefix", 0) == 0 or len(data) == 0:
        return data
    chunks = []
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        with autocast(model, device):
            chunks.append(model.encode_prefix(data.input_ids_NS[idx].to(device), data.attention_mask_NS[idx].to(device)).cpu())
    return replace(data, prefix_hidden_NSH=torch.cat(chunks))


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Each round allocates and frees optimiser states and parameter copies of tens of MB; glibc keeps
    the freed pages and fragments, and a client process grew by ~0.5 GB a round without this
    (benchmarks/memory_growth.py measures it).
    """
    name = ctypes.util.find_library("c")
    if name:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def trainable_state(model: nn.Module, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the named parameters (what a client uploads)."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().to("cpu", copy=True) for n in names}


@torch.no_grad()
def load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy tensors into the named parameters; every name and shape must match."""
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise KeyError(f"unknown parameter names: {unknown[:3]}")
    for name, value in state.items():
        if params[name].shape != value.shape:
            raise ValueError(f"shape mismatch for {name}: {tuple(value.shape)} vs {tuple(params[name].shape)}")
        params[name].copy_(value.to(params[name].device, params[name].dtype))


@dataclass
class TrainResult:
    loss: float
    num_examples: int
    steps: int
    routing: ModelRoutingStatistics  # over the real tokens of the training passes
    tokens: int = 0  # non-padding tokens trained on (forward and backward)
    seconds: float = 0.0  # wall time of the local training loop


def _proximal_term(model: nn.Module, anchor: dict[str, torch.Tensor]) -> torch.Tensor:
    """FedProx (Li et al. 2020, arXiv 1812.06127): ||w - w_global||^2 over trainable parameters."""
    params = dict(model.named_parameters())
    return sum(((params[n] - w0) ** 2).sum() for n, w0 in anchor.items())


def round_seed(run_seed: int, server_round: int, partition_id: int | None) -> int:
    """The seed of one round of local training (data order, dropout): client ``partition_id``'s, or, for
    None, the centralised model's (whose formula predates the clients' and is kept, so that stored runs
    keep their numbers)."""
    if partition_id is None:
        return run_seed * 100_003 + server_round
    return run_seed * 100_003 + server_round * 1_009 + partition_id


def train_local(model: nn.Module, adapter: MoEAdapter, data: ClientTensors, names: tuple[str, ...],
                cfg: TrainConfig, seed: int, proximal_mu: float = 0.0, device: torch.device | None = None,
                on_step: Callable[[int, float], None] | None = None, aligner=None) -> TrainResult:
    """AdamW on the trainable parameters for ``local_steps`` or ``local_epochs`` over ``data``.

    The routing statistics of every strategy come from the same forward passes (``RoutingObserver``);
    ``aligner`` (a ``training.alignment.ClientAligner``) adds FedAlign-MoE's gate regulariser to the loss.
    """
    device = device or torch.device("cpu")
    params = dict(model.named_parameters())
    optimizer = torch.optim.AdamW([params[n] for n in names], lr=cfg.lr, weight_decay=cfg.weight_decay)
    anchor = {n: params[n].detach().clone() for n in names} if proximal_mu > 0 else None
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout draws from the global generator: same seed, same masks, whatever ran before
    steps_per_epoch = -(-len(data) // cfg.batch_size)
    total = cfg.local_steps if cfg.local_steps is not None else cfg.local_epochs * steps_per_epoch
    observer = RoutingObserver(adapter)  # before training moves the routers: o compares with the global ones
    model.train()
    loss_sum, seen, step, order = 0.0, 0, 0, torch.empty(0, dtype=torch.long)
    tokens, t0 = 0, time.perf_counter()
    with adapter.recorder(keep_grad=False) as rec:
        while step < total and len(data) > 0:
            if order.numel() == 0:
                order = torch.randperm(len(data), generator=gen)
            idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
            batch = data.batch(idx, device)
            with autocast(model, device):
                logits_BC = model(**batch)
            loss = F.cross_entropy(logits_BC.float(), data.labels_N[idx].to(device))
            total_loss = loss + (proximal_mu / 2) * _proximal_term(model, anchor) if anchor else loss
            keep_T = batch["attention_mask_BS"].reshape(-1).bool()
            if aligner is not None:
                reg = aligner.loss(rec.records, keep_T)
                total_loss = total_loss if reg is None else total_loss + reg
            observer.observe(rec.records, keep_T)
            optimizer.zero_grad(set_to_none=True)
            total_loss.backward()
            optimizer.step()
            loss_sum, seen, step = loss_sum + float(loss.detach()) * len(idx), seen + len(idx), step + 1
            tokens += int(batch["attention_mask_BS"].sum())
            if on_step is not None:
                on_step(step, float(loss.detach()))
    seconds = time.perf_counter() - t0
    del optimizer, anchor
    release_memory()
    return TrainResult(loss=loss_sum / max(seen, 1), num_examples=len(data), steps=step, routing=observer.result(),
                       tokens=tokens, seconds=seconds)


@torch.no_grad()
def evaluate(model: nn.Module, data: ClientTensors, batch_size: int, device: torch.device | None = None) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``data``."""
    device = device or torch.device("cpu")
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        with autocast(model, device):
            logits_BC = model(**data.batch(idx, device)).float()
        labels_B = data.labels_N[idx].to(device)
        loss_sum += float(F.cross_entropy(logits_BC, labels_B, reduction="sum"))
        correct += int((logits_BC.argmax(-1) == labels_B).sum())
    n = max(len(data), 1)
    return {"loss": loss_sum / n, "accuracy": correct / n, "num-examples": len(data)}


@torch.no_grad()
def routing_by_label(model: nn.Module, adapter: MoEAdapter, data: ClientTensors, num_labels: int, batch_size: int,
                     device: torch.device | None = None) -> torch.Tensor:
    """counts [L, K, E]: top-k selections of expert e by the real tokens of label-k examples, per MoE layer."""
    device = device or torch.device("cpu")
    model.eval()
    L, E, k = len(adapter.layout.layers), adapter.num_experts, adapter.top_k
    counts_LKE = torch.zeros(L, num_labels, E, dtype=torch.float64)
    with adapter.recorder() as rec:
        for start in range(0, len(data), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(data)))
            batch = data.batch(idx, device)
            with autocast(model, device):
                model(**batch)
            keep_T = batch["attention_mask_BS"].reshape(-1).bool().cpu()
            for l, r in enumerate(rec.records):
                real_T = r.real(keep_T)
                label_T = data.labels_N[idx].repeat_interleave(len(real_T) // len(idx))[real_T]
                chosen_TK = r.logits_TE.float().cpu()[real_T].topk(k, dim=-1).indices
                counts_LKE[l].index_put_((label_T[:, None].expand_as(chosen_TK), chosen_TK),
                                         torch.ones(chosen_TK.shape, dtype=torch.float64), accumulate=True)
    return counts_LKE
