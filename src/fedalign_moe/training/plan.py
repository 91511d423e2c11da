"""The memory plan of a run, made before anything heavy is loaded: what each process holds, how many
workers fit, and whether the run fits at all.

A federated run on one machine is a server process, the simulation engine's own processes (Ray's), and
W workers (client processes), each holding one copy of the frozen base and serving many clients in turn.
The plan counts, per worker:
- base: every frozen parameter at its dtype (``model.dtype``);
- trainable: the parameters that train and travel (float32), their gradients, AdamW's two moments, the
  received global copy and the reply's copy: 6 x 4 bytes a parameter (one more with a proximal term, and
  one more where the node keeps the initial model for a server that holds none);
- activations of one training step at ``train.batch_size`` x ``data.max_length`` tokens (below);
- runtime: Python with torch, transformers and flwr imported, and the run's data (``RUNTIME_BYTES``).
The sum is the worker's ``peak_bytes``. The server adds its runtime, the replies of a round's sampled
clients (``MESSAGE_COPIES`` times each reply's bytes, plus each reply added up in float32 when replies
travel in bfloat16: ``federation.wire_dtype``) and, when it evaluates the global model itself, a base and
the trainable parameters; Ray adds ``ENGINE_BYTES``.

Activations, per token and decoder layer, with b bytes an activation element (2 under a 16-bit autocast,
4 in float32), H the hidden size, P_d the layer's dense parameters (attention, dense and shared MLPs),
P_e one routed expert's parameters and k the experts a token visits [ours; calibrated on this package's
runs, benchmarks/llm_memory.py]: b (4 H + 1.5 P_d / H) + 8 H (norms in float32) + k b (2 H + 1.33 P_e / H)
+ 8 E. LoRA on stacked experts (peft's ``target_parameters``) materialises W + BA for each MoE layer in
the forward and keeps it for the backward: a whole expert stack per layer. Gradient checkpointing keeps
only each layer's input (T H b) and recomputes one layer at a time. The backward adds one layer's
activations (and, with expert LoRA, one stack's W + BA and its gradient). Attention scores are not
counted: transformers' SDPA attention does not keep them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch

from ..config import Config, ConfigError
from ..models.build import BuiltModel, parameter_numel, supports_meta
from ..registry import spec
from .setup import FederatedData, base_bytes, build_for, evaluates_on_node, prepare_data

# measured on this package's 2-core CPU machine (benchmarks/llm_memory.py, docs/benchmarks.md#llms):
RUNTIME_BYTES = 600_000_000  # one client process before its model: Python, torch, transformers, flwr, Ray's worker, data
ENGINE_BYTES = 400_000_000  # Ray's own processes in a simulation (GCS, raylet, log monitor, ...)
# the server holds each sampled client's reply while it aggregates, with the copies Flower's simulation
# makes on the way (serialised, deserialised): measured 2.4x the reply's arrays a client (16.5 MB replies,
# 2 against 10 clients: +312 MB), rounded up
MESSAGE_COPIES = 3
GB = 1e9


@dataclass(frozen=True)
class ModelFacts:
    """What the plan reads off a model (built on the meta device where the backbone allows)."""

    parameters: int
    active_parameters: int  # per token: everything but the routed experts a token does not visit
    trainable_parameters: int
    base_bytes: int
    hidden: int
    layers: int  # layers of the network (decoder layers; encoder + decoder for Switch)
    moe_layers: int
    num_experts: int
    top_k: int
    expert_parameters_per_layer: int  # one MoE layer's routed experts (the stacked tensors)
    dense_parameters_per_layer: int
    lora_on_experts: bool
    base_element_bytes: int
    activation_element_bytes: int  # 2 under a 16-bit autocast, 4 in float32
    routing_stats_bytes: int  # FedAlign-MoE's statistics a reply carries beside the update
    rows_per_example: int = 1  # sequences a training example is read as (one a choice scored by likelihood)

    @classmethod
    def of(cls, built: BuiltModel) -> ModelFacts:
        params = dict(built.model.named_parameters())
        layout = built.adapter.layout
        E, k = layout.num_experts, min(layout.top_k, layout.num_experts)
        expert_names = {n for l in layout.layers for n in l.experts}
        routed = sum(params[n].numel() for n in expert_names)
        total = sum(parameter_numel(p) for p in params.values())
        embeddings = sum(parameter_numel(m.weight) for n, m in built.model.named_modules()  # input and output embeddings
                         if isinstance(m, torch.nn.Embedding) or n.split(".")[-1] == "lm_head")
        config = built.model.config
        hidden = int(getattr(config, "hidden_size", None) or config.d_model)
        has_decoder = any(n.split(".")[-1] == "decoder" for n, _ in built.model.named_modules())
        if getattr(config, "is_encoder_decoder", False):  # Switch: its encoder, and its decoder where it runs
            layers = int(config.num_layers) + (int(config.num_decoder_layers) if has_decoder else 0)
        else:
            layers = int(getattr(config, "num_hidden_layers", 0) or len(layout.layers))
        routers = sum(params[l.router].numel() for l in layout.layers)
        dense = max(total - embeddings - routed - routers - sum(params[n].numel() for n in built.trainable
                                                                  if "lora_" in n), 0) // max(layers, 1)
        keep = set(built.trainable)
        frozen = [p for n, p in params.items() if n not in keep]
        return cls(
            parameters=total, active_parameters=total - routed + routed * k // E,
            trainable_parameters=sum(params[n].numel() for n in built.trainable),
            base_bytes=base_bytes(built), hidden=hidden, layers=layers, moe_layers=len(layout.layers),
            num_experts=E, top_k=k, expert_parameters_per_layer=routed // max(len(layout.layers), 1),
            dense_parameters_per_layer=dense, lora_on_experts=any(l.lora for l in layout.layers),
            base_element_bytes=frozen[0].element_size() if frozen else 4,
            activation_element_bytes=torch.empty(0, dtype=getattr(built.model, "compute_dtype", torch.float32)).element_size(),
            routing_stats_bytes=len(layout.layers) * E * (hidden + 4) * 4, rows_per_example=built.rows_per_example)


@dataclass(frozen=True)
class WorkerMemory:
    base_bytes: int
    trainable_bytes: int  # parameters, gradients, optimiser moments and the copies that travel
    activation_bytes: int
    runtime_bytes: int

    @property
    def peak_bytes(self) -> int:
        return self.base_bytes + self.trainable_bytes + self.activation_bytes + self.runtime_bytes


@dataclass(frozen=True)
class Plan:
    facts: ModelFacts
    worker: WorkerMemory
    server_bytes: int
    engine_bytes: int
    workers: int  # 0: not even one fits
    workers_fixed: bool  # set by federation.workers rather than derived
    global_eval: str  # "server" or "node"
    device: str
    available_bytes: int  # free memory of the device the workers compute on (host memory on a CPU)
    reply_bytes_down: int
    reply_bytes_up: int
    total_bytes: int  # what the run needs of ``available_bytes`` (per GPU on CUDA)
    fits: bool

    def summary_line(self) -> str:
        f, w = self.facts, self.worker
        return (f"plan: {f.parameters / 1e9:.2f}B parameters ({f.active_parameters / 1e9:.2f}B active, "
                f"{f.trainable_parameters / 1e6:.1f}M trainable); per worker {w.peak_bytes / GB:.1f} GB (base "
                f"{w.base_bytes / GB:.1f}, trainable {w.trainable_bytes / GB:.2f}, activations "
                f"{w.activation_bytes / GB:.2f}); {self.workers} worker{'s' * (self.workers != 1)}, global model "
                f"evaluated on the {self.global_eval}; {self.total_bytes / GB:.1f} GB of {self.available_bytes / GB:.1f} "
                f"GB free on {self.device}" + ("" if self.fits else ": does not fit"))

    def to_json(self) -> str:
        worker = {**asdict(self.worker), "peak_bytes": self.worker.peak_bytes}
        return json.dumps({"parameters": self.facts.parameters, "active_parameters": self.facts.active_parameters,
                           "trainable_parameters": self.facts.trainable_parameters, "model": asdict(self.facts),
                           "reply_bytes_down": self.reply_bytes_down, "reply_bytes_up": self.reply_bytes_up,
                           "worker": worker, "peak_bytes": self.worker.peak_bytes, "workers": self.workers,
                           "server_bytes": self.server_bytes, "engine_bytes": self.engine_bytes,
                           "total_bytes": self.total_bytes, "available_bytes": self.available_bytes,
                           "device": self.device, "global_eval": self.global_eval, "fits": self.fits}, indent=1)


def activation_bytes(f: ModelFacts, cfg: Config) -> int:
    """One training step's activations and backward transients (the module docstring's model)."""
    b = f.activation_element_bytes
    T, H = cfg.train.batch_size * f.rows_per_example * cfg.data.max_length, f.hidden
    moe_share = f.moe_layers / max(f.layers, 1)
    P_e = f.expert_parameters_per_layer / max(f.num_experts, 1)
    per_token_layer = (b * (4 * H + 1.5 * f.dense_parameters_per_layer / H) + 8 * H
                       + moe_share * (f.top_k * b * (2 * H + 1.33 * P_e / H) + 8 * f.num_experts))
    one_layer = T * per_token_layer
    stack = f.expert_parameters_per_layer * f.base_element_bytes if f.lora_on_experts else 0
    if cfg.train.gradient_checkpointing:
        kept = f.layers * T * H * b + one_layer + stack
    else:
        kept = f.layers * one_layer + f.moe_layers * stack
    backward = one_layer + 2 * stack
    autocast_copies = f.trainable_parameters * b if b == 2 else 0  # 16-bit copies of float32 weights
    return int(kept + backward + autocast_copies + T * H * b)


def _available(device: str) -> tuple[int, int]:
    """(free bytes of one device, devices): host memory on a CPU, each GPU's free memory on CUDA."""
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("model.device = 'cuda' but no CUDA device is available (fedalign-moe plan: --free-gb "
                              "plans for one elsewhere)")
        free, _ = torch.cuda.mem_get_info(0)
        return int(free), torch.cuda.device_count()
    import psutil

    return int(psutil.virtual_memory().available), 1


