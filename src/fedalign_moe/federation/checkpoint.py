"""The checkpoint a federated run writes after every round, and reads to resume.

One safetensors file, replaced atomically (written beside, then renamed), so a run killed at any
moment leaves either the previous round's checkpoint or this one, never a mixture:
- tensors ``global/<name>``: the global trainable parameters after the round;
- tensors ``strategy/<name>``: what the strategy carries to the next round (FedAlign-MoE's p_g, alpha);
- metadata: the round, the count of rounds without a new global model, the server's Python random
  state (Flower samples nodes with it), the wall time so far, and the run's config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..config import Config, UserError
from ..files import replace_atomically

FILE = "checkpoint.safetensors"


class CheckpointError(UserError):
    """A checkpoint is missing, damaged or belongs to another run; one line for the user."""


@dataclass
class Checkpoint:
    round: int
    global_state: dict[str, torch.Tensor]
    strategy_state: dict[str, torch.Tensor]
    idle_rounds: int
    random_state: tuple
    wall_seconds: float
    config_json: str

    def belongs_to(self, cfg: Config) -> bool:
        """Whether this checkpoint was written by a run of ``cfg`` (where files go aside)."""
        return Config.from_json(self.config_json).result_key() == cfg.result_key()


def save(out: Path, ckpt: Checkpoint) -> Path:
    """Write ``out/checkpoint.safetensors`` atomically."""
    tensors = {f"global/{n}": t.contiguous() for n, t in ckpt.global_state.items()}
    tensors.update({f"strategy/{n}": t.contiguous() for n, t in ckpt.strategy_state.items()})
    version, internal, gauss = ckpt.random_state
    metadata = {"round": str(ckpt.round), "idle_rounds": str(ckpt.idle_rounds), "wall_seconds": repr(ckpt.wall_seconds),
                "random_state": json.dumps([version, list(internal), gauss]), "config_json": ckpt.config_json}
    path = out / FILE
    replace_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path


def load(out: Path) -> Checkpoint:
    """Read ``out/checkpoint.safetensors``; ``CheckpointError`` names what is wrong."""
    path = out / FILE
    if not path.is_file():
        raise CheckpointError(f"no checkpoint in {out} ({FILE}): the run ended before its first round did; "
                              "start it again with `fedalign-moe run`")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        version, internal, gauss = json.loads(meta["random_state"])
        return Checkpoint(
            round=int(meta["round"]), idle_rounds=int(meta["idle_rounds"]), wall_seconds=float(meta["wall_seconds"]),
            global_state={n.removeprefix("global/"): t for n, t in tensors.items() if n.startswith("global/")},
            strategy_state={n.removeprefix("strategy/"): t for n, t in tensors.items() if n.startswith("strategy/")},
            random_state=(version, tuple(internal), gauss), config_json=meta["config_json"])
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"damaged checkpoint {path}: {err}") from None

