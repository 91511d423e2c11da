"""Everything a run derives from its config before training: the data splits and the model.

Every process of a run (the server, each client, the standalone baselines) calls ``prepare_data``
with the same config and gets the same splits: loading and partitioning are seeded and cheap, so
nothing has to be shipped between processes but the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..config import Config
from ..data import LabeledText, label_counts, load_source, partition, skew_summary, split_client, train_test_split
from ..models.build import BuiltModel, build_model
from ..runlog import RunLog
from .local import ClientTensors, cache_prefix, tokenize


class RunSetupError(ValueError):
    """The data cannot be arranged as configured; one line for the user."""


@dataclass
class FederatedData:
    """Global test split plus each client's own train and test splits (``datasets.Dataset``)."""

    source: LabeledText
    global_test: object
    client_train: list
    client_test: list
    counts_CK: np.ndarray  # training examples per client and partition class
    count_names: list[str]


def prepare_data(cfg: Config) -> FederatedData:
    """Load, split (global test held out), partition over clients, split each client train/test."""
    d, p = cfg.data, cfg.partition
    source = load_source(d.source, path=d.path, text_column=d.text_column, label_column=d.label_column,
                         wordnet_dir=d.wordnet_dir, seed=cfg.seed)
    train, test = train_test_split(source, d.test_fraction, seed=cfg.seed, max_train=d.max_train, max_test=d.max_test)
    if p.num_clients > len(train.dataset):
        raise RunSetupError(f"{p.num_clients} clients but only {len(train.dataset)} training examples")
    parts = partition(train, p.scheme, p.num_clients, alpha=p.alpha, classes_per_client=p.classes_per_client,
                      seed=cfg.seed, min_partition_size=p.min_partition_size)
    splits = [split_client(part, d.local_test_fraction, seed=cfg.seed + c) for c, part in enumerate(parts)]
    key = source.partition_key
    names = source.label_names if key == "label" else sorted(set(source.dataset[key]))
    counts = label_counts([s[0] for s in splits], key, names)
    return FederatedData(source, test.dataset, [s[0] for s in splits], [s[1] for s in splits], counts, names)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunSetupError("device = 'cuda' but no CUDA device is available")
    return torch.device(name)


def to_tensors(built: BuiltModel, ds, cfg: Config, device: torch.device) -> ClientTensors:
    """Tokenise a split and, for encoders with a frozen bottom, cache the frozen layers' output."""
    data = tokenize(built.tokenizer, list(ds["text"]), list(ds["label"]), cfg.data.max_length)
    return cache_prefix(built.model, data, cfg.train.eval_batch_size, device)


@dataclass(eq=False)  # hashed by identity: the caches below key on it
class Workspace:
    """One process's view of a run: config, data, model on its device."""

    cfg: Config
    data: FederatedData
    built: BuiltModel
    device: torch.device

    def client(self, partition_id: int) -> tuple[ClientTensors, ClientTensors]:
        return _client_tensors(self, partition_id)

    def global_test(self) -> ClientTensors:
        return _global_test(self)


def open_workspace(cfg: Config, client_process: bool = False) -> Workspace:
    """Data and model for this process; ``client_process`` applies ``train.torch_threads``."""
    if client_process and cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    data = prepare_data(cfg)
    built = build_model(cfg.model, data.source.label_names, data.source.task, seed=cfg.seed)
    device = resolve_device(cfg.model.device)
    built.model.to(device)
    return Workspace(cfg, data, built, device)


@lru_cache(maxsize=16)
def _client_tensors(ws: Workspace, partition_id: int) -> tuple[ClientTensors, ClientTensors]:
    return (to_tensors(ws.built, ws.data.client_train[partition_id], ws.cfg, ws.device),
            to_tensors(ws.built, ws.data.client_test[partition_id], ws.cfg, ws.device))


@lru_cache(maxsize=2)
def _global_test(ws: Workspace) -> ClientTensors:
    return to_tensors(ws.built, ws.data.global_test, ws.cfg, ws.device)


@lru_cache(maxsize=2)
def cached_workspace(config_json: str) -> Workspace:
    """A process keeps one workspace per run config (Flower reuses client processes across rounds)."""
    return open_workspace(Config.from_json(config_json), client_process=True)


def open_log(ws: Workspace) -> RunLog:
    """Start the run's files: config.json, and partition.json (examples per client and class)."""
    log = RunLog(ws.cfg, ws.cfg.out_dir)
    d = ws.data
    log.write_json("partition.json", {
        "partition_key": d.source.partition_key,
        "names": d.count_names,
        "counts": d.counts_CK.tolist(),
        "skew": skew_summary(d.counts_CK),
        "client_test_sizes": [len(t) for t in d.client_test],
        "global_test_size": len(d.global_test),
    })
    return log
