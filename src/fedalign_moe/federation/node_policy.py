"""The node's side of the trust boundary: what a client reads and writes is the node's decision.

The server's run config chooses the experiment (strategy, rounds, learning rate, model recipe, ...). On a
deployed SuperNode, every setting that names a place on the node's disk or its hardware comes from the
node's own ``--node-config``, and a run config that asks the node to read outside what it allows is refused
with ``NodePolicyError`` (the client replies with an error; the server logs it and drops the reply):

| node-config key | what it decides | default on a SuperNode |
|---|---|---|
| ``data-path`` | the file a file source (``csv``, ``jsonl``, ``json``, ``parquet``, ``file``) reads; replaces ``data.path`` | none: the run config's path must lie under ``data-roots`` |
| ``data-roots`` | folders (``:``-separated) under which a run config's ``data.path`` / ``data.wordnet_dir`` may lie | none: only built-in sources and ``data-path`` |
| ``model-roots`` | folders under which a checkpoint ``model.backbone`` may lie | none: only built-in backbones |
| ``allow-hub`` | ``true``: hub ids for data (``hf:``) and models may be fetched | false |
| ``allow-remote-code`` | ``true``: a checkpoint's own modelling code may run (``model.trust_remote_code``) | false |
| ``cache-dir`` | where the prefix cache and built models are kept (``prefix``/``models`` inside); ``none``: nothing is written | ``~/.cache/fedalign-moe`` (a simulation's too) |
| ``device`` | ``cpu``, ``cuda`` or ``auto`` | ``auto`` |

Flower's simulation runs every client inside ``fedalign-moe``'s own process tree, from the same user's
config: ``server_app.simulate`` marks its client processes with ``FEDALIGN_NODE_TRUST=run-config`` (an
environment variable of the node's processes, not something a message can set), and such a node takes the
run config as it is.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, UserError

TRUST_ENV = "FEDALIGN_NODE_TRUST"
# a node's caches by default: Flower's deployment runtime starts a process for every message, and each would
# otherwise recompute what the last one computed (an encoder's frozen prefix, a built or dequantised model)
DEFAULT_CACHE_DIR = "~/.cache/fedalign-moe"
FILE_SOURCES = ("csv", "jsonl", "json", "parquet", "file")


class NodePolicyError(UserError):
    """The run config asks this node for something its node config does not allow."""


def _roots(value) -> tuple[Path, ...]:
    return tuple(Path(p).expanduser().resolve() for p in str(value or "").split(":") if p.strip())


def _within(path: str, roots: tuple[Path, ...]) -> bool:
    """Whether ``path``, links resolved, lies inside one of ``roots``."""
    target = Path(path).expanduser().resolve()
    return any(target == root or root in target.parents for root in roots)


@dataclass(frozen=True)
class NodePolicy:
    """A node's own limits (from its node config); ``trust_run_config`` for simulation's client processes."""

    trust_run_config: bool = False
    data_path: str | None = None
    data_roots: tuple[Path, ...] = ()
    model_roots: tuple[Path, ...] = ()
    allow_hub: bool = False
    allow_remote_code: bool = False
    cache_dir: str | None = DEFAULT_CACHE_DIR  # None: nothing is written
    device: str = "auto"

    @classmethod
    def of_node(cls, node_config: Mapping, environ: Mapping[str, str] = os.environ) -> NodePolicy:
        if environ.get(TRUST_ENV) == "run-config":
            return cls(trust_run_config=True)
        device = str(node_config.get("device", "auto"))
        if device not in ("auto", "cpu", "cuda"):
            raise NodePolicyError(f"node config: device must be auto, cpu or cuda, got {device!r}")
        allow, remote = (str(node_config.get(k, "false")).lower() for k in ("allow-hub", "allow-remote-code"))
        for key, value in (("allow-hub", allow), ("allow-remote-code", remote)):
            if value not in ("true", "false"):
                raise NodePolicyError(f"node config: {key} must be true or false, got {value!r}")
        cache = str(node_config.get("cache-dir") or DEFAULT_CACHE_DIR)
        return cls(False, node_config.get("data-path") or None, _roots(node_config.get("data-roots")),
                   _roots(node_config.get("model-roots")), allow == "true", remote == "true",
                   None if cache == "none" else cache, device)

    def apply(self, cfg: Config) -> Config:
        """The config this node runs: the run config's experiment, the node's places and device."""
        if self.trust_run_config:
            return cfg
        if cfg.attack.kind != "none":
            raise NodePolicyError(f"the run config asks this node to attack (attack.kind = {cfg.attack.kind!r}): "
                                  "hostile clients exist in simulations only")
        data, model = cfg.data, cfg.model
        data_update = {}
        if data.source in FILE_SOURCES:
            if self.data_path is not None:
                data_update["path"] = self.data_path
            elif data.path is None or not _within(data.path, self.data_roots):
                raise NodePolicyError(f"the run config asks this node to read {data.path!r} (data.path), outside its "
                                      f"data roots {[str(r) for r in self.data_roots]}: set data-path or data-roots "
                                      "in the node config")
        if data.source.startswith("hf:") and not self.allow_hub:
            raise NodePolicyError(f"the run config asks this node to fetch {data.source!r} from the hub (data.source): "
                                  "set allow-hub=true in the node config to allow it")
        if data.wordnet_dir is not None and not _within(data.wordnet_dir, self.data_roots):
            raise NodePolicyError(f"the run config asks this node to read {data.wordnet_dir!r} (data.wordnet_dir), "
                                  f"outside its data roots {[str(r) for r in self.data_roots]}")
        if model.trust_remote_code and not self.allow_remote_code:
            raise NodePolicyError(f"the run config asks this node to run the modelling code of {model.backbone!r} "
                                  "(model.trust_remote_code): set allow-remote-code=true in the node config to allow it")
        if model.is_checkpoint:
            local = Path(model.backbone).expanduser().exists() or model.backbone.startswith(("/", ".", "~"))
            if local and not _within(model.backbone, self.model_roots):
                raise NodePolicyError(f"the run config asks this node to load {model.backbone!r} (model.backbone), "
                                      f"outside its model roots {[str(r) for r in self.model_roots]}: set model-roots "
                                      "in the node config")
            if not local and not self.allow_hub:
                raise NodePolicyError(f"the run config asks this node to fetch {model.backbone!r} from the hub "
                                      "(model.backbone): set allow-hub=true in the node config to allow it")
        base = None if self.cache_dir is None else Path(self.cache_dir).expanduser()
        model_update = {"prefix_cache_dir": None if base is None else str(base / "prefix"),
                        "build_cache_dir": None if base is None else str(base / "models"), "device": self.device}
        return cfg.model_copy(update={"data": data.model_copy(update=data_update),
                                      "model": model.model_copy(update=model_update)})
