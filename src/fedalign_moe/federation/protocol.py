"""The wire protocol between the server and its clients: every record and key that travels is defined
here, and messages are built and read only through this module. Reading validates.

Server -> client, one training round (``read_instruction``):
  arrays           ArrayRecord   the global trainable parameters
  config           ConfigRecord  run-config (the run's Config as JSON), server-round, and what the round
                                 asks: proximal-mu (FedProx, and FedAlign-MoE with fedalign.proximal_mu), upload
                                 ("full", or "sub-moe" with sub-moe-coverage: FedMoE), reg-lambda and
                                 stats-noise-sigma (FedAlign-MoE), personal-experts (FedAlign-MoE with
                                 personalised experts: [L*E] 0/1, 1 where this client keeps its own
                                 expert; its presence asks the client to keep a copy of its experts)
  fedalign-target  ArrayRecord   FedAlign-MoE only: p_g and alpha [L, E]
  (config wire-dtype "bfloat16", federation.wire_dtype: ``arrays`` travel in bfloat16, and the reply
  sends ``update`` in place of ``arrays``)
Client -> server, its training reply (``train_reply`` builds it, ``read_train_reply`` validates it):
  arrays           ArrayRecord   the trained parameters (the sub-MoE's router rows and experts only,
                                 when the round asked for "sub-moe")
  update           ArrayRecord   with wire-dtype "bfloat16", instead of arrays: the trained parameters
                                 minus the instruction's arrays, in bfloat16 (the server adds them to its
                                 float32 global model, so rounding never accumulates across rounds)
  metrics          MetricRecord  num-examples, partition-id, training and local-evaluation figures,
                                 routing-p and routing-n [L*E] (every strategy), sub-moe [L*E] (0/1)
  fedalign-stats   ArrayRecord   when the round carried a fedalign-target: o, m [L, E], mu [L, E, H]
Evaluation: the server sends arrays and config; the client replies metrics (``read_eval_reply``). The
config's eval-split says on what: "own" (the client's own test split, the default) or "global" (the run's
global test split: the server's evaluation of the global model, run on a node that holds the base when
the server holds none; ``global_eval_instruction``).
Initial model (a query, ``initial_state_request``): the server that holds no base asks one node for the
trainable parameters as built; the node replies them as ``arrays`` (``read_initial_state`` checks them
against the names and shapes of the server's meta-device model).

Flower's own FedAvg and FedProx aggregate these replies as they are: one ArrayRecord of parameters and
one MetricRecord carrying ``num-examples`` (the statistics beside them travel as metric lists).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SType

from ..core.aggregate import LayerNames
from ..core.fedmoe import keep_rows
from ..core.statistics import ModelRoutingStatistics
from ..models.base import MoELayout

# records
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
FEDALIGN_TARGET = "fedalign-target"
FEDALIGN_STATS = "fedalign-stats"
UPDATE = "update"  # wire-dtype bfloat16: trained minus received parameters, instead of ARRAYS
# config keys (server -> client)
RUN_CONFIG = "run-config"
SERVER_ROUND = "server-round"  # written by Flower's strategies
PROXIMAL_MU = "proximal-mu"  # written by Flower's FedProx, and by FedAlign-MoE when fedalign.proximal_mu > 0
UPLOAD = "upload"
SUB_MOE_COVERAGE = "sub-moe-coverage"
REG_LAMBDA = "reg-lambda"
STATS_NOISE = "stats-noise-sigma"
PERSONAL_EXPERTS = "personal-experts"  # per client: [L*E] 0/1
EVAL_SPLIT = "eval-split"  # evaluation: "own" (default) or "global"
EVAL_SPLITS = ("own", "global")
WIRE_DTYPE = "wire-dtype"  # "float32" (default) or "bfloat16": the dtype of a training round's arrays each way
WIRE_FORMATS = ("float32", "bfloat16")
# metric keys (client -> server)
NUM_EXAMPLES = "num-examples"  # Flower's weighting key
PARTITION_ID = "partition-id"
TRAIN_LOSS = "train-loss"
TRAIN_STEPS = "train-steps"
TRAIN_TOKENS = "train-tokens"  # real (non-padding) tokens of the local training passes
TRAIN_SECONDS = "train-seconds"
LOCAL_ACCURACY = "local-accuracy"  # the client's model after local training, on its own test split
LOCAL_LOSS = "local-loss"
LOCAL_TEST_EXAMPLES = "local-test-examples"
REG_LOSS = "reg-loss"  # FedAlign-MoE: mean gate regulariser before lambda
ROUTING_P = "routing-p"  # mean router probability per (layer, expert), flattened [L*E]
ROUTING_N = "routing-n"  # top-k selections per (layer, expert), flattened [L*E]
SUB_MOE = "sub-moe"  # FedMoE: 1 for the experts of the client's sub-MoE, flattened [L*E]
EVAL_ACCURACY = "eval-accuracy"
EVAL_LOSS = "eval-loss"

SIMPLEX_TOLERANCE = 1e-3  # |sum_e p(e) - 1| allowed for float32 sums


class ProtocolError(ValueError):
    """A message breaks the protocol; the text says what and where, in one line."""


class ReplyError(ProtocolError):
    """A client's reply is malformed or out of range: the server drops it."""


