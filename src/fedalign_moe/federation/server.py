"""The server's round loop: configure, send, aggregate, evaluate, log, one round at a time.

Flower's ``Strategy.start`` runs the same hooks; the loop is written out here so that every round
can be measured (bytes each way, seconds), evaluated centrally on the global test split, and logged
line by line (nothing is lost if the run is interrupted).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from safetensors.torch import save_file

from ..config import Config
from ..runlog import RunLog, training_totals
from ..training.local import evaluate, load_state, release_memory, trainable_state
from ..training.setup import Workspace
from . import keys
from .strategies import make_strategy


def record_bytes(content: RecordDict, key: str | None = None) -> int:
    """Payload bytes of the arrays in a message, or in its array record ``key`` only.

    Flower serialises each array as one numpy buffer; a missing ``key`` counts 0.
    """
    records = content.array_records
    chosen = records.values() if key is None else [records[key]] if key in records else []
    return sum(len(array.data) for rec in chosen for array in rec.values())


def client_rows(replies: Iterable[Message]) -> list[dict]:
    """Per-client facts of a training round, from the replies that carry content."""
    rows = []
    for msg in replies:
        if msg.has_error():
            continue
        m = msg.content[keys.METRICS]
        rows.append({
            "partition_id": int(m[keys.PARTITION_ID]),
            "num_examples": int(m[keys.NUM_EXAMPLES]),
            "train_loss": float(m[keys.TRAIN_LOSS]),
            "local_accuracy": float(m[keys.LOCAL_ACCURACY]),
            "local_test_examples": int(m[keys.LOCAL_TEST_EXAMPLES]),
            "train_tokens": int(m[keys.TRAIN_TOKENS]) if keys.TRAIN_TOKENS in m else 0,
            "train_seconds": float(m[keys.TRAIN_SECONDS]) if keys.TRAIN_SECONDS in m else 0.0,
        })
    return sorted(rows, key=lambda r: r["partition_id"])


def routing_by_client(replies: Iterable[Message], num_layers: int) -> dict[str, list]:
    """partition id -> routing distribution [L][E] reported with the update."""
    out = {}
    for msg in replies:
        if not msg.has_error():
            m = msg.content[keys.METRICS]
            p = list(m[keys.ROUTING_P])
            per_layer = len(p) // max(num_layers, 1)
            out[str(int(m[keys.PARTITION_ID]))] = [p[l * per_layer:(l + 1) * per_layer] for l in range(num_layers)]
    return out


def _reply_order(msg: Message) -> tuple[int, int]:
    """Aggregate in partition order, not arrival order, so a seeded run gives the same floats every time."""
    if msg.has_error():
        return (1, 0)
    return (0, int(msg.content[keys.METRICS][keys.PARTITION_ID]))


def _mean_metric(replies: list[Message], key: str) -> float | None:
    values = [float(m.content[keys.METRICS][key]) for m in replies if not m.has_error() and key in m.content[keys.METRICS]]
    return sum(values) / len(values) if values else None


def _weighted_local_accuracy(rows: list[dict]) -> float | None:
    n = sum(r["local_test_examples"] for r in rows)
    return sum(r["local_accuracy"] * r["local_test_examples"] for r in rows) / n if n else None


def run_federation(grid: Grid, ws: Workspace, log: RunLog,
                   on_round: Callable[[dict], None] | None = None) -> dict:
    """Run ``cfg.federation.rounds`` rounds of the configured Flower strategy; return the summary."""
    cfg: Config = ws.cfg
    strategy = make_strategy(cfg, ws.built.layout)
    model, names = ws.built.model, ws.built.trainable
    arrays = ArrayRecord(trainable_state(model, names))
    test = ws.global_test()
    silent, stopped = 0, None
    for server_round in range(1, cfg.federation.rounds + 1):
        t0 = time.perf_counter()
        config = ConfigRecord({keys.RUN_CONFIG: cfg.to_json()})
        messages = list(strategy.configure_train(server_round, arrays, config, grid))
        downlink = sum(record_bytes(m.content) for m in messages)
        replies = sorted(grid.send_and_receive(messages, timeout=cfg.federation.round_timeout), key=_reply_order)
        sizes = [(record_bytes(m.content), record_bytes(m.content, keys.ARRAYS)) for m in replies if not m.has_error()]
        uplink = sum(total for total, _ in sizes)
        stats_uplink = sum(total - model for total, model in sizes)  # everything beside the model update
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:
            arrays = new_arrays
        load_state(model, arrays.to_torch_state_dict())
        release_memory()
        result = evaluate(model, test, cfg.train.eval_batch_size, ws.device)
        rows = client_rows(replies)
        record = {
            "round": server_round, "accuracy": result["accuracy"], "loss": result["loss"],
            "local_accuracy": _weighted_local_accuracy(rows),
            "train_loss": sum(r["train_loss"] * r["num_examples"] for r in rows) / max(sum(r["num_examples"] for r in rows), 1),
            "uplink_bytes": uplink, "downlink_bytes": downlink, "stats_uplink_bytes": stats_uplink,
            "failures": len(messages) - len(rows), **training_totals(rows),
            "seconds": round(time.perf_counter() - t0, 3), "clients": rows,
        }
        log.add_round(record)
        layers = [layer.index for layer in ws.built.layout.layers]
        log.add_jsonl("routing.jsonl", {"round": server_round, "layers": layers,
                                        "clients": routing_by_client(replies, len(layers))})
        if hasattr(strategy, "diagnostics") and rows:  # no reply, no decision: do not repeat the last one
            log.add_jsonl("diagnostics.jsonl", {"round": server_round, "reg_loss": _mean_metric(replies, "reg-loss"),
                                                "stats_uplink_bytes": stats_uplink, **strategy.diagnostics()})
        if on_round is not None:
            on_round(record)
        silent = silent + 1 if not rows else 0
        limit = cfg.federation.stop_after_silent_rounds
        if limit is not None and silent >= limit:
            stopped = (f"stopped after round {server_round}: no client replied in the last {silent} rounds "
                       "(client processes died? see the log)")
            break
    save_file({n: t.contiguous() for n, t in arrays.to_torch_state_dict().items()}, str(log.out / "global_trainable.safetensors"))
    return _final_evaluation(grid, strategy, arrays, cfg, log, stopped)


def _final_evaluation(grid: Grid, strategy, arrays: ArrayRecord, cfg: Config, log: RunLog, stopped: str | None) -> dict:
    """The final global model on every client's own test split; then the summary."""
    config = ConfigRecord({keys.RUN_CONFIG: cfg.to_json()})
    messages = list(strategy.configure_evaluate(cfg.federation.rounds, arrays, config, grid))
    replies = [m for m in grid.send_and_receive(messages, timeout=cfg.federation.round_timeout) if not m.has_error()]
    per_client = {
        str(int(m.content[keys.METRICS][keys.PARTITION_ID])): float(m.content[keys.METRICS][keys.EVAL_ACCURACY])
        for m in replies
    }
    mean = sum(per_client.values()) / len(per_client) if per_client else None
    return log.summary(global_model_on_client_tests=mean, global_model_on_client_tests_by_client=per_client,
                       stopped_early=stopped)
