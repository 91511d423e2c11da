"""Everything a run derives from its config before training: the data splits and the model.

Every process of a run (the server, each client, the standalone baselines) calls ``prepare_data``
with the same config and gets the same splits: loading and partitioning are seeded and cheap, so
nothing has to be shipped between processes but the config.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import torch
import transformers

from ..config import Config, UserError
from ..data import (
    LabeledText,
    domains,
    label_counts,
    load_source,
    partition,
    public_split,
    skew_summary,
    split_client,
    train_test_split,
)
from ..files import load_or_build
from ..models.build import (
    FOUR_BIT_BYTES,
    BuiltModel,
    build_model,
    check_tokenizer,
    parameter_numel,
    supports_meta,
)
from ..models.recipes import PublicCorpus
from ..runlog import RunLog
from .local import (
    ClientTensors,
    cache_prefix,
    tokenize,
    tokenize_choices,
    trainable_state,
)

PREFIX_CACHE_FORMAT = 1  # bump when encode_prefix changes what it computes
# federation.global_eval = "auto" evaluates the global model on a node once the frozen base is larger than
# this: the server then never holds the base (a second copy of a 13 GB base would not fit beside the worker)
NODE_EVAL_BASE_BYTES = 1_000_000_000


class RunSetupError(UserError):
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
    public: LabeledText | None = None  # data.public_fraction of the source, read by model recipes only


def prepare_data(cfg: Config) -> FederatedData:
    """Load, split (global test held out), partition over clients, split each client train/test.

    With ``data.holdout = "validation"`` the global and the clients' evaluation splits are validation
    splits carved from the training pool, and the test split is set aside unread.
    """
    d, p = cfg.data, cfg.partition
    source = load_source(d.source, path=d.path, text_column=d.text_column, label_column=d.label_column,
                         hf_config=d.hf_config, hf_split=d.hf_split, choice_scoring=d.choice_scoring,
                         group_column=d.group_column,
                         wordnet_dir=d.wordnet_dir, seed=cfg.seed)
    public, pool = public_split(source, d.public_fraction, d.public_seed) if d.public_fraction > 0 else (None, source)
    train, test = train_test_split(pool, d.test_fraction, seed=cfg.seed, max_train=d.max_train, max_test=d.max_test)
    if d.holdout == "validation":  # tuning: evaluate on data carved from the training pool only
        train, test = train_test_split(train, d.validation_fraction, seed=cfg.seed + 1)
    if p.num_clients > len(train.dataset):
        raise RunSetupError(f"{p.num_clients} clients but only {len(train.dataset)} training examples")
    parts = partition(train, p.scheme, p.num_clients, alpha=p.alpha, classes_per_client=p.classes_per_client,
                      seed=cfg.seed, min_partition_size=p.min_partition_size)
    splits = [split_client(part, d.local_test_fraction, seed=cfg.seed + c) for c, part in enumerate(parts)]
    key = source.partition_key
    names = source.label_names if key == "label" else sorted(set(source.dataset[key]))
    counts = label_counts([s[0] for s in splits], key, names)
    return FederatedData(source, test.dataset, [s[0] for s in splits], [s[1] for s in splits], counts, names, public)


def public_corpus(public: LabeledText | None, num_domains: int) -> PublicCorpus | None:
    """The public split as a model recipe reads it: texts, each one's group and its domain (``data.domains``)."""
    if public is None:
        return None
    domain_N, names = domains(public, num_domains)
    groups = list(public.dataset["group"])
    group_ids = {g: i for i, g in enumerate(sorted(set(groups)))}
    return PublicCorpus(list(public.dataset["text"]), [group_ids[g] for g in groups], domain_N.tolist(), names)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunSetupError("device = 'cuda' but no CUDA device is available")
    return torch.device(name)


