"""The server's edge: every training reply is read through the protocol before a strategy averages it.

Every strategy of this package (FedAvg, FedProx, FedMoE, each FedAlign-MoE rung) mixes in
``ScreenedReplies``: ``aggregate_train`` drops each reply that is an error, is malformed or out of
range (``protocol.read_train_reply``), claims a partition another reply also claims, or whose update
norm per local step is far above the round's median (an update over the optional, tighter norm clip is
scaled down to it instead), logs one line per dropped reply naming the node, the partition and the
reason, and hands the rest to the ``aggregate_replies`` hook. A round in which nothing
survives leaves the global model as it was.
"""

from __future__ import annotations

import logging
import math
import re
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from ..config import Config
from ..core.aggregate import LayerNames
from ..core.fedmoe import keep_rows
from ..core.robust import bounded_example_counts, norm_clip_scales
from ..models.base import MoELayout
from . import protocol
from .protocol import Expectation, LocalWork, ReplyError, TrainReply

logger = logging.getLogger(__name__)
# marks a log record whose content the round's metrics record also holds (a console that prints the
# round's failures itself can skip it)
ROUND_RECORD = {"in_round_record": True}

_CAUSES = {  # Flower's error codes, in words
    ErrorCode.CLIENT_APP_RAISED_EXCEPTION: "the client raised an error",
    ErrorCode.LOAD_CLIENT_APP_EXCEPTION: "the client app could not be loaded",
    ErrorCode.CLIENT_APP_CRASHED: "the client process died",
    ErrorCode.NODE_UNAVAILABLE: "the node became unavailable (its process died or it disconnected)",
    ErrorCode.MESSAGE_UNAVAILABLE: "the instruction expired before the node fetched it",
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "the reply expired before the server read it",
}


@dataclass(frozen=True)
class ReplyPolicy:
    """What the edge needs to know beside the messages: the model layout and the run's bounds."""

    layout: MoELayout
    num_clients: int
    work: LocalWork  # the local training the run's config asks of a client
    max_update_norm_ratio: float | None = 10.0  # drop updates whose norm per step exceeds this x the round's median
    round_timeout: float | None = None
    max_examples_ratio: float | None = None  # an example count counts at most this x the round's median
    max_weight_share: float | None = None  # no reply weighs more than this share of a round (4+ replies)
    partition_sizes: tuple[int, ...] | None = None  # each partition's training examples, when the server knows them
    wire_dtype: str = "float32"  # "bfloat16": training rounds travel in bfloat16 each way (federation.wire_dtype)
    clip_update_norm_ratio: float | None = None  # scale updates down to this x the round's median norm / sqrt(steps)


@dataclass(frozen=True)
class Failure:
    """One reply the server did not use, and why."""

    node_id: int
    partition_id: int | None
    reason: str

    def to_json(self) -> dict:
        return asdict(self)


