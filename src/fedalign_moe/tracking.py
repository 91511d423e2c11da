"""Experiment tracking that works offline: TensorBoard event files beside a run's own files.

``RunLog`` hands every record it writes to a ``TensorBoardTracker`` when ``output.tensorboard`` is on:
the round's metrics as scalars, FedAlign-MoE's decisions (p_g, alpha, the aligned share of clients per
expert, the regulariser) as scalars, and each round's routing (clients x experts, per MoE layer) as an
image. Open them with ``tensorboard --logdir DIR``. The step is the federated round.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ROUND_SCALARS = {  # metrics.jsonl key -> TensorBoard tag
    "accuracy": "global/accuracy", "loss": "global/loss", "local_accuracy": "clients/own_test_accuracy",
    "train_loss": "clients/train_loss", "uplink_bytes": "communication/uplink_bytes",
    "downlink_bytes": "communication/downlink_bytes", "failures": "round/failures", "seconds": "round/seconds",
    "aggregate_seconds": "round/aggregate_seconds",
}


class TensorBoardTracker:
    """Writes one run's TensorBoard events to ``out/tensorboard``; ``first_round`` > 1 when resuming
    (events of later rounds left by the interrupted run are dropped, as its JSONL lines are)."""

    def __init__(self, out: Path, first_round: int = 1):
        from torch.utils.tensorboard import (
            SummaryWriter,  # needs the tensorboard package (a dependency)
        )

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=first_round if first_round > 1 else None)

    def round(self, record: dict) -> None:
        step = record["round"]
        for key, tag in ROUND_SCALARS.items():
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag, value, step)
        self.writer.add_scalar("round/adopted", float(record.get("adopted", True)), step)

    def diagnostics(self, record: dict) -> None:
        """FedAlign-MoE's decisions of one round (``diagnostics.jsonl``); FedMoE's sub-MoEs are left out."""
        step = record["round"]
        if record.get("reg_loss") is not None:
            self.writer.add_scalar("fedalign/regulariser", record["reg_loss"], step)
        clients = len(record.get("clients", [])) or 1
        for name in ("p_g", "alpha"):
            for l, row in enumerate(record.get(name, [])):
                for e, value in enumerate(row):
                    self.writer.add_scalar(f"fedalign/{name}/layer{l}/expert{e}", value, step)
        for l, experts in enumerate(record.get("aligned", [])):
            if not isinstance(experts, list):  # "not applied": no expert tensors travel in this layer
                continue
            for e, ids in enumerate(experts):
                self.writer.add_scalar(f"fedalign/aligned_share/layer{l}/expert{e}", len(ids) / clients, step)

    def routing(self, record: dict) -> None:
        """Each client's mean router probability per expert, one image per MoE layer (rows: clients)."""
        clients = record.get("clients") or {}
        if not clients:
            return
        order = sorted(clients, key=int)
        for l, layer in enumerate(record.get("layers", [])):
            p_CE = np.array([clients[c][l] for c in order], dtype=np.float32)
            self.writer.add_image(f"routing/layer{layer}", _heatmap(p_CE), record["round"], dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


def _heatmap(p_CE: np.ndarray, cell: int = 12) -> np.ndarray:
    """[C, E] probabilities as an RGB image (HWC, uint8) in matplotlib's "Blues", scaled to the largest
    value, ``cell`` pixels a value."""
    from matplotlib import colormaps

    v = np.clip(p_CE / max(float(p_CE.max()), 1e-12), 0, 1)
    rgb = (colormaps["Blues"](v)[..., :3] * 255).astype(np.uint8)
    return np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