def to_tensors(built: BuiltModel, ds, cfg: Config, device: torch.device, fingerprint: str | None = None) -> ClientTensors:
    """Tokenise a split and, for encoders with a frozen bottom, cache the frozen layers' output.

    With ``model.prefix_cache_dir`` set and a ``fingerprint`` of the frozen weights, the cached
    output is also kept on disk under a key of (fingerprint, device, batch size, token ids, mask):
    every run, seed and strategy over the same examples then computes it once.
    """
    if "choices" in ds.column_names:  # scored by likelihood: a row for each choice after its context
        return tokenize_choices(built.tokenizer, list(ds["text"]), list(ds["choices"]), list(ds["label"]),
                                cfg.data.max_length, trim=cfg.train.padding == "longest")
    data = tokenize(built.tokenizer, list(ds["text"]), list(ds["label"]), cfg.data.max_length,
                    trim=cfg.train.padding == "longest")
    cache_dir = cfg.model.prefix_cache_dir
    if getattr(built.model, "frozen_prefix", 0) == 0 or len(data) == 0 or cache_dir is None or fingerprint is None:
        return cache_prefix(built.model, data, cfg.train.eval_batch_size, device)
    versions = f"torch {torch.__version__}/transformers {transformers.__version__}/{PREFIX_CACHE_FORMAT}"
    digest = hashlib.sha256(f"{fingerprint}/{versions}/{device.type}/{cfg.train.eval_batch_size}".encode())
    digest.update(built.model.config.to_json_string().encode())  # attention implementation and the like
    for t in (data.input_ids_NS, data.attention_mask_NS):
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.contiguous().numpy().tobytes())
    path = Path(cache_dir).expanduser() / f"{digest.hexdigest()}.pt"

    def load(path: Path) -> ClientTensors | None:
        prefix_NSH = torch.load(path, weights_only=True)
        return replace(data, prefix_hidden_NSH=prefix_NSH) if prefix_NSH.shape[:2] == data.input_ids_NS.shape else None

    return load_or_build(path, load, lambda: cache_prefix(built.model, data, cfg.train.eval_batch_size, device),
                         lambda computed, tmp: torch.save(computed.prefix_hidden_NSH, tmp), "frozen prefix")[0]


def base_bytes(built: BuiltModel) -> int:
    """Bytes of the frozen parameters (the base that every worker holds once): ``FOUR_BIT_BYTES`` a weight
    for those held in 4 bits (``model.quantize``), their dtype's size for the rest."""
    keep, four_bit = set(built.trainable), set(built.four_bit)
    return int(sum(FOUR_BIT_BYTES * parameter_numel(p) if n in four_bit else p.numel() * p.element_size()
                   for n, p in built.model.named_parameters() if n not in keep))


def evaluates_on_node(cfg: Config, frozen_bytes: int) -> bool:
    """Whether the global model is evaluated by a node rather than by the server (``federation.global_eval``;
    "auto": a base larger than ``NODE_EVAL_BASE_BYTES`` that the server can build on the meta device)."""
    mode = cfg.federation.global_eval
    return mode == "node" or (mode == "auto" and supports_meta(cfg.model) and frozen_bytes > NODE_EVAL_BASE_BYTES)