class InstructionError(ProtocolError):
    """The server's instruction is malformed: the client refuses the round."""


@dataclass(frozen=True)
class AlignmentTarget:
    """FedAlign-MoE's part of an instruction: the global routing distribution and expert weights."""

    p_g_LE: torch.Tensor
    alpha_LE: torch.Tensor
    reg_lambda: float
    stats_noise_sigma: float = 0.0
    # personalised experts: bool [L, E], True where the client trains from its own copy of expert e;
    # None: the run does not personalise (the client keeps no copy)
    personal_LE: torch.Tensor | None = None


@dataclass(frozen=True)
class Instruction:
    """What a training round asks of a client."""

    server_round: int
    run_config: str
    arrays: dict[str, torch.Tensor]
    proximal_mu: float = 0.0
    sub_moe_coverage: float | None = None  # None: upload the full trainable set
    alignment: AlignmentTarget | None = None
    wire_dtype: str = "float32"  # "bfloat16": arrays arrived rounded to bfloat16, the reply sends an update


@dataclass(frozen=True)
class TrainFigures:
    """What a client measured in its round, beside the update and the routing statistics."""

    train_loss: float
    train_steps: int
    train_tokens: int
    train_seconds: float
    local_accuracy: float
    local_loss: float
    local_test_examples: int
    reg_loss: float | None = None


@dataclass
class TrainReply:
    """A client's validated training reply."""

    node_id: int
    partition_id: int
    num_examples: int
    figures: TrainFigures
    routing: ModelRoutingStatistics  # o, m, mu are zero-filled when the round did not ask for them
    # the trained parameters as sent (sub-MoE rows only when ``sub_moe_LE`` is set); float32, added up from
    # the global parameters, when the reply sent a bfloat16 update
    arrays: ArrayRecord
    sub_moe_LE: torch.Tensor | None
    message: Message  # the reply itself
    # the example count it weighs with in the round's averages, set by the server's screen: num_examples,
    # unless a bound lowered it (``weight_capped``: ``core.robust.bounded_example_counts``)
    weight: float = 0.0
    weight_capped: bool = False
    # the factor the screen's norm clip scaled the update by (federation.clip_update_norm_ratio)
    update_scale: float = 1.0

    def weighted_content(self) -> RecordDict:
        """The reply as Flower's aggregation functions read it, with ``weight`` as its example count."""
        metrics = MetricRecord(dict(self.message.content[METRICS]))
        metrics[NUM_EXAMPLES] = float(self.weight)
        return RecordDict({ARRAYS: self.arrays, METRICS: metrics})

    def state(self) -> ArrayView:
        """The update as a name -> tensor mapping whose every read is a zero-copy view of the reply's bytes."""
        return ArrayView(self.arrays)


WIRE_DTYPES = ("float16", "float32", "float64", "bfloat16")  # the only dtypes an array on the wire may have
# how the bytes of a dtype numpy has no name for are stored: bfloat16 as its 16 bits (numpy's uint16)
_STORED_AS = {"bfloat16": "uint16"}
_ARRAY_HEADER_ERRORS = (ValueError, TypeError, EOFError, OSError, SyntaxError, MemoryError, OverflowError)


def read_array(array: object, where: str, shape: tuple[int, ...] | None = None, dtype: str | None = None,
               error: type[ProtocolError] | None = None) -> torch.Tensor:
    """The one checked path from received bytes to a tensor: a read-only, zero-copy view of the bytes.

    Before anything is allocated: an ``Array`` serialised by numpy, a dtype of ``WIRE_DTYPES`` (``dtype``
    when given), a shape of whole non-negative numbers (``shape`` when given); then the .npy header must
    say the same little-endian dtype and the same shape in C order, and exactly that many bytes must
    follow it. Anything else raises ``error`` (``ReplyError`` by default) naming ``where`` and the fault.
    """
    error = error or ReplyError
    if not isinstance(array, Array):
        raise error(f"{where}: a {type(array).__name__}, not an array")
    if array.stype != SType.NUMPY:
        raise error(f"{where}: serialised as {str(array.stype)[:40]!r}, not as {SType.NUMPY!r}")
    record_shape = tuple(array.shape) if isinstance(array.shape, (list, tuple)) else None
    if record_shape is None or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in record_shape):
        raise error(f"{where}: shape {str(array.shape)[:60]} is not a list of whole numbers >= 0")
    if array.dtype not in WIRE_DTYPES or (dtype is not None and array.dtype != dtype) or \
            (shape is not None and record_shape != tuple(shape)):
        wanted = f"{dtype or ' or '.join(WIRE_DTYPES)} {tuple(shape) if shape is not None else ''}".strip()
        raise error(f"{where}: {str(array.dtype)[:40]} {record_shape}, expected {wanted}")
    data = array.data
    if not isinstance(data, bytes):
        raise error(f"{where}: its data is a {type(data).__name__}, not bytes")
    buf = io.BytesIO(data)
    try:  # numpy's own header parser (a literal, read without eval), then every field checked
        version = np.lib.format.read_magic(buf)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
        header_shape, fortran_order, header_dtype = read_header(buf)
    except (*_ARRAY_HEADER_ERRORS, KeyError) as err:
        cause = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise error(f"{where}: its bytes are not a readable array ({cause})") from None
    expected = np.dtype(_STORED_AS.get(array.dtype, array.dtype)).newbyteorder("<")
    if header_dtype != expected or tuple(header_shape) != record_shape:
        said = header_dtype.str if header_dtype.byteorder == ">" or header_dtype.subdtype or header_dtype.names else header_dtype
        raise error(f"{where}: its bytes hold {said} {tuple(header_shape)}, the record says {array.dtype} {record_shape}"
                    + (f" (stored as {expected})" if array.dtype in _STORED_AS else ""))
    if fortran_order:
        raise error(f"{where}: its bytes are in Fortran order; only C order is read")
    count, size = math.prod(record_shape), len(data) - buf.tell()
    if size != count * expected.itemsize:
        raise error(f"{where}: its bytes are not a readable array ({size} bytes after the header, "
                    f"{array.dtype} {record_shape} needs {count * expected.itemsize})")
    flat = np.frombuffer(data, dtype=expected, count=count, offset=buf.tell())
    with warnings.catch_warnings():  # torch warns that the buffer is not writable: nothing here writes to it
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(flat).view(record_shape)
    return tensor.view(torch.bfloat16) if array.dtype == "bfloat16" else tensor


