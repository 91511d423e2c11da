"""The server's round loop: configure, send, screen and aggregate, adopt, evaluate, log, checkpoint.

Flower's ``Strategy.start`` runs the same hooks; the loop is written out here so that every round can
be measured (bytes each way, seconds), evaluated centrally on the global test split, logged line by
line, checkpointed (``fedalign-moe resume`` continues from the last round), and so that a broken
aggregate is never adopted: an aggregate with NaN or Inf, or whose test loss is not finite, is
discarded and the round keeps the previous global model.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid
from safetensors.torch import save_file

from ..config import Config
from ..files import replace_atomically
from ..records import ClientRow, Exchange, RoundRecord, client_totals
from ..runlog import RunLog
from ..training.local import release_memory
from ..training.setup import Workspace
from . import checkpoint, protocol
from .checkpoint import Checkpoint
from .global_eval import NoNodeAnswer, connected_nodes, global_model
from .protocol import ReplyError, TrainReply
from .screening import ROUND_RECORD, Failure, RoundOutcome, error_cause
from .strategies import make_strategy

logger = logging.getLogger(__name__)


def record_bytes(content: RecordDict, key: str | None = None) -> int:
    """Payload bytes of the arrays in a message, or in its array record ``key`` only.

    Flower serialises each array as one numpy buffer; a missing ``key`` counts 0.
    """
    records = content.array_records
    chosen = records.values() if key is None else [records[key]] if key in records else []
    return sum(len(array.data) for rec in chosen for array in rec.values())


def client_rows(replies: list[TrainReply], update_norms: dict[int, float] | None = None) -> tuple[ClientRow, ...]:
    """Per-client facts of a training round, from the replies that were used."""
    norms = update_norms or {}
    return tuple(ClientRow(r.partition_id, r.num_examples, r.figures.train_loss, r.figures.local_accuracy,
                           r.figures.local_test_examples, r.figures.train_tokens, r.figures.train_seconds,
                           weight_bounded_to=r.weight if r.weight_capped else None,
                           update_norm=norms.get(r.partition_id),
                           update_scaled_by=r.update_scale if r.update_scale < 1 else None) for r in replies)


def routing_by_client(replies: list[TrainReply]) -> dict[str, list]:
    """partition id -> routing distribution [L][E] reported with the update."""
    return {str(r.partition_id): r.routing.p_LE.tolist() for r in replies}


def failure_summary(failures: list[Failure], show: int = 2) -> str:
    """'2x timeout: no reply ..., 1x the client process died': the commonest reasons, counted."""
    causes = Counter(f.reason for f in failures).most_common()
    text = ", ".join(f"{n}x {reason}" for reason, n in causes[:show])
    return text + (f", and {len(causes) - show} other reasons" if len(causes) > show else "")


def wait_for_nodes(grid: Grid, cfg: Config, want: int) -> int | None:
    """Wait up to ``node_wait_seconds`` for ``want`` connected nodes; the count once there are at least
    ``min_available_nodes`` (logged when short of ``want``), None when there never were."""
    fed = cfg.federation
    connected = len(connected_nodes(grid, want, fed.node_wait_seconds))
    if connected < fed.min_available_nodes:
        return None
    if connected < want:
        logger.warning("going on with %d of %d nodes connected after waiting %g s", connected, want, fed.node_wait_seconds)
    return connected


def send_and_collect(grid: Grid, messages: list[Message], timeout: float | None,
                     on_reply: Callable[[int], None] | None = None,
                     interrupted: threading.Event | None = None) -> list[Message]:
    """Flower's ``Grid.send_and_receive``, calling ``on_reply(replies so far)`` as replies arrive (for a live
    display), and giving up waiting once ``interrupted`` is set (the replies of clients killed by the
    interrupt never come); with neither, Flower's own call."""
    if on_reply is None and interrupted is None:
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = set(grid.push_messages(messages))
    end = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while pending and (end is None or time.monotonic() < end) and not (interrupted and interrupted.is_set()):
        for msg in grid.pull_messages(list(pending)):
            pending.discard(msg.metadata.reply_to_message_id)
            replies.append(msg)
            if on_reply is not None:
                on_reply(len(replies))
        if pending:
            time.sleep(getattr(grid, "pull_interval", 1.0))
    return replies


class RunInterrupted(Exception):
    """The user interrupted the run (Ctrl-C): the round in flight is discarded, the last checkpoint stands."""


def _finite_state(arrays: ArrayRecord) -> bool:
    return all(torch.isfinite(t).all() for t in arrays.to_torch_state_dict().values())