@dataclass(eq=False)
class Workspace:
    """One process's view of a run: config, data, model on its device.

    The tokenised splits are cached on the workspace itself, so they live and die with it: a module-level
    cache keyed on workspaces kept a finished run's model and data alive while a comparison went on.
    """

    cfg: Config
    data: FederatedData
    built: BuiltModel
    device: torch.device
    _clients: OrderedDict[int, tuple[ClientTensors, ClientTensors]] = field(default_factory=OrderedDict, init=False,
                                                                            repr=False)
    max_cached_clients: int = 16  # a client process may serve hundreds of partitions: keep the latest few
    # the trainable parameters as built, before any round loaded others (a node's answer to the server's
    # request for the initial model when the server holds none); None where nobody will ask
    initial_trainable: dict | None = None

    @property
    def on_meta(self) -> bool:
        """Whether this workspace's model is structure only (the server of a run evaluated on nodes)."""
        return next(self.built.model.parameters()).device.type == "meta"

    @cached_property
    def prefix_fingerprint(self) -> str | None:
        """Fingerprint of the model's frozen bottom (None when nothing is cached)."""
        model = self.built.model
        return model.prefix_fingerprint() if getattr(model, "frozen_prefix", 0) else None

    def client(self, partition_id: int) -> tuple[ClientTensors, ClientTensors]:
        """Client ``partition_id``'s train and test tensors (tokenised once per workspace)."""
        if partition_id not in self._clients:
            self._clients[partition_id] = tuple(
                to_tensors(self.built, split[partition_id], self.cfg, self.device, self.prefix_fingerprint)
                for split in (self.data.client_train, self.data.client_test))
            while len(self._clients) > self.max_cached_clients:
                self._clients.popitem(last=False)
        self._clients.move_to_end(partition_id)
        return self._clients[partition_id]

    def global_test(self) -> ClientTensors:
        return self._global_test

    @cached_property
    def _global_test(self) -> ClientTensors:
        return to_tensors(self.built, self.data.global_test, self.cfg, self.device, self.prefix_fingerprint)


def build_for(cfg: Config, data: FederatedData, meta: bool = False) -> BuiltModel:
    """The run's model for its data (labels, task, the public split of a btx recipe); ``meta``: see ``build_model``."""
    built = build_model(cfg.model, data.source.label_names, data.source.task, seed=cfg.seed,
                        public=public_corpus(data.public, cfg.model.num_experts) if cfg.model.recipe == "btx" else None,
                        max_length=cfg.data.max_length, meta=meta, gradient_checkpointing=cfg.train.gradient_checkpointing)
    built.rows_per_example = data.source.rows_per_example
    return built


def open_workspace(cfg: Config, client_process: bool = False, server: bool = False,
                   data: FederatedData | None = None, meta_built: BuiltModel | None = None) -> Workspace:
    """Data and model for this process; ``client_process`` applies ``train.torch_threads``. ``server``: the
    server of a federated run, which builds its model on the meta device when the global model is
    evaluated on nodes (``evaluates_on_node``): it never holds the base. ``data``: ``prepare_data(cfg)``,
    and ``meta_built``: the server's meta-device model, when the caller has them already."""
    if client_process and cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    data = data if data is not None else prepare_data(cfg)
    texts = list(data.client_train[0]["text"][:64]) or list(data.global_test["text"][:64])
    if server and supports_meta(cfg.model):
        built = meta_built if meta_built is not None else build_for(cfg, data, meta=True)
        if evaluates_on_node(cfg, base_bytes(built)):
            check_tokenizer(built.tokenizer, texts, built.model, cfg.model.backbone)
            return Workspace(cfg, data, built, torch.device("meta"))
    built = build_for(cfg, data)
    check_tokenizer(built.tokenizer, texts, built.model, cfg.model.backbone)
    device = resolve_device(cfg.model.device)
    built.model.to(device)
    initial = trainable_state(built.model, built.trainable) if client_process and evaluates_on_node(cfg, base_bytes(built)) else None
    return Workspace(cfg, data, built, device, initial_trainable=initial)


@lru_cache(maxsize=2)
def cached_workspace(config_json: str) -> Workspace:
    """A process keeps one workspace per run config (Flower reuses client processes across rounds)."""
    return open_workspace(Config.from_json(config_json), client_process=True)


def open_log(ws: Workspace, resume_round: int | None = None, wall_seconds_before: float = 0.0) -> RunLog:
    """Start the run's files (or continue them after ``resume_round``): config.json, and partition.json
    (examples per client and class)."""
    log = RunLog(ws.cfg, ws.cfg.out_dir, resume_round, wall_seconds_before)
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