def make_plan(cfg: Config, built: BuiltModel, available: tuple[int, int] | None = None) -> Plan:
    """The plan of ``cfg`` for a model ``built`` from it (on the meta device, or for real); ``available``
    (free bytes, devices) overrides what the machine reports (tests)."""
    f = ModelFacts.of(built)
    device = "cuda" if cfg.model.device == "cuda" or (cfg.model.device == "auto" and torch.cuda.is_available()) else "cpu"
    on_node = evaluates_on_node(cfg, f.base_bytes)
    strategy = spec(cfg.federation.strategy)
    copies = (6 + (1 if "train.proximal_mu" in strategy.reads or cfg.fedalign.proximal_mu > 0 else 0)
              + (1 if on_node else 0))  # a node keeps the initial model it may be asked for
    worker = WorkerMemory(f.base_bytes, f.trainable_parameters * 4 * copies, activation_bytes(f, cfg), RUNTIME_BYTES)
    wire = 2 if cfg.federation.wire_dtype == "bfloat16" else 4  # bytes a parameter travels in
    up = f.trainable_parameters * wire + (f.routing_stats_bytes if "fedalign" in strategy.reads else 0)
    sampled = max(1, math.ceil(cfg.federation.fraction_train * cfg.partition.num_clients))
    server_model = 0 if on_node else f.base_bytes + f.trainable_parameters * 4 * 2  # the server's own model
    rebuilt = sampled * f.trainable_parameters * 4 if wire == 2 else 0  # each bfloat16 update added up in float32
    server = RUNTIME_BYTES + MESSAGE_COPIES * sampled * up + rebuilt + server_model
    free, devices = available or _available(device)
    federated = strategy.federated
    engine = ENGINE_BYTES if federated else 0
    on_gpu = worker.peak_bytes - RUNTIME_BYTES  # CUDA: weights, state and activations; the process in host memory
    server_gpu = server_model  # CUDA: on GPU 0
    if not federated:  # one process trains in turn: the server process is the worker
        server, server_gpu, workers, fixed = 0, 0, 1, True
    elif cfg.federation.workers is not None:
        workers, fixed = cfg.federation.workers, True
    else:
        fixed = False
        by_cpu = max(1, int((os.cpu_count() or 1) // cfg.federation.client_cpus))
        if device == "cuda":
            by_memory = devices * (free // max(on_gpu, 1)) - (-(-server_gpu // max(on_gpu, 1)))
        else:
            by_memory = (free - server - engine) // max(worker.peak_bytes, 1)
        workers = int(max(0, min(cfg.partition.num_clients, by_cpu, by_memory)))
    if device == "cuda":  # per GPU: its share of the workers, and the server's model on the first
        need = -(-max(workers, 1) // devices) * on_gpu + server_gpu  # (a GPU run's host memory is not checked)
    else:
        need = server + engine + max(workers, 1) * worker.peak_bytes
    return Plan(f, worker, server, engine, workers, fixed, "node" if on_node else "server", device, free,
                f.trainable_parameters * wire, up, need, workers >= 1 and need <= free)


def plan_model(cfg: Config, data: FederatedData | None = None) -> BuiltModel:
    """The model a plan reads: built on the meta device (no weight loaded) where the backbone allows."""
    data = data if data is not None else prepare_data(cfg)
    return build_for(cfg, data, meta=supports_meta(cfg.model))


def what_would_fit(cfg: Config, built: BuiltModel, available: tuple[int, int] | None = None) -> str | None:
    """The changes that make ``cfg`` fit, tried in this order and kept as they add up: a bfloat16 base,
    gradient checkpointing, halving the batch size, one worker; as ``section.key = value and ...`` (None:
    even all of them do not fit)."""
    tries: list[tuple[str, str, object]] = []  # (section, field, value)
    if getattr(built.model, "compute_dtype", torch.float32) == torch.float32:  # a float32 base
        tries.append(("model", "dtype", "bfloat16"))
    if not cfg.train.gradient_checkpointing and cfg.model.backbone != "minilm":  # transformers backbones only
        tries.append(("train", "gradient_checkpointing", True))
    batch = cfg.train.batch_size
    while batch > 1:
        batch //= 2
        tries.append(("train", "batch_size", batch))
    if cfg.federation.workers is not None and cfg.federation.workers > 1:
        tries.append(("federation", "workers", 1))
    changed, other, rebuilt = [], cfg, built
    for section, field, value in tries:  # cumulative: each change on top of the ones before
        if section == "train" and field == "batch_size" and any(c.startswith("train.batch_size") for c in changed):
            changed.pop()
        other = other.model_copy(update={section: getattr(other, section).model_copy(update={field: value})})
        rebuilt = plan_model(other) if section == "model" else rebuilt
        changed.append(f"{section}.{field} = {json.dumps(value)}")
        if make_plan(other, rebuilt, available).fits:
            return " and ".join(changed)
    return None


def refusal(plan: Plan, suggestion: str | None) -> str:
    """The one error line of a run that does not fit."""
    need = plan.total_bytes
    return (f"the run needs {need / GB:.1f} GB ({plan.worker.peak_bytes / GB:.1f} GB per worker: base "
            f"{plan.worker.base_bytes / GB:.1f}, trainable {plan.worker.trainable_bytes / GB:.2f}, activations "
            f"{plan.worker.activation_bytes / GB:.2f}) but {plan.available_bytes / GB:.1f} GB is free on {plan.device}; "
            + (f"set {suggestion} to fit" if suggestion else "no single option makes it fit: use a smaller model, "
               "a shorter data.max_length or a machine with more memory"))


# What one H100 achieves on a training step, in model FLOP/s [ours]: from 83 TFLOP/s, measured for this
# package's step on the `gpu` preset's 0.37B Mixtral at batch 128 in bfloat16 (docs/gpu.md), to 400 TFLOP/s,
# about 40% of the card's dense bfloat16 peak, which the larger matmuls of billion-parameter models approach.
H100_FLOPS_PER_SECOND = (83e12, 400e12)


@dataclass(frozen=True)
class ComputeEstimate:
    """A run's arithmetic, bounded from above: every sequence counted at ``data.max_length`` tokens (a
    choice scored by likelihood: one sequence a choice), every parameter a token visits as a matmul."""

    train_tokens: int
    eval_tokens: int
    flops: float

    def gpu_hours(self) -> tuple[float, float]:
        """(at the faster rate, at the slower rate) hours on one H100 (``H100_FLOPS_PER_SECOND``)."""
        return self.flops / max(H100_FLOPS_PER_SECOND) / 3600, self.flops / min(H100_FLOPS_PER_SECOND) / 3600


def estimate_compute(cfg: Config, facts: ModelFacts, data: FederatedData) -> ComputeEstimate:
    """The tokens a run trains on and evaluates, and their FLOPs: 2 A a token forward, 2 A more backward for
    the activations' gradients and 2 min(T, A) for the trainable weights' (A: active parameters, T: trainable),
    so 6 A when everything trains; 2 A a token evaluated. A federated round trains the sampled clients (the
    largest partitions, for a bound) for their local epochs (or steps), evaluates each on its own test split
    and the global model on the global test split; its last round evaluates the global model on every
    client's test split. ``local`` and ``centralised`` train on every client's data each round and evaluate
    on every client's test split and the global one (``local``: each client's model on it)."""
    seq = cfg.data.max_length * facts.rows_per_example
    rounds, t = cfg.federation.rounds, cfg.train
    clients, federated = len(data.client_train), spec(cfg.federation.strategy).federated
    sampled = max(1, math.ceil(cfg.federation.fraction_train * clients)) if federated else clients
    largest = sorted(range(clients), key=lambda c: -len(data.client_train[c]))[:sampled]
    if t.local_steps is not None:
        trained = sampled * t.local_steps * t.batch_size
    else:
        trained = sum(len(data.client_train[c]) for c in largest) * t.local_epochs
    own_tests = sum(len(part) for part in data.client_test)
    sampled_tests = sum(sorted((len(part) for part in data.client_test), reverse=True)[:sampled])
    global_tests = len(data.global_test) * (clients if cfg.federation.strategy == "local" else 1)
    evaluated = rounds * (sampled_tests + global_tests) + (own_tests if federated else 0)
    A = facts.active_parameters
    train_tokens, eval_tokens = int(rounds * trained * seq), int(evaluated * seq)
    flops = train_tokens * (4 * A + 2 * min(facts.trainable_parameters, A)) + eval_tokens * 2 * A
    return ComputeEstimate(train_tokens, eval_tokens, float(flops))


def check_fits(cfg: Config, built: BuiltModel | None = None) -> Plan:
    """The plan of ``cfg``; ``ConfigError`` (one line naming the numbers and the option that would make it
    fit) when it does not fit."""
    built = built if built is not None else plan_model(cfg)
    plan = make_plan(cfg, built)
    if not plan.fits:
        raise ConfigError(refusal(plan, what_would_fit(cfg, built)))
    return plan
