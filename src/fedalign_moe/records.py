"""What a run records: one ``RoundRecord`` a round (a line of metrics.jsonl), with a ``ClientRow`` for each
client that trained, and one ``Summary`` at the end (summary.json).

Built here, typed and frozen; ``runlog.RunLog`` writes them and every reader of a round or a summary in
this package goes through ``from_json``. The files stay flat JSON objects (the keys researchers' scripts
read): the federated facts of a round (``Exchange``) sit beside the rest on the same line. A non-finite
number is written as null and read back as None.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


@dataclass(frozen=True)
class ClientRow:
    """One client's round: what it trained on and how it did on its own test split."""

    partition_id: int
    num_examples: int
    train_loss: float | None
    local_accuracy: float | None
    local_test_examples: int
    train_tokens: int
    train_seconds: float
    weight_bounded_to: float | None = None  # the screen bounded the weight its claimed examples would have had
    update_norm: float | None = None  # ||w_i - w_g||, as the screen's outlier rule compared it
    update_scaled_by: float | None = None  # the screen scaled the update down by this factor (its norm clip)

    def to_json(self) -> dict[str, Any]:
        raw = asdict(self)
        for optional in ("weight_bounded_to", "update_norm", "update_scaled_by"):
            if raw[optional] is None:
                raw.pop(optional)
        return raw

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ClientRow:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


@dataclass(frozen=True)
class Exchange:
    """What a federated round exchanged and decided (local and centralised runs exchange nothing)."""

    stats_uplink_bytes: int  # everything beside the model update
    sent: int
    replied: int
    failure_reasons: tuple[dict[str, Any], ...]  # node_id, partition_id, reason of each dropped reply
    adopted: bool
    not_adopted_reason: str | None
    aggregate_seconds: float
    screen_seconds: float  # part of aggregate_seconds


@dataclass(frozen=True)
class RoundRecord:
    """One round of any strategy. ``accuracy`` and ``loss``: the global model on the global test split (for
    ``local``, the mean of the clients' own models); None where no model could be evaluated."""

    round: int
    accuracy: float | None
    loss: float | None
    local_accuracy: float | None  # the clients' models on their own test splits, weighted by their sizes
    train_loss: float | None
    uplink_bytes: int
    downlink_bytes: int
    failures: int
    train_tokens: int
    train_seconds: float  # summed over clients: process-seconds
    seconds: float
    clients: tuple[ClientRow, ...] | None = None  # None: one model trained on the union (centralised)
    exchange: Exchange | None = None

    @property
    def adopted(self) -> bool:
        return self.exchange is None or self.exchange.adopted

    def to_json(self) -> dict[str, Any]:
        """The metrics.jsonl line (non-finite numbers as None)."""
        raw: dict[str, Any] = {"round": self.round, "accuracy": _finite(self.accuracy), "loss": _finite(self.loss),
                               "local_accuracy": _finite(self.local_accuracy), "train_loss": _finite(self.train_loss),
                               "uplink_bytes": self.uplink_bytes, "downlink_bytes": self.downlink_bytes}
        if self.exchange is not None:
            ex = asdict(self.exchange)
            raw.update(stats_uplink_bytes=ex["stats_uplink_bytes"], sent=ex["sent"], replied=ex["replied"],
                       failures=self.failures, failure_reasons=list(ex["failure_reasons"]), adopted=ex["adopted"],
                       not_adopted_reason=ex["not_adopted_reason"], train_tokens=self.train_tokens,
                       train_seconds=self.train_seconds, aggregate_seconds=ex["aggregate_seconds"],
                       screen_seconds=ex["screen_seconds"])
        else:
            raw.update(failures=self.failures, train_tokens=self.train_tokens, train_seconds=self.train_seconds)
        raw["seconds"] = self.seconds
        if self.clients is not None:
            raw["clients"] = [c.to_json() for c in self.clients]
        return raw

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> RoundRecord:
        """A metrics.jsonl line, also one written before a field existed (it reads as 0 or None)."""
        missing = [k for k in ("round", "accuracy", "loss", "uplink_bytes", "downlink_bytes", "seconds") if k not in raw]
        if missing:
            raise KeyError(f"round record lacks {missing}")
        exchange = None
        if "adopted" in raw:
            exchange = Exchange(raw.get("stats_uplink_bytes", 0), raw.get("sent", 0), raw.get("replied", 0),
                                tuple(raw.get("failure_reasons", ())), raw["adopted"], raw.get("not_adopted_reason"),
                                raw.get("aggregate_seconds", 0.0), raw.get("screen_seconds", 0.0))
        clients = None if raw.get("clients") is None else tuple(ClientRow.from_json(c) for c in raw["clients"])
        return cls(raw["round"], raw["accuracy"], raw["loss"], raw.get("local_accuracy"), raw.get("train_loss"),
                   raw["uplink_bytes"], raw["downlink_bytes"], raw.get("failures", 0), raw.get("train_tokens", 0),
                   raw.get("train_seconds", 0.0), raw["seconds"], clients, exchange)