class _Server:
    """One federated run's state on the server: the strategy, the global model and its evaluation."""

    def __init__(self, grid: Grid, ws: Workspace, log: RunLog, resume: Checkpoint | None,
                 on_reply: Callable[[int, int, int], None] | None = None, interrupted: threading.Event | None = None):
        self.grid, self.ws, self.log, self.cfg = grid, ws, log, ws.cfg
        self.on_reply = on_reply  # (round, replies so far, messages sent), for a live display
        self.interrupted = interrupted  # set by Ctrl-C (server_app.interrupt_sets)
        self.strategy = make_strategy(self.cfg, ws.built.layout, tuple(len(part) for part in ws.data.client_train),
                                      ws.data.source.rows_per_example)
        self.global_model = global_model(grid, ws)  # in this process, or on a node that holds the base
        self.first_round, self.idle = 1, 0
        if resume is not None:
            self.strategy.load_state_dict(resume.strategy_state)
            random.setstate(resume.random_state)
            self.first_round, self.idle = resume.round + 1, resume.idle_rounds
            self.arrays = ArrayRecord(resume.global_state)
        else:
            self.arrays = self.global_model.initial_state()
        self.current_eval: dict | None = None  # the global model's test result, once computed
        self.current_round = self.first_round - 1

    def adopt(self, new: ArrayRecord | None) -> str | None:
        """Make ``new`` the global model unless it is missing or broken; the reason when it is not adopted."""
        if new is None:
            return "no valid reply"
        if not _finite_state(new):
            return "the aggregate holds NaN or Inf"
        try:
            result = self.global_model.evaluate(self.current_round, new)
        except NoNodeAnswer as err:
            return f"no node evaluated it ({err})"
        if not math.isfinite(result["loss"]):
            return "the aggregate's test loss is not finite"
        self.arrays, self.current_eval = new, result
        return None

    def evaluation(self) -> dict:
        """The global model's test result (NaN, not kept, when no node could evaluate it)."""
        if self.current_eval is None:
            try:
                self.current_eval = self.global_model.evaluate(self.current_round, self.arrays)
            except NoNodeAnswer as err:
                logger.warning("%s", err)
                return {"loss": math.nan, "accuracy": math.nan, "num-examples": 0}
        return self.current_eval

    def train_round(self, server_round: int) -> tuple[RoundRecord, RoundOutcome]:
        """One round: its metrics record, and what the strategy made of its replies."""
        t0 = time.perf_counter()
        strategy, self.current_round = self.strategy, server_round
        messages = list(strategy.configure_train(server_round, self.arrays, protocol.round_config(self.cfg.to_json()), self.grid))
        downlink = sum(record_bytes(m.content) for m in messages)
        watch = None if self.on_reply is None else (lambda n: self.on_reply(server_round, n, len(messages)))
        if watch is not None:
            watch(0)
        received = (send_and_collect(self.grid, messages, self.cfg.federation.round_timeout, watch, self.interrupted)
                    if messages else [])
        sizes = [(record_bytes(m.content), record_bytes(m.content, protocol.ARRAYS) + record_bytes(m.content, protocol.UPDATE))
                 for m in received if not m.has_error()]
        t_aggregate = time.perf_counter()
        try:
            outcome, not_adopted = strategy.aggregate_round(server_round, received), None
        except Exception as err:  # noqa: BLE001 - the screen reads every reply first; this is the last net
            outcome, not_adopted = strategy.outcome, f"the aggregation raised {protocol.one_line(err)}"
        t_aggregate = time.perf_counter() - t_aggregate
        not_adopted = not_adopted or self.adopt(outcome.arrays)
        if not_adopted is None:
            strategy.commit(outcome)
        else:
            logger.warning("round %d keeps the previous global model: %s", server_round, not_adopted, extra=ROUND_RECORD)
        release_memory()
        result = self.evaluation()
        rows = client_rows(outcome.used, outcome.update_norms)
        exchange = Exchange(sum(total - model for total, model in sizes), len(messages), len(rows),
                            tuple(f.to_json() for f in outcome.dropped), not_adopted is None, not_adopted,
                            round(t_aggregate, 4), round(outcome.screen_seconds, 4))
        record = RoundRecord(server_round, result["accuracy"], result["loss"], uplink_bytes=sum(total for total, _ in sizes),
                             downlink_bytes=downlink, failures=len(outcome.dropped), seconds=round(time.perf_counter() - t0, 3),
                             clients=rows, exchange=exchange, **client_totals(rows))
        return record, outcome

    def check_interrupt(self, during: str, kept_round: int) -> None:
        """Raise ``RunInterrupted`` once the run was interrupted: nothing of the step in flight is kept."""
        if self.interrupted is not None and self.interrupted.is_set():
            raise RunInterrupted(f"interrupted during {during}; the checkpoint of round {kept_round} stands")

    def log_round(self, record: RoundRecord, outcome: RoundOutcome) -> None:
        self.log.add_round(record)
        layers = [layer.index for layer in self.ws.built.layout.layers]
        self.log.add_jsonl("routing.jsonl", {"round": record.round, "layers": layers, "clients": routing_by_client(outcome.used)})
        if outcome.diagnostics is not None and record.adopted:  # no new model, no decision: do not repeat the last
            regs = [r.figures.reg_loss for r in outcome.used if r.figures.reg_loss is not None]
            self.log.add_jsonl("diagnostics.jsonl", {"round": record.round, "reg_loss": sum(regs) / len(regs) if regs else None,
                                                     "stats_uplink_bytes": record.exchange.stats_uplink_bytes,
                                                     **outcome.diagnostics})

    def save_checkpoint(self, server_round: int) -> None:
        checkpoint.save(self.log.out, Checkpoint(server_round, self.arrays.to_torch_state_dict(), self.strategy.state_dict(),
                                                 self.idle, random.getstate(), self.log.elapsed(), self.cfg.to_json()))


