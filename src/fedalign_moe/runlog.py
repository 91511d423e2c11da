"""The files a run leaves behind: config.json, metrics.jsonl (one line a round), summary.json.

Every strategy, federated or standalone, writes through ``RunLog`` so that the CLI contract
(keys of metrics.jsonl and summary.json) is defined in one place.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .config import Config, strategy_revision

ROUND_KEYS = ("round", "accuracy", "loss", "uplink_bytes", "downlink_bytes", "seconds")
RUN_FILES = ("metrics.jsonl", "routing.jsonl", "diagnostics.jsonl", "summary.json")  # a new run starts them afresh


class RunLog:
    """Appends round records and writes the run's summary."""

    def __init__(self, cfg: Config, out_dir: str | Path):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(cfg.model_dump_json(indent=2))
        for name in RUN_FILES:
            (self.out / name).unlink(missing_ok=True)
        self.metrics_path = self.out / "metrics.jsonl"
        self.metrics_path.write_text("")
        self.rounds: list[dict] = []
        self.started = time.perf_counter()

    def add_round(self, record: dict) -> None:
        missing = [k for k in ROUND_KEYS if k not in record]
        if missing:
            raise KeyError(f"round record lacks {missing}")
        self.rounds.append(record)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def add_jsonl(self, name: str, record: dict) -> None:
        with (self.out / name).open("a") as f:
            f.write(json.dumps(record) + "\n")

    def write_json(self, name: str, obj) -> Path:
        path = self.out / name
        path.write_text(json.dumps(obj, indent=2))
        return path

    def summary(self, **extra) -> dict:
        """Write summary.json from the rounds so far plus ``extra`` fields; return it."""
        acc = [r["accuracy"] for r in self.rounds]
        local = [r["local_accuracy"] for r in self.rounds if r.get("local_accuracy") is not None]
        summary = {
            "strategy": self.cfg.federation.strategy,
            "strategy_revision": strategy_revision(self.cfg.federation.strategy),
            "preset": self.cfg.preset,
            "dataset": self.cfg.data.source,
            "backbone": self.cfg.model.backbone,
            "alpha": self.cfg.partition.alpha,
            "num_clients": self.cfg.partition.num_clients,
            "rounds": self.cfg.federation.rounds,
            "seed": self.cfg.seed,
            "final_accuracy": acc[-1] if acc else None,
            "best_accuracy": max(acc) if acc else None,
            "last5_accuracy": float(np.mean(acc[-5:])) if acc else None,
            "accuracy_per_round": acc,
            "final_local_accuracy": local[-1] if local else None,
            "last5_local_accuracy": float(np.mean(local[-5:])) if local else None,
            "local_accuracy_per_round": local,
            "uplink_bytes_total": int(sum(r["uplink_bytes"] for r in self.rounds)),
            "downlink_bytes_total": int(sum(r["downlink_bytes"] for r in self.rounds)),
            "wall_seconds": round(time.perf_counter() - self.started, 2),
            **_throughput(self.rounds),
        }
        summary.update(extra)
        self.write_json("summary.json", summary)
        return summary


def _throughput(rounds: list[dict]) -> dict:
    """Training tokens of the run, and tokens per second of one training process (summed tokens over
    summed per-client training seconds: what one client process sustains, whatever ran in parallel)."""
    totals = training_totals(rounds)  # a round's totals sum the same way as a client row's figures
    tokens, seconds = int(totals["train_tokens"]), totals["train_seconds"]
    return {"train_tokens_total": tokens,
            "train_tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None}


def training_totals(rows: list[dict]) -> dict:
    """A round's training tokens, and its training seconds summed over clients (process-seconds)."""
    return {"train_tokens": sum(r.get("train_tokens", 0) for r in rows),
            "train_seconds": round(sum(r.get("train_seconds", 0.0) for r in rows), 3)}