def bfloat16_array(tensor: torch.Tensor) -> Array:
    """``tensor`` rounded to bfloat16, as an array ``read_array`` reads back (dtype "bfloat16", its 16 bits
    stored as numpy's uint16): half the bytes of float32, with float32's range."""
    bits = tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.uint16).numpy()
    buf = io.BytesIO()
    np.save(buf, bits, allow_pickle=False)
    return Array(dtype="bfloat16", shape=tuple(bits.shape), stype=SType.NUMPY, data=buf.getvalue())


def bfloat16_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Every tensor of ``state`` as a ``bfloat16_array``."""
    return ArrayRecord({name: bfloat16_array(t) for name, t in state.items()})


def one_line(err: BaseException, limit: int = 160) -> str:
    """An exception as ``Type: the first line of its message`` (the type alone when it has none)."""
    text = str(err).splitlines()[0][:limit] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def array_view(array: Array) -> torch.Tensor:
    """A tensor over the bytes of a received array, without copying them (``read_array``, checked against
    the record's own description). Read-only by contract: the bytes are the message's."""
    return read_array(array, "array")


class ArrayView(Mapping):
    """Read-only ``name -> torch.Tensor`` view of an ArrayRecord: each read is a zero-copy ``array_view``,
    so a server that reads C replies tensor by tensor holds nothing beyond the replies themselves."""

    def __init__(self, arrays: ArrayRecord):
        self._arrays = arrays

    def __getitem__(self, name: str) -> torch.Tensor:
        return array_view(self._arrays[name])

    def __iter__(self):
        return iter(self._arrays.keys())

    def __len__(self) -> int:
        return len(self._arrays)


# ---------------------------------------------------------------- server side: building instructions

def round_config(run_config: str) -> ConfigRecord:
    """The config record every message of a run starts from."""
    return ConfigRecord({RUN_CONFIG: run_config})


def request_sub_moe(config: ConfigRecord, coverage: float) -> None:
    """FedMoE: ask clients to upload only the sub-MoE covering ``coverage`` of their selections."""
    config[UPLOAD], config[SUB_MOE_COVERAGE] = "sub-moe", float(coverage)


def send_in_bfloat16(content: RecordDict, arrays: ArrayRecord) -> None:
    """Make a training instruction travel in bfloat16: ``arrays`` (a ``bfloat16_record`` of the global
    parameters) replace its float32 ones, and the reply is asked to send its update in bfloat16."""
    content[ARRAYS] = arrays
    content[CONFIG][WIRE_DTYPE] = "bfloat16"


def attach_alignment(content: RecordDict, target: AlignmentTarget) -> None:
    """FedAlign-MoE: add p_g, alpha, lambda and the statistics noise to one message."""
    content[CONFIG][REG_LAMBDA] = float(target.reg_lambda)
    content[CONFIG][STATS_NOISE] = float(target.stats_noise_sigma)
    content[FEDALIGN_TARGET] = ArrayRecord({"p_g": target.p_g_LE.float().clone(), "alpha": target.alpha_LE.float().clone()})


def global_eval_instruction(run_config: str, server_round: int, arrays: ArrayRecord) -> RecordDict:
    """Ask a node to evaluate ``arrays`` on the run's global test split (the server holds no base)."""
    config = round_config(run_config)
    config[SERVER_ROUND], config[EVAL_SPLIT] = int(server_round), "global"
    return RecordDict({ARRAYS: arrays, CONFIG: config})


def initial_state_request(run_config: str) -> RecordDict:
    """Ask a node for the trainable parameters of the model as built (the server holds no base)."""
    return RecordDict({CONFIG: round_config(run_config)})


def with_personal_experts(content: RecordDict, personal_LE: torch.Tensor) -> RecordDict:
    """One client's copy of a FedAlign-MoE message that tells it which experts to keep (bool [L, E]). The
    copy shares the parameters and the target with ``content`` (nothing large is copied); only its config
    record is its own."""
    config = ConfigRecord(dict(content[CONFIG]))
    config[PERSONAL_EXPERTS] = personal_LE.reshape(-1).int().tolist()
    return RecordDict({**dict(content.items()), CONFIG: config})


# ---------------------------------------------------------------- client side: reading and replying

def _number(record, key: str, where: str, *, integer: bool = False, low: float | None = None,
            high: float | None = None, error=ReplyError) -> float:
    if key not in record:
        raise error(f"{where} lacks {key!r}")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{where}: {key} is {type(value).__name__}, not a number")
    if not math.isfinite(value):
        raise error(f"{where}: {key} is {value}")
    if integer and float(value) != int(value):
        raise error(f"{where}: {key} = {value} is not a whole number")
    if (low is not None and value < low) or (high is not None and value > high):
        raise error(f"{where}: {key} = {value:g} outside [{low if low is not None else '-inf'}, "
                    f"{high if high is not None else 'inf'}]")
    return int(value) if integer else float(value)


def read_instruction(content: RecordDict) -> Instruction:
    """A training round's instruction, checked (a client refuses a malformed one)."""
    for key in (ARRAYS, CONFIG):
        if key not in content:
            raise InstructionError(f"instruction lacks record {key!r}")
    _check_record_types(content, InstructionError)
    config, where = content[CONFIG], "instruction config"
    if not isinstance(config.get(RUN_CONFIG), str):
        raise InstructionError(f"{where} lacks {RUN_CONFIG!r}")
    upload = config.get(UPLOAD, "full")
    if upload not in ("full", "sub-moe"):
        raise InstructionError(f"{where}: upload {upload!r} is neither 'full' nor 'sub-moe'")
    coverage = (_number(config, SUB_MOE_COVERAGE, where, low=0.0, high=1.0, error=InstructionError)
                if upload == "sub-moe" else None)
    alignment = None
    if FEDALIGN_TARGET in content:
        target = content[FEDALIGN_TARGET]
        if set(target.keys()) != {"p_g", "alpha"}:
            raise InstructionError(f"{FEDALIGN_TARGET} holds {sorted(target.keys())}, not ['alpha', 'p_g']")
        p_g, alpha = (read_array(target[k], f"{FEDALIGN_TARGET}: {k}", dtype="float32", error=InstructionError).clone()
                      for k in ("p_g", "alpha"))
        if p_g.ndim != 2 or p_g.shape != alpha.shape or not (torch.isfinite(p_g).all() and torch.isfinite(alpha).all()):
            raise InstructionError(f"{FEDALIGN_TARGET}: p_g {tuple(p_g.shape)} and alpha {tuple(alpha.shape)} "
                                   "must be finite [L, E] arrays")
        if (p_g < 0).any() or ((p_g.sum(-1) - 1).abs() > SIMPLEX_TOLERANCE).any() or (alpha < 0).any() or (alpha > 1).any():
            raise InstructionError(f"{FEDALIGN_TARGET}: p_g must lie on the simplex and alpha in [0, 1]")
        alignment = AlignmentTarget(p_g, alpha, _number(config, REG_LAMBDA, where, low=0.0, error=InstructionError),
                                    _number(config, STATS_NOISE, where, low=0.0, error=InstructionError),
                                    _personal(config, p_g.shape, where))
    elif PERSONAL_EXPERTS in config:
        raise InstructionError(f"{where}: {PERSONAL_EXPERTS} without a {FEDALIGN_TARGET}")
    wire = config.get(WIRE_DTYPE, "float32")
    if wire not in WIRE_FORMATS:
        raise InstructionError(f"{where}: {WIRE_DTYPE} {str(wire)[:40]!r} is neither 'float32' nor 'bfloat16'")
    return Instruction(
        server_round=_number(config, SERVER_ROUND, where, integer=True, low=1, error=InstructionError),
        run_config=config[RUN_CONFIG],
        arrays={n: _received(a, f"instruction array {n}", wire) for n, a in content[ARRAYS].items()},
        proximal_mu=_number(config, PROXIMAL_MU, where, low=0.0, error=InstructionError) if PROXIMAL_MU in config else 0.0,
        sub_moe_coverage=coverage, alignment=alignment, wire_dtype=wire)


def _received(array: object, where: str, wire: str) -> torch.Tensor:
    """An instruction's array as the client's own tensor: a copy, widened to float32 from a bfloat16 wire."""
    if wire == "bfloat16":
        return read_array(array, where, dtype="bfloat16", error=InstructionError).to(torch.float32)
    return read_array(array, where, error=InstructionError).clone()


def read_eval_split(content: RecordDict) -> str:
    """What an evaluation instruction asks to evaluate on: "own" or "global"."""
    split = content[CONFIG].get(EVAL_SPLIT, "own") if CONFIG in content else "own"
    if split not in EVAL_SPLITS:
        raise InstructionError(f"instruction config: {EVAL_SPLIT} {split!r} is neither 'own' nor 'global'")
    return split


def read_run_config(content: RecordDict) -> str:
    """The run config of a query (the initial-state request)."""
    config = content[CONFIG] if CONFIG in content else None
    if not isinstance(config, ConfigRecord) or not isinstance(config.get(RUN_CONFIG), str):
        raise InstructionError(f"query lacks {RUN_CONFIG!r} in a {CONFIG!r} record")
    return config[RUN_CONFIG]


def initial_state_reply(state: dict[str, torch.Tensor]) -> RecordDict:
    return RecordDict({ARRAYS: ArrayRecord(state)})


def read_initial_state(msg: Message, shapes: dict[str, tuple[int, ...]]) -> ArrayRecord:
    """A node's initial trainable parameters, checked: exactly the expected names, float32, the expected
    shapes, finite. Raises ``ReplyError`` naming the first problem."""
    if set(msg.content.keys()) != {ARRAYS}:
        raise ReplyError(f"records {sorted(msg.content.keys())[:5]}, expected ['{ARRAYS}']")
    _check_record_types(msg.content)
    _check_arrays(msg.content[ARRAYS], {n: (tuple(shape), "float32") for n, shape in shapes.items()})
    return msg.content[ARRAYS]


def _personal(config: ConfigRecord, shape_LE: torch.Size, where: str) -> torch.Tensor | None:
    if PERSONAL_EXPERTS not in config:
        return None
    value, L, E = config[PERSONAL_EXPERTS], *shape_LE
    if not isinstance(value, list) or len(value) != L * E or any(isinstance(v, bool) or v not in (0, 1) for v in value):
        raise InstructionError(f"{where}: {PERSONAL_EXPERTS} must be a list of {L * E} zeros and ones")
    return torch.tensor(value, dtype=torch.bool).reshape(L, E)


def train_reply(partition_id: int, num_examples: int, state: dict[str, torch.Tensor], figures: TrainFigures,
                routing: ModelRoutingStatistics, layout: MoELayout, instruction: Instruction,
                sub_moe_LE: torch.Tensor | None = None) -> RecordDict:
    """A client's reply to ``instruction``: the state (cut to ``sub_moe_LE``'s rows when the round asked
    for a sub-MoE; as a bfloat16 ``update`` from the instruction's arrays when it came in bfloat16), the
    figures, and the statistics the round asked for."""
    metrics = MetricRecord({
        NUM_EXAMPLES: int(num_examples), PARTITION_ID: int(partition_id),
        TRAIN_LOSS: float(figures.train_loss), TRAIN_STEPS: int(figures.train_steps),
        TRAIN_TOKENS: int(figures.train_tokens), TRAIN_SECONDS: float(figures.train_seconds),
        LOCAL_ACCURACY: float(figures.local_accuracy), LOCAL_LOSS: float(figures.local_loss),
        LOCAL_TEST_EXAMPLES: int(figures.local_test_examples),
        ROUTING_P: routing.p_LE.reshape(-1).tolist(), ROUTING_N: routing.n_LE.reshape(-1).tolist(),
    })
    if instruction.wire_dtype == "bfloat16":
        state = {name: t - instruction.arrays[name] for name, t in state.items()}
    if instruction.sub_moe_coverage is not None:
        if sub_moe_LE is None:
            raise ValueError("the round asked for a sub-MoE upload but no sub-MoE was given")
        state = keep_rows(state, [LayerNames(l.router, l.experts) for l in layout.layers], sub_moe_LE.bool())
        metrics[SUB_MOE] = sub_moe_LE.reshape(-1).int().tolist()
    content = RecordDict({UPDATE: bfloat16_record(state)} if instruction.wire_dtype == "bfloat16"
                         else {ARRAYS: ArrayRecord(state)})
    content[METRICS] = metrics
    if instruction.alignment is not None:
        metrics[REG_LOSS] = float(figures.reg_loss or 0.0)
        content[FEDALIGN_STATS] = ArrayRecord({"o": routing.o_LE.float(), "m": routing.m_LE.float(),
                                               "mu": routing.mu_LEH.float()})
    return content


def eval_reply(partition_id: int, num_examples: int, accuracy: float, loss: float) -> RecordDict:
    return RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: max(int(num_examples), 1), PARTITION_ID: int(partition_id),
                                              EVAL_ACCURACY: float(accuracy), EVAL_LOSS: float(loss)})})