def weighted_mean(values: list[float | None], weights: list[int]) -> float | None:
    """The mean of ``values`` weighted by ``weights``; None when they weigh nothing."""
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights, strict=True)) / total if total else None


def client_totals(rows: tuple[ClientRow, ...] | list[ClientRow]) -> dict[str, Any]:
    """A round's figures over its clients: own-test accuracy and train loss weighted by examples, and the
    training tokens and process-seconds summed."""
    return {"local_accuracy": weighted_mean([r.local_accuracy for r in rows], [r.local_test_examples for r in rows]),
            "train_loss": weighted_mean([r.train_loss for r in rows], [r.num_examples for r in rows]),
            "train_tokens": sum(r.train_tokens for r in rows),
            "train_seconds": round(sum(r.train_seconds for r in rows), 3)}


@dataclass(frozen=True)
class Summary:
    """A finished (or stopped) run: summary.json. Accuracies over rounds are the global model's on the
    global test split; ``local`` ones the clients' own models on their own test splits."""

    strategy: str
    strategy_revision: int
    preset: str
    dataset: str
    backbone: str
    alpha: float
    num_clients: int
    rounds: int
    seed: int
    final_accuracy: float | None
    best_accuracy: float | None
    last5_accuracy: float | None
    accuracy_per_round: list[float]
    final_local_accuracy: float | None
    last5_local_accuracy: float | None
    local_accuracy_per_round: list[float]
    uplink_bytes_total: int
    downlink_bytes_total: int
    failures_total: int
    rounds_not_adopted: list[int]
    wall_seconds: float
    train_tokens_total: int
    train_tokens_per_second: float | None
    extra: dict[str, Any] = field(default_factory=dict)  # what the runner adds (the run's config, final evaluation)

    @classmethod
    def of(cls, head: dict[str, Any], rounds: list[RoundRecord], wall_seconds: float, **extra) -> Summary:
        """The summary of ``rounds``; ``head``: the run's strategy, revision, preset, dataset, backbone,
        alpha, num_clients, rounds and seed."""
        acc = [a for a in (_finite(r.accuracy) for r in rounds) if a is not None]
        local = [a for a in (_finite(r.local_accuracy) for r in rounds) if a is not None]
        tokens, seconds = sum(r.train_tokens for r in rounds), round(sum(r.train_seconds for r in rounds), 3)
        return cls(**head,
                   final_accuracy=acc[-1] if acc else None, best_accuracy=max(acc) if acc else None,
                   last5_accuracy=float(np.mean(acc[-5:])) if acc else None, accuracy_per_round=acc,
                   final_local_accuracy=local[-1] if local else None,
                   last5_local_accuracy=float(np.mean(local[-5:])) if local else None, local_accuracy_per_round=local,
                   uplink_bytes_total=int(sum(r.uplink_bytes for r in rounds)),
                   downlink_bytes_total=int(sum(r.downlink_bytes for r in rounds)),
                   failures_total=int(sum(r.failures for r in rounds)),
                   rounds_not_adopted=[r.round for r in rounds if not r.adopted], wall_seconds=round(wall_seconds, 2),
                   train_tokens_total=int(tokens),
                   train_tokens_per_second=round(tokens / seconds, 1) if seconds > 0 else None, extra=extra)

    def to_json(self) -> dict[str, Any]:
        raw = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        raw.update(self.extra)
        return raw
