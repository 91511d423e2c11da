"""The floor and the ceiling of every table, with no federation at all.

- ``local``: each client trains its own copy of the initial model on its own data, round after round
  (one round = the same local epochs/steps as a federated round); nothing is exchanged. Reported:
  the mean over clients of each client's model on the global test split (``accuracy``) and on its
  own test split (``local_accuracy``).
- ``centralised``: one model trained on the union of all clients' training data, one epoch budget
  per round, evaluated on the global test split.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..records import ClientRow, RoundRecord, client_totals, weighted_mean
from ..runlog import RunLog
from .local import ClientTensors, evaluate, load_state, round_seed, train_local, trainable_state
from .setup import Workspace


def run_local(ws: Workspace, log: RunLog, on_round: Callable[[RoundRecord], None] | None = None) -> dict:
    """Every client alone: R rounds of local training, no aggregation."""
    cfg, model, names = ws.cfg, ws.built.model, ws.built.trainable
    n = cfg.partition.num_clients
    states = [trainable_state(model, names)] * n
    test = ws.global_test()
    for rnd in range(1, cfg.federation.rounds + 1):
        t0 = time.perf_counter()
        glob, rows = [], []
        for pid in range(n):
            train, own_test = ws.client(pid)
            load_state(model, states[pid])
            res = train_local(model, ws.built.adapter, train, names, cfg.train,
                              seed=round_seed(cfg.seed, rnd, pid), device=ws.device)
            states[pid] = trainable_state(model, names)
            g = evaluate(model, test, cfg.train.eval_batch_size, ws.device)
            o = evaluate(model, own_test, cfg.train.eval_batch_size, ws.device)
            glob.append(g)
            rows.append(ClientRow(pid, len(train), res.loss, o["accuracy"], len(own_test), res.tokens, round(res.seconds, 3)))
        record = RoundRecord(rnd, sum(g["accuracy"] for g in glob) / n, sum(g["loss"] for g in glob) / n,
                             uplink_bytes=0, downlink_bytes=0, failures=0, seconds=round(time.perf_counter() - t0, 3),
                             clients=tuple(rows), **client_totals(rows))
        log.add_round(record)
        if on_round:
            on_round(record)
    return log.summary()


def run_centralised(ws: Workspace, log: RunLog, on_round: Callable[[RoundRecord], None] | None = None) -> dict:
    """One model on all training data (the union of the clients' training splits)."""
    cfg, model, names = ws.cfg, ws.built.model, ws.built.trainable
    n = cfg.partition.num_clients
    union = ClientTensors.concat([ws.client(pid)[0] for pid in range(n)])
    own_tests = [ws.client(pid)[1] for pid in range(n)]
    test = ws.global_test()
    # Same budget as a federated round: every client's epochs, or all clients' steps together.
    steps = None if cfg.train.local_steps is None else n * cfg.train.local_steps
    train_cfg = cfg.train.model_copy(update={"local_steps": steps})
    for rnd in range(1, cfg.federation.rounds + 1):
        t0 = time.perf_counter()
        res = train_local(model, ws.built.adapter, union, names, train_cfg, seed=round_seed(cfg.seed, rnd, None), device=ws.device)
        g = evaluate(model, test, cfg.train.eval_batch_size, ws.device)
        own = [evaluate(model, t, cfg.train.eval_batch_size, ws.device)["accuracy"] for t in own_tests]
        record = RoundRecord(rnd, g["accuracy"], g["loss"], weighted_mean(own, [len(t) for t in own_tests]), res.loss,
                             uplink_bytes=0, downlink_bytes=0, failures=0, train_tokens=res.tokens,
                             train_seconds=round(res.seconds, 3), seconds=round(time.perf_counter() - t0, 3))
        log.add_round(record)
        if on_round:
            on_round(record)
    return log.summary()