_EXCEPTION_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception|Interrupt)):\s*(.*?)['\">]*\s*$")


def error_cause(msg: Message) -> str:
    """An error reply's cause, as it is: a raised exception (its last ``Type: message`` line, out of
    whatever traceback Flower wrapped it in), a dead process, an expired message."""
    code, reason = msg.error.code, (msg.error.reason or "").strip()
    found = [m for m in map(_EXCEPTION_LINE.match, reason.splitlines()) if m and m.group(1) != "ClientAppException"]
    detail = f"{found[-1].group(1)}: {found[-1].group(2)}" if found else (reason.splitlines() or [""])[0][:200]
    return _CAUSES.get(code, f"error code {code}") + (f": {detail}" if detail else "")


def _claimed_partition(msg: Message, num_clients: int) -> int | None:
    """The partition a reply claims, when it says one that exists (for naming it in a log line)."""
    try:
        pid = msg.content[protocol.METRICS].get(protocol.PARTITION_ID)
    except Exception:  # noqa: BLE001 - a reply too broken to say which partition it is
        return None
    return pid if isinstance(pid, int) and not isinstance(pid, bool) and 0 <= pid < num_clients else None


def global_rows(reply: TrainReply, global_state: dict[str, torch.Tensor], layout: MoELayout) -> dict[str, torch.Tensor]:
    """The global arrays a reply's update is taken against: all of them, or a sub-MoE's rows."""
    if reply.sub_moe_LE is None:
        return global_state
    return keep_rows(global_state, [LayerNames(l.router, l.experts) for l in layout.layers], reply.sub_moe_LE)


def update_norm(reply: TrainReply, global_state: dict[str, torch.Tensor], layout: MoELayout) -> float:
    """||update - global|| over every array the client sent (a sub-MoE against the global rows it holds)."""
    base = global_rows(reply, global_state, layout)
    total = 0.0
    for name, tensor in reply.state().items():
        total += float(torch.linalg.vector_norm(tensor - base[name])) ** 2
    return total ** 0.5


def screen(sent: list[Message], received: list[Message], expect: Expectation, policy: ReplyPolicy,
           global_state: dict[str, torch.Tensor]) -> tuple[list[TrainReply], list[Failure], dict[int, float]]:
    """The valid replies (partition order), a ``Failure`` for every message sent that gave none, and
    each screened reply's update norm by partition."""
    failures, replies = [], []
    answered = set()
    for msg in received:
        node = msg.metadata.src_node_id
        answered.add(node)
        if msg.has_error():
            failures.append(Failure(node, None, error_cause(msg)))
            continue
        try:
            replies.append(protocol.read_train_reply(msg, expect))
        except ReplyError as err:
            failures.append(Failure(node, _claimed_partition(msg, policy.num_clients), str(err)))
        except Exception as err:  # noqa: BLE001 - whatever one reply holds, it costs that reply only
            failures.append(Failure(node, _claimed_partition(msg, policy.num_clients), f"unreadable reply ({protocol.one_line(err)})"))
    wait = f" within the round timeout ({policy.round_timeout:g} s)" if policy.round_timeout else ""
    failures += [Failure(m.metadata.dst_node_id, None, f"timeout: no reply{wait}") for m in sent
                 if m.metadata.dst_node_id not in answered]
    claims = Counter(r.partition_id for r in replies)
    for r in replies:
        if claims[r.partition_id] > 1:
            failures.append(Failure(r.node_id, r.partition_id, f"partition claimed by {claims[r.partition_id]} replies"))
    replies = sorted((r for r in replies if claims[r.partition_id] == 1), key=lambda r: r.partition_id)
    norms, measured = {}, []
    for r in replies:
        try:
            norms[r.partition_id] = update_norm(r, global_state, policy.layout)
            measured.append(r)
        except Exception as err:  # noqa: BLE001 - a reply the norm cannot be taken of costs that reply only
            failures.append(Failure(r.node_id, r.partition_id, f"unreadable update ({protocol.one_line(err)})"))
    steps = _allowed_steps(measured, policy)
    kept, outliers = _drop_norm_outliers(measured, norms, policy.max_update_norm_ratio, steps)
    _clip_norms(kept, norms, steps, global_state, policy)
    _weigh(kept, policy)
    order = sorted(failures + outliers, key=lambda f: (f.partition_id is None, f.partition_id or 0, f.node_id))
    return kept, order, norms  # failures in partition order too, whatever order the replies came in


def _allowed_steps(replies: list[TrainReply], policy: ReplyPolicy) -> dict[int, int]:
    """The local steps each reply's norm allowance is reckoned on: its own, but never more than an example
    count of ``max_examples_ratio`` x the round's median would make (a larger claim buys no larger step)."""
    if policy.max_examples_ratio is None or not replies:
        return {r.partition_id: r.figures.train_steps for r in replies}
    ceiling = policy.max_examples_ratio * statistics.median(r.num_examples for r in replies)
    return {r.partition_id: max(1, min(r.figures.train_steps, policy.work.steps(max(1, math.floor(ceiling)))))
            for r in replies}


def _weigh(replies: list[TrainReply], policy: ReplyPolicy) -> None:
    """Set each reply's weight in the round's example-weighted averages (float64, bounded: ``core.robust``)."""
    if not replies:
        return
    counts_C, capped_C = bounded_example_counts(torch.tensor([float(r.num_examples) for r in replies], dtype=torch.float64),
                                                policy.max_examples_ratio, policy.max_weight_share)
    for r, w, capped in zip(replies, counts_C.tolist(), capped_C.tolist()):
        r.weight, r.weight_capped = w, capped


def _drop_norm_outliers(replies: list[TrainReply], norms: dict[int, float], ratio: float | None,
                        steps: dict[int, int]) -> tuple[list[TrainReply], list[Failure]]:
    """Drop updates whose norm per local step (``steps``: the steps each reply is allowed) is over ``ratio``
    x the round's median. Per step, because an honest update grows with the steps taken: a client with 20x
    the data moves 20x as far, at the same pace (docs/robustness.md: max/median per step 1.40 where raw
    norms reached 7.9)."""
    if ratio is None or len(replies) < 3:  # a median of one or two replies says nothing
        return replies, []
    pace = {r.partition_id: norms[r.partition_id] / steps[r.partition_id] for r in replies}
    median = statistics.median(pace.values())
    keep, out = [], []
    for r in replies:
        if median > 0 and pace[r.partition_id] > ratio * median:
            out.append(Failure(r.node_id, r.partition_id,
                               f"update norm per local step {pace[r.partition_id]:.3g} is "
                               f"{pace[r.partition_id] / median:.1f}x the round's median {median:.3g} (limit {ratio:g}x)"))
        else:
            keep.append(r)
    return keep, out


def _clip_norms(replies: list[TrainReply], norms: dict[int, float], steps: dict[int, int],
                global_state: dict[str, torch.Tensor], policy: ReplyPolicy) -> None:
    """Scale each update whose norm per square root of its local steps is above ``policy.clip_update_norm_ratio``
    x the median of the replies kept down to that (``core.robust.norm_clip_scales``): the reply's arrays
    become w_g + s (w_i - w_g), and ``update_scale`` says s. Per square root of the steps (``steps``: those
    its example count is allowed), because that is how honest norms grow under Adam: on `bench` at alpha 0.1
    they grow as steps^0.7, so per step the largest client's pace is 0.4x the median and a 9x scale of it
    would pass a 2x clip at 5x its honest size; per square root of the steps honest clients lie within
    0.45-2.1x the median and the largest at 1.1-1.2x (docs/robustness.md)."""
    if policy.clip_update_norm_ratio is None or len(replies) < 3:
        return
    pace_C = torch.tensor([norms[r.partition_id] / steps[r.partition_id] ** 0.5 for r in replies], dtype=torch.float64)
    for r, s in zip(replies, norm_clip_scales(pace_C, policy.clip_update_norm_ratio).tolist()):
        if s < 1:
            base = global_rows(r, global_state, policy.layout)
            r.arrays = ArrayRecord({name: (base[name].float() + s * (t.float() - base[name].float())).to(t.dtype)
                                    for name, t in r.state().items()})
            r.update_scale = s


@dataclass(frozen=True)
class RoundOutcome:
    """What a strategy made of one round's replies. ``state``: the strategy's state after this round (its
    ``state_dict``), which takes effect only when the round loop adopts ``arrays`` (``commit``)."""

    arrays: ArrayRecord | None  # None: no valid reply
    metrics: MetricRecord | None
    used: list[TrainReply]  # partition order
    dropped: list[Failure]
    update_norms: dict[int, float]  # partition id -> ||w_i - w_g||, as the outlier rule compared them
    screen_seconds: float
    diagnostics: dict | None  # what the aggregation decided, for diagnostics.jsonl (None: nothing to record)
    state: dict[str, torch.Tensor]


class ScreenedReplies:
    """Mixin for a Flower strategy (put it before the Flower class): replies pass ``screen`` first.

    ``aggregate_round`` turns a round's replies into a ``RoundOutcome`` and leaves the strategy as it was;
    ``commit`` makes the outcome's state the strategy's (the round loop does, when it adopts the aggregate).
    Flower's ``aggregate_train`` is the two together. ``outcome``: the last round's.

    Hooks: ``from_config`` (the strategy's own options, read from a run's config), ``aggregate_replies``
    (the arithmetic over valid replies; by default the Flower parent's ``aggregate_train``),
    ``state_dict``/``load_state_dict`` (what carries the strategy from round to round, and what a
    checkpoint keeps), ``diagnostics`` (what the last aggregation decided).
    """

    def __init__(self, policy: ReplyPolicy, **strategy_kwargs):
        super().__init__(**strategy_kwargs)
        self.policy = policy
        self.global_state: dict[str, torch.Tensor] = {}
        self.sent: list[Message] = []
        self.outcome = RoundOutcome(None, None, [], [], {}, 0.0, None, {})

    @classmethod
    def from_config(cls, cfg: Config, policy: ReplyPolicy, **flower_kwargs) -> ScreenedReplies:
        """The strategy for a run of ``cfg``: ``flower_kwargs`` are what every strategy is given (the record
        keys, node fractions); a strategy with options of its own reads them from ``cfg`` here."""
        return cls(policy, **flower_kwargs)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.global_state = arrays.to_torch_state_dict()
        self.sent = list(super().configure_train(server_round, arrays, config, grid))
        if self.policy.wire_dtype == "bfloat16":
            narrow = protocol.bfloat16_record(self.global_state)
            for msg in self.sent:
                protocol.send_in_bfloat16(msg.content, narrow)
        return self.sent

    def aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's hook: the round's outcome, committed."""
        outcome = self.aggregate_round(server_round, replies)
        self.commit(outcome)
        return outcome.arrays, outcome.metrics

    def aggregate_round(self, server_round: int, replies) -> RoundOutcome:
        """Screen the replies and aggregate the valid ones; the strategy's state is left as it was (an
        exception from the aggregation leaves it so too)."""
        self.outcome = RoundOutcome(None, None, [], [], {}, 0.0, None, {})  # nothing of the round before, whatever fails
        before = self.state_dict()
        self.outcome = replace(self.outcome, state=before)
        received = list(replies)
        if not self.sent:
            return self.outcome
        t0 = time.perf_counter()
        expect = Expectation.of_round(self.sent[0].content, self.policy.layout, self.policy.num_clients,
                                      self.policy.work, self.policy.partition_sizes, self.global_state)
        used, dropped, norms = screen(self.sent, received, expect, self.policy, self.global_state)
        self.outcome = replace(self.outcome, used=used, dropped=dropped, update_norms=norms,
                               screen_seconds=time.perf_counter() - t0)
        for f in dropped:
            logger.warning("round %d: dropped the reply of node %s (partition %s): %s", server_round, f.node_id,
                           "?" if f.partition_id is None else f.partition_id, f.reason, extra=ROUND_RECORD)
        for r in used:
            if r.weight_capped:
                logger.warning("round %d: the weight of partition %d (node %s) is bounded: it claims %d examples, "
                               "it counts as %.4g", server_round, r.partition_id, r.node_id, r.num_examples, r.weight)
            if r.update_scale < 1:
                logger.warning("round %d: the update of partition %d (node %s) is scaled by %.3g: its norm per local "
                               "step^0.5 was over %gx the round's median", server_round, r.partition_id, r.node_id,
                               r.update_scale, self.policy.clip_update_norm_ratio)
        if not used:
            return self.outcome
        try:
            arrays, metrics = self.aggregate_replies(server_round, used)
            after = self.state_dict()
        finally:
            self.load_state_dict(before)
        self.outcome = replace(self.outcome, arrays=arrays, metrics=metrics, state=after,
                               diagnostics=self.diagnostics() if arrays is not None else None)
        return self.outcome

    def commit(self, outcome: RoundOutcome) -> None:
        """Carry ``outcome``'s state into the next round (its aggregate became the global model)."""
        self.load_state_dict(outcome.state)

    def diagnostics(self) -> dict | None:
        """What the last aggregation decided, for diagnostics.jsonl; None: this strategy records nothing."""
        return None

    def aggregate_replies(self, server_round: int, replies: list[TrainReply]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The arithmetic over validated replies; the default is Flower's FedAvg aggregation, each reply weighted
        by its (bounded) ``weight``."""
        contents = [r.weighted_content() for r in replies]
        return aggregate_arrayrecords(contents, protocol.NUM_EXAMPLES), self.train_metrics_aggr_fn(contents, protocol.NUM_EXAMPLES)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that carry the strategy from one round to the next (none for FedAvg)."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}")