# ---------------------------------------------------------------- server side: reading replies

@dataclass(frozen=True)
class LocalWork:
    """How much local training the run's config asks of a client with n examples (the server knows the
    config, so a reply's step count is checked, not trusted)."""

    batch_size: int
    max_length: int
    local_epochs: int
    local_steps: int | None = None
    rows_per_example: int = 1  # sequences an example is read as (one a choice when choices are scored by likelihood)

    @classmethod
    def of_config(cls, cfg, rows_per_example: int = 1) -> LocalWork:
        """The local training a run's ``Config`` asks of a client (``rows_per_example``: its data's)."""
        t = cfg.train
        return cls(t.batch_size, cfg.data.max_length, t.local_epochs, t.local_steps, rows_per_example)

    def steps(self, num_examples: int) -> int:
        if self.local_steps is not None:
            return self.local_steps
        return self.local_epochs * -(-num_examples // self.batch_size)


@dataclass(frozen=True)
class Expectation:
    """What a valid training reply of this round looks like, derived from what the server sent."""

    shapes: dict[str, tuple[tuple[int, ...], str]]  # trainable name -> (shape, numpy dtype) of the global arrays
    layout: MoELayout
    num_clients: int
    work: LocalWork
    sub_moe: bool = False
    alignment: bool = False
    noisy_statistics: bool = False  # noised counts need not add up to k x tokens
    hidden: int | None = None  # H of mu [L, E, H]: the width of the first router's input (None: not sent)
    partition_sizes: tuple[int, ...] | None = None  # when the server knows them, a claim must match
    # the round went out in bfloat16: replies carry a bfloat16 ``update``, added to these float32 parameters
    base: Mapping[str, torch.Tensor] | None = None

    @classmethod
    def of_round(cls, sent: RecordDict, layout: MoELayout, num_clients: int, work: LocalWork,
                 partition_sizes: tuple[int, ...] | None = None,
                 global_state: Mapping[str, torch.Tensor] | None = None) -> Expectation:
        """What a reply to ``sent`` must look like; ``global_state`` (float32) is what the replies' updates
        are added to when the round went out in bfloat16."""
        config = sent[CONFIG]
        shapes = {name: (tuple(array.shape), str(array.dtype)) for name, array in sent[ARRAYS].items()}
        router = shapes.get(layout.layers[0].router) if layout.layers else None
        in_bfloat16 = config.get(WIRE_DTYPE) == "bfloat16"
        if in_bfloat16 and global_state is None:
            raise ValueError("a round sent in bfloat16 needs the float32 global state its updates are added to")
        return cls(shapes, layout, num_clients, work, sub_moe=config.get(UPLOAD) == "sub-moe",
                   alignment=FEDALIGN_TARGET in sent, noisy_statistics=float(config.get(STATS_NOISE, 0.0)) > 0,
                   hidden=router[0][-1] if router and len(router[0]) == 2 else None, partition_sizes=partition_sizes,
                   base=global_state if in_bfloat16 else None)


_REQUIRED_METRICS = (NUM_EXAMPLES, PARTITION_ID, TRAIN_LOSS, TRAIN_STEPS, TRAIN_TOKENS, TRAIN_SECONDS,
                     LOCAL_ACCURACY, LOCAL_LOSS, LOCAL_TEST_EXAMPLES, ROUTING_P, ROUTING_N)


def _vector(metrics: MetricRecord, key: str, size: int, where: str) -> torch.Tensor:
    value = metrics.get(key)
    if not isinstance(value, list) or len(value) != size:
        raise ReplyError(f"{where}: {key} must be a list of {size} numbers")
    out = torch.tensor(value, dtype=torch.float64)
    if not torch.isfinite(out).all():
        raise ReplyError(f"{where}: {key} holds non-finite values")
    return out


def _sub_moe_rows(layout: MoELayout, sub_moe_LE: torch.Tensor | None) -> dict[str, int]:
    """Rows of each router and stacked expert tensor a sub-MoE upload holds (none without a sub-MoE)."""
    if sub_moe_LE is None:
        return {}
    return {name: int(sub_moe_LE[l].sum()) for l, layer in enumerate(layout.layers) for name in (layer.router, *layer.experts)}


def _check_arrays(arrays: ArrayRecord, shapes: dict[str, tuple[tuple[int, ...], str]], rows: dict[str, int] | None = None) -> None:
    """Names, dtypes, shapes (``rows``: dimension 0 of a sub-MoE's tensors), readable bytes and finiteness."""
    rows = rows or {}
    names, wanted = set(arrays.keys()), set(shapes)
    if names != wanted:
        missing, extra = sorted(wanted - names), sorted(names - wanted)
        raise ReplyError(f"update arrays differ from the model's: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, array in arrays.items():
        shape, dtype = shapes[name]
        if name in rows:
            shape = (rows[name], *shape[1:])
        tensor = read_array(array, f"array {name}", shape, dtype)
        if not torch.isfinite(tensor).all():
            raise ReplyError(f"array {name} holds NaN or Inf")


def _added_to(update: ArrayRecord, base: Mapping[str, torch.Tensor], layout: MoELayout,
              sub_moe_LE: torch.Tensor | None) -> ArrayRecord:
    """The trained parameters a checked bfloat16 ``update`` stands for: the float32 global parameters it was
    trained from (their sub-MoE rows for a sub-MoE upload) plus the update."""
    if sub_moe_LE is not None:
        base = keep_rows(dict(base), [LayerNames(l.router, l.experts) for l in layout.layers], sub_moe_LE)
    trained = {}
    for name, array in update.items():
        trained[name] = base[name].float() + read_array(array, f"{UPDATE} {name}").float()
        if not torch.isfinite(trained[name]).all():
            raise ReplyError(f"{UPDATE} {name}: the global parameters plus the update overflow")
    return ArrayRecord(trained)


def _check_routing(metrics: MetricRecord, expect: Expectation, tokens: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    L, E, k = len(expect.layout.layers), expect.layout.num_experts, expect.layout.top_k
    p_LE = _vector(metrics, ROUTING_P, L * E, where).reshape(L, E)
    n_LE = _vector(metrics, ROUTING_N, L * E, where).reshape(L, E)
    if (p_LE < 0).any() or ((p_LE.sum(-1) - 1).abs() > SIMPLEX_TOLERANCE).any():
        raise ReplyError(f"{where}: {ROUTING_P} is not a distribution over experts in every layer")
    if (n_LE < 0).any() or (n_LE > tokens).any() or (n_LE != n_LE.round()).any():
        raise ReplyError(f"{where}: {ROUTING_N} must be whole counts in [0, {tokens}] (the tokens trained on)")
    if not expect.noisy_statistics and (n_LE.sum(-1) != min(k, E) * tokens).any():
        raise ReplyError(f"{where}: {ROUTING_N} adds up to {n_LE.sum(-1).tolist()}, not top-k x tokens = {min(k, E) * tokens}")
    return p_LE, n_LE


_RECORD_TYPES = {ARRAYS: ArrayRecord, METRICS: MetricRecord, CONFIG: ConfigRecord, FEDALIGN_TARGET: ArrayRecord,
                 FEDALIGN_STATS: ArrayRecord, UPDATE: ArrayRecord}


def _check_record_types(content: RecordDict, error: type[ProtocolError] = ReplyError) -> None:
    """Each record of the protocol is of its own type (a ConfigRecord under ``metrics`` is refused)."""
    for key in content.keys():
        kind = _RECORD_TYPES.get(key)
        if kind is not None and not isinstance(content[key], kind):
            raise error(f"record {key!r} is {_a(type(content[key]).__name__)}, not {_a(kind.__name__)}")


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "AEIOU" else "a ") + noun


def read_train_reply(msg: Message, expect: Expectation) -> TrainReply:
    """A training reply, validated: names, shapes, dtypes and finiteness of the arrays; every figure and
    statistic in range. Raises ``ReplyError`` naming the first problem."""
    content, node = msg.content, msg.metadata.src_node_id
    sent_as = UPDATE if expect.base is not None else ARRAYS
    wanted = {sent_as, METRICS} | ({FEDALIGN_STATS} if expect.alignment else set())
    present = set(content.keys())
    if present != wanted:
        raise ReplyError(f"records {sorted(present)[:5]}, expected {sorted(wanted)}")
    _check_record_types(content)
    metrics, where = content[METRICS], "metrics"
    allowed = set(_REQUIRED_METRICS) | ({SUB_MOE} if expect.sub_moe else set()) | ({REG_LOSS} if expect.alignment else set())
    extra = sorted(set(metrics.keys()) - allowed)
    if extra:
        raise ReplyError(f"{where}: unexpected keys {extra[:3]}")
    pid = _number(metrics, PARTITION_ID, where, integer=True, low=0, high=expect.num_clients - 1)
    num_examples = _number(metrics, NUM_EXAMPLES, where, integer=True, low=1)
    if expect.partition_sizes is not None and num_examples != expect.partition_sizes[pid]:
        raise ReplyError(f"{where}: {NUM_EXAMPLES} = {num_examples:g}, but partition {pid} holds "
                         f"{expect.partition_sizes[pid]} training examples")
    work = expect.work
    steps = _number(metrics, TRAIN_STEPS, where, integer=True, low=1)
    if steps != work.steps(num_examples):
        raise ReplyError(f"{where}: {TRAIN_STEPS} = {steps}, but {num_examples} examples make {work.steps(num_examples)} "
                         "steps in this run's config")
    tokens = _number(metrics, TRAIN_TOKENS, where, integer=True, low=1,
                     high=steps * work.batch_size * work.rows_per_example * work.max_length)
    figures = TrainFigures(
        train_loss=_number(metrics, TRAIN_LOSS, where, low=0.0), train_steps=steps, train_tokens=tokens,
        train_seconds=_number(metrics, TRAIN_SECONDS, where, low=0.0),
        local_accuracy=_number(metrics, LOCAL_ACCURACY, where, low=0.0, high=1.0),
        local_loss=_number(metrics, LOCAL_LOSS, where, low=0.0),
        local_test_examples=_number(metrics, LOCAL_TEST_EXAMPLES, where, integer=True, low=0),
        reg_loss=_number(metrics, REG_LOSS, where, low=0.0) if expect.alignment else None)
    p_LE, n_LE = _check_routing(metrics, expect, tokens, where)
    L, E = p_LE.shape
    sub_moe_LE = None
    if expect.sub_moe:
        sub_moe_LE = _vector(metrics, SUB_MOE, L * E, where).reshape(L, E)
        if not ((sub_moe_LE == 0) | (sub_moe_LE == 1)).all() or (sub_moe_LE.sum(-1) < 1).any():
            raise ReplyError(f"{where}: {SUB_MOE} must be 0/1 with at least one expert a layer")
        sub_moe_LE = sub_moe_LE.bool()
    _check_arrays(content[sent_as], expect.shapes, _sub_moe_rows(expect.layout, sub_moe_LE))
    arrays = content[ARRAYS] if expect.base is None else _added_to(content[UPDATE], expect.base, expect.layout, sub_moe_LE)
    o_LE = m_LE = torch.zeros(L, E)
    mu_LEH = torch.zeros(L, E, 0)
    if expect.alignment:
        o_LE, m_LE, mu_LEH = _alignment_statistics(content[FEDALIGN_STATS], L, E, expect.hidden)
        if not expect.noisy_statistics:
            _check_consistency(p_LE, n_LE, o_LE, m_LE, tokens)
    routing = ModelRoutingStatistics(p_LE.float(), n_LE.float(), o_LE, m_LE, mu_LEH, tokens)
    return TrainReply(node, pid, num_examples, figures, routing, arrays, sub_moe_LE, msg)


def _alignment_statistics(record: ArrayRecord, L: int, E: int, H: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """o, m [L, E] in [0, 1] and mu [L, E, H] finite (H: the router's input width; any when not known)."""
    where = FEDALIGN_STATS
    if set(record.keys()) != {"o", "m", "mu"}:
        raise ReplyError(f"{where} holds {sorted(record.keys())[:4]}, expected ['m', 'mu', 'o']")
    o, m, mu = (read_array(record[k], f"{where}: {k}", shape, "float32").float()
                for k, shape in (("o", (L, E)), ("m", (L, E)), ("mu", (L, E, H) if H is not None else None)))
    if mu.ndim != 3 or mu.shape[:2] != (L, E):
        raise ReplyError(f"{where}: mu {tuple(mu.shape)} does not fit [{L}, {E}, H]")
    for name, t in (("o", o), ("m", m)):
        if not torch.isfinite(t).all() or (t < 0).any() or (t > 1).any():
            raise ReplyError(f"{where}: {name} must lie in [0, 1]")
    if not torch.isfinite(mu).all():
        raise ReplyError(f"{where}: mu holds NaN or Inf")
    return o, m, mu


STATS_TOLERANCE = 1e-3  # relative slack of the consistency checks for float32 sums


def _check_consistency(p_LE: torch.Tensor, n_LE: torch.Tensor, o_LE: torch.Tensor, m_LE: torch.Tensor, tokens: int) -> None:
    """What the definitions of p, n, o, m imply (``core.statistics``), which every honest client meets: an
    expert no token was routed to has o = m = 0 (both are means over those tokens), and the margins of
    the tokens routed to e cannot add up to more than the router probability of e over all tokens,
    n(e) m(e) <= p(e) T. A client that claims full consistency (o = m = 1) on an expert must therefore
    route its tokens there and give it the probability mass that goes with them."""
    where = FEDALIGN_STATS
    unused = n_LE == 0
    if ((o_LE > 0) & unused).any() or ((m_LE > 0) & unused).any():
        raise ReplyError(f"{where}: o or m above 0 for an expert no token was routed to (routing-n = 0)")
    margin_LE, mass_LE = n_LE * m_LE.double(), p_LE * tokens
    if (margin_LE > mass_LE * (1 + STATS_TOLERANCE) + STATS_TOLERANCE).any():
        l, e = map(int, torch.nonzero(margin_LE > mass_LE * (1 + STATS_TOLERANCE) + STATS_TOLERANCE)[0])
        raise ReplyError(f"{where}: layer {l} expert {e}: n x m = {float(margin_LE[l, e]):.4g} exceeds p x tokens = "
                         f"{float(mass_LE[l, e]):.4g} (margins cannot outweigh the routing probability)")


@dataclass(frozen=True)
class EvalReply:
    node_id: int
    partition_id: int
    num_examples: int
    accuracy: float
    loss: float


def read_eval_reply(msg: Message, num_clients: int, finite_loss: bool = True) -> EvalReply:
    """An evaluation reply, validated (``ReplyError`` otherwise). ``finite_loss=False``: a NaN or infinite
    loss is an answer (a diverged global model), not a malformed reply."""
    if set(msg.content.keys()) != {METRICS}:
        raise ReplyError(f"records {sorted(msg.content.keys())[:5]}, expected ['{METRICS}']")
    _check_record_types(msg.content)
    m, where = msg.content[METRICS], "metrics"
    loss = m.get(EVAL_LOSS)
    diverged = not finite_loss and isinstance(loss, float) and not math.isfinite(loss)
    return EvalReply(msg.metadata.src_node_id,
                     _number(m, PARTITION_ID, where, integer=True, low=0, high=num_clients - 1),
                     _number(m, NUM_EXAMPLES, where, integer=True, low=1),
                     math.nan if diverged else _number(m, EVAL_ACCURACY, where, low=0.0, high=1.0),
                     loss if diverged else _number(m, EVAL_LOSS, where, low=0.0))
