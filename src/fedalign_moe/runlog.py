"""The files a run leaves behind: config.json, metrics.jsonl (one line a round), summary.json.

Every strategy, federated or standalone, writes through ``RunLog`` so that the CLI contract
(keys of metrics.jsonl and summary.json) is defined in one place. Every file is strict JSON (a
non-finite number is written as null) and whole files are replaced atomically; a resumed run keeps
the lines of the rounds its checkpoint holds and drops the rest. A run writes plain files; a stored
copy may keep a JSONL file gzip-compressed as ``NAME.gz`` (benchmarks/results does), and every reader
goes through ``stored``/``read_jsonl``, which take either.
"""

from __future__ import annotations

import gzip
import json
import math
import time
from pathlib import Path

from .config import Config
from .files import replace_atomically, write_atomic
from .records import RoundRecord, Summary
from .registry import spec

JSONL_FILES = ("metrics.jsonl", "routing.jsonl", "diagnostics.jsonl")
RUN_FILES = (*JSONL_FILES, "summary.json", "checkpoint.safetensors")  # a new run starts them afresh


def finite(obj):
    """``obj`` with every NaN or infinity replaced by None (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    """Strict JSON: non-finite numbers become null."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def save_figure(fig, path: Path, **savefig_kwargs) -> Path:
    """A matplotlib figure saved atomically (its format from ``path``'s suffix)."""
    path = Path(path)
    replace_atomically(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip("."), **savefig_kwargs))
    return path


def stored(path: Path) -> Path:
    """``path``, or its gzip-compressed copy ``path.gz`` where only that exists (stored results keep their
    per-round files compressed); ``path`` itself where neither does."""
    path = Path(path)
    if not path.exists():
        compressed = path.with_name(path.name + ".gz")
        if compressed.exists():
            return compressed
    return path


def read_stored_text(path: Path) -> str:
    """The text of ``path``, or of ``path.gz`` decompressed where only that exists."""
    path = stored(path)
    if path.name.endswith(".gz"):
        return gzip.decompress(path.read_bytes()).decode("utf-8")
    return path.read_text()


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSONL file, or of its ``.gz`` copy (a line cut short by a kill is skipped)."""
    if not stored(path).exists():
        return []
    out = []
    for line in read_stored_text(path).splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def read_rounds(path: Path) -> list[RoundRecord]:
    """A run's metrics.jsonl (or its ``.gz`` copy), one typed record a round."""
    return [RoundRecord.from_json(raw) for raw in read_jsonl(path)]


def read_summary(path: Path) -> dict | None:
    """A run's summary.json, or None when it is missing or damaged (the run then counts as unfinished)."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return summary if isinstance(summary, dict) else None


class RunLog:
    """Appends round records and writes the run's summary.

    ``resume_round``: continue a run whose checkpoint holds that round: the JSONL files keep their
    lines up to it and ``wall_seconds_before`` is added to the summary's wall time.
    """

    def __init__(self, cfg: Config, out_dir: str | Path, resume_round: int | None = None, wall_seconds_before: float = 0.0):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out / "metrics.jsonl"
        if resume_round is None:
            write_atomic(self.out / "config.json", cfg.model_dump_json(indent=2))
            for name in RUN_FILES:
                (self.out / name).unlink(missing_ok=True)
            for name in JSONL_FILES:  # a stored copy's compressed files would outlive the new run's plain ones
                (self.out / f"{name}.gz").unlink(missing_ok=True)
            self.metrics_path.write_text("")
            self.rounds: list[RoundRecord] = []
        else:
            (self.out / "summary.json").unlink(missing_ok=True)
            for name in JSONL_FILES:
                kept = [r for r in read_jsonl(self.out / name) if r.get("round", 0) <= resume_round]
                write_atomic(self.out / name, "".join(dumps(r) + "\n" for r in kept))
                (self.out / f"{name}.gz").unlink(missing_ok=True)  # the plain file now holds its lines
            self.rounds = read_rounds(self.metrics_path)
        self.started = time.perf_counter() - wall_seconds_before
        self.tracker = None
        if cfg.output.tensorboard:
            from .tracking import TensorBoardTracker

            self.tracker = TensorBoardTracker(self.out, first_round=(resume_round or 0) + 1)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def add_round(self, record: RoundRecord) -> None:
        self.rounds.append(record)
        self.add_jsonl("metrics.jsonl", record.to_json())

    def add_jsonl(self, name: str, record: dict) -> None:
        with (self.out / name).open("a") as f:
            f.write(dumps(record) + "\n")
        if self.tracker is not None:
            track = {"metrics.jsonl": self.tracker.round, "diagnostics.jsonl": self.tracker.diagnostics,
                     "routing.jsonl": self.tracker.routing}.get(name)
            if track is not None:
                track(finite(record))

    def write_json(self, name: str, obj) -> Path:
        path = self.out / name
        write_atomic(path, dumps(obj, indent=2))
        return path

    def summary(self, **extra) -> dict:
        """Write summary.json from the rounds so far plus ``extra`` fields; return it."""
        cfg = self.cfg
        head = dict(strategy=cfg.federation.strategy, strategy_revision=spec(cfg.federation.strategy).revision,
                    preset=cfg.preset, dataset=cfg.data.source, backbone=cfg.model.backbone, alpha=cfg.partition.alpha,
                    num_clients=cfg.partition.num_clients, rounds=cfg.federation.rounds, seed=cfg.seed)
        summary = finite(Summary.of(head, self.rounds, self.elapsed(), **extra).to_json())
        self.write_json("summary.json", summary)
        self.close()
        return summary

    def close(self) -> None:
        """Flush and close the TensorBoard writer, if any (a run that ends without a summary calls it too)."""
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
