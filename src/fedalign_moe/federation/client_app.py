"""The Flower ClientApp: local training and evaluation on one partition (Message API).

The server sends the run's config with every message, so a client needs nothing but its
``partition-id`` from the node config (set by the simulation engine, or by
``flower-supernode --node-config 'partition-id=3 num-partitions=10'`` in a deployment).
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..training.alignment import ClientAligner
from ..training.local import evaluate, load_state, train_local, trainable_state
from ..training.setup import Workspace, cached_workspace
from . import fedalign, fedmoe, keys

app = ClientApp()


def _workspace(msg: Message, context: Context) -> tuple[Workspace, int]:
    ws = cached_workspace(str(msg.content[keys.CONFIG][keys.RUN_CONFIG]))
    partition_id = int(context.node_config[keys.PARTITION_ID])
    if not 0 <= partition_id < ws.cfg.partition.num_clients:
        raise ValueError(f"partition-id {partition_id} outside 0..{ws.cfg.partition.num_clients - 1}")
    return ws, partition_id


def _receive(ws: Workspace, msg: Message) -> None:
    state = msg.content[keys.ARRAYS].to_torch_state_dict()
    load_state(ws.built.model, state)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on the local split; reply the update, metrics and routing statistics."""
    ws, pid = _workspace(msg, context)
    _receive(ws, msg)
    config = msg.content[keys.CONFIG]
    train_data, test_data = ws.client(pid)
    server_round = int(config[keys.SERVER_ROUND])
    seed = ws.cfg.seed * 100_003 + server_round * 1_009 + pid
    aligner = _aligner(ws, msg, seed)
    result = train_local(
        ws.built.model, ws.built.adapter, train_data, ws.built.trainable, ws.cfg.train, seed=seed,
        proximal_mu=float(config.get(keys.PROXIMAL_MU, 0.0)), device=ws.device, aligner=aligner,
    )
    local = evaluate(ws.built.model, test_data, ws.cfg.train.eval_batch_size, ws.device)
    metrics = MetricRecord({
        keys.NUM_EXAMPLES: result.num_examples,
        keys.PARTITION_ID: pid,
        keys.TRAIN_LOSS: result.loss,
        keys.TRAIN_STEPS: result.steps,
        keys.TRAIN_TOKENS: result.tokens,
        keys.TRAIN_SECONDS: result.seconds,
        keys.LOCAL_ACCURACY: local["accuracy"],
        keys.LOCAL_LOSS: local["loss"],
        keys.LOCAL_TEST_EXAMPLES: local["num-examples"],
        keys.ROUTING_P: result.routing.distribution_LE().reshape(-1).tolist(),
        keys.ROUTING_N: result.routing.topk_count_LE.reshape(-1).tolist(),
    })
    state = trainable_state(ws.built.model, ws.built.trainable)
    if ws.cfg.federation.strategy == "fedmoe":  # FedMoE uploads its sub-MoE only
        update, metrics[keys.FEDMOE_HELD] = fedmoe.pack_update(state, ws.built.adapter.layout, result.routing.topk_count_LE,
                                                               ws.cfg.federation.fedmoe_coverage)
    else:
        update = ArrayRecord(state)
    content = RecordDict({keys.ARRAYS: update, keys.METRICS: metrics})
    if aligner is not None:
        metrics[fedalign.REG_VALUE] = aligner.mean_regulariser()
        content[fedalign.STATS] = ArrayRecord(aligner.statistics())
    return Message(content=content, reply_to=msg)


def _aligner(ws: Workspace, msg: Message, seed: int) -> ClientAligner | None:
    """FedAlign-MoE's client side, when the server sent its state (p_g, alpha)."""
    if fedalign.STATE not in msg.content:
        return None
    state, config = msg.content[fedalign.STATE], msg.content[keys.CONFIG]
    return ClientAligner(ws.built.adapter, fedalign.to_tensor(state["p_g"]), fedalign.to_tensor(state["alpha"]),
                         float(config[fedalign.REG_LAMBDA]), float(config.get(fedalign.STATS_NOISE, 0.0)), seed)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the received (global) model on this client's own test split."""
    ws, pid = _workspace(msg, context)
    _receive(ws, msg)
    _, test_data = ws.client(pid)
    with torch.no_grad():
        res = evaluate(ws.built.model, test_data, ws.cfg.train.eval_batch_size, ws.device)
    metrics = MetricRecord({
        keys.NUM_EXAMPLES: max(res["num-examples"], 1),
        keys.PARTITION_ID: pid,
        keys.EVAL_ACCURACY: res["accuracy"],
        keys.EVAL_LOSS: res["loss"],
    })
    return Message(content=RecordDict({keys.METRICS: metrics}), reply_to=msg)