def run_federation(grid: Grid, ws: Workspace, log: RunLog, on_round: Callable[[RoundRecord], None] | None = None,
                   resume: Checkpoint | None = None, on_reply: Callable[[int, int, int], None] | None = None,
                   interrupted: threading.Event | None = None) -> dict:
    """Run ``cfg.federation.rounds`` rounds (from the checkpoint's next round when resuming); return the summary.

    ``on_round(record)`` after each round; ``on_reply(round, replies so far, sent)`` as replies arrive.
    ``interrupted``: once set, the round in flight is neither logged nor checkpointed (``RunInterrupted``).
    A terminal's Ctrl-C reaches the client processes too, so the replies of that round are cut short by
    the interrupt, not by the clients: aggregating them would put a round into the checkpoint that an
    uninterrupted run never has, and the resumed run would differ from it.
    """
    cfg: Config = ws.cfg
    server = _Server(grid, ws, log, resume, on_reply, interrupted)
    stopped = None
    for server_round in range(server.first_round, cfg.federation.rounds + 1):
        server.check_interrupt(f"round {server_round}", server_round - 1)
        want = cfg.partition.num_clients if server_round == 1 else cfg.federation.min_available_nodes
        if wait_for_nodes(grid, cfg, want) is None:
            stopped = (f"stopped before round {server_round}: fewer than min_available_nodes = "
                       f"{cfg.federation.min_available_nodes} nodes connected within {cfg.federation.node_wait_seconds:g} s")
            break
        record, outcome = server.train_round(server_round)
        server.check_interrupt(f"round {server_round}", server_round - 1)
        server.log_round(record, outcome)
        server.idle = 0 if record.adopted else server.idle + 1
        server.save_checkpoint(server_round)
        if on_round is not None:
            on_round(record)
        limit = cfg.federation.stop_after_silent_rounds
        if limit is not None and server.idle >= limit:
            causes = failure_summary(outcome.dropped)
            stopped = (f"stopped after round {server_round}: no new global model in the last {server.idle} rounds "
                       f"({record.exchange.not_adopted_reason}" + (f"; replies lost: {causes})" if causes else ")"))
            break
    state = {n: t.contiguous() for n, t in server.arrays.to_torch_state_dict().items()}
    replace_atomically(log.out / "global_trainable.safetensors", lambda tmp: save_file(state, str(tmp)))
    return _final_evaluation(server, stopped)


def _final_evaluation(server: _Server, stopped: str | None) -> dict:
    """The final global model on every client's own test split; then the summary."""
    cfg, strategy = server.cfg, server.strategy
    messages = list(strategy.configure_evaluate(cfg.federation.rounds, server.arrays,
                                                protocol.round_config(cfg.to_json()), server.grid))
    per_client = {}
    received = send_and_collect(server.grid, messages, cfg.federation.round_timeout, None, server.interrupted) if messages else []
    server.check_interrupt("the final evaluation", cfg.federation.rounds)
    for msg in received:
        if msg.has_error():
            logger.warning("final evaluation: node %s gave no result: %s", msg.metadata.src_node_id, error_cause(msg))
            continue
        try:
            reply = protocol.read_eval_reply(msg, cfg.partition.num_clients)
        except ReplyError as err:
            logger.warning("final evaluation: dropped the reply of node %s: %s", msg.metadata.src_node_id, err)
            continue
        per_client[str(reply.partition_id)] = reply.accuracy
    # summed in partition order: replies arrive in any order, and a float sum depends on it
    mean = sum(per_client[k] for k in sorted(per_client, key=int)) / len(per_client) if per_client else None
    return server.log.summary(global_model_on_client_tests=mean, global_model_on_client_tests_by_client=per_client,
                              stopped_early=stopped)
