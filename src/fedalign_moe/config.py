"""The one configuration object of a run, validated at the edge.

A run is described by a preset (a TOML file shipped in ``fedalign_moe/presets``), optionally a user
file (TOML or JSON) on top of it, then command-line overrides on top of that. ``load_config`` merges
the three and validates the result; everything downstream receives a ``Config`` and trusts it.
"""

from __future__ import annotations

import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from .registry import STRATEGIES, STRATEGY_OPTIONS, spec

# Fields whose default changed after runs that lack them were stored, and the value those runs used:
# FedAlign-MoE weighted aligned experts by tokens until validation runs made `examples` the default; checkpoints
# loaded in float32 before `model.dtype` existed, and batches were padded to data.max_length.
LEGACY = {("fedalign", "expert_weights"): "tokens", ("model", "dtype"): "float32", ("train", "padding"): "max_length"}
# small random models of every transformers MoE family the tests run (models.hf_moe.FAMILIES, and Switch)
FAMILY_BACKBONES = tuple(f"tiny-{f}" for f in (
    "mixtral", "qwen2-moe", "qwen3-moe", "olmoe", "deepseek-v2", "deepseek-v3", "ernie4-5-moe", "glm4-moe", "granitemoe",
    "phimoe", "gpt-oss", "llama4-text", "hunyuan-v1-moe", "flex-olmo", "minimax", "dots1", "switch-transformers"))


class UserError(ValueError):
    """Bad input from the user (a config value, a file, a checkpoint): the message is one line meant for
    them. Every layer's own error (data, model, run setup, checkpoint, report) derives from it, so the
    CLI catches them all without importing the layers."""


class ConfigError(UserError):
    """A configuration value is invalid; the message is one line meant for the user."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    source: str = "mmlu-topic"  # mmlu | mmlu-topic | wordnet | file | hf:<name>
    # hub sources: the dataset's configuration (cais/mmlu's "all", or one subject) and the split read
    hf_config: str | None = None
    hf_split: str = "train"
    # multiple choice: "letters" (the answer letter after a prompt that lists the choices: MMLU's protocol),
    # "likelihood" (each choice's mean token log-probability after the context: HellaSwag's; causal LMs),
    # "auto": each benchmark's own (letters for MMLU's columns and the mmlu source, likelihood for HellaSwag's)
    choice_scoring: Literal["auto", "letters", "likelihood"] = "auto"
    path: str | None = None  # for source = "file": a .csv/.jsonl/.json/.parquet file
    text_column: str = "text"
    label_column: str = "label"
    group_column: str | None = None  # file/hub sources: a topic finer than the label (default: the label)
    wordnet_dir: str | None = None  # default /usr/share/wordnet (Debian wordnet-base)
    max_length: StrictInt = Field(64, ge=4, le=4096)  # tokens per example
    test_fraction: float = Field(0.2, gt=0, lt=1)  # global test split, stratified
    max_train: StrictInt | None = Field(None, ge=1)  # cap on the training pool (seeded subsample)
    max_test: StrictInt | None = Field(None, ge=1)
    local_test_fraction: float = Field(0.2, ge=0, lt=1)  # each client's own test split
    # "test": evaluate on the held-out test splits (reported results). "validation": for tuning; a
    # stratified validation_fraction of the training pool becomes the global evaluation set, each
    # client's own evaluation split is carved from what is left, and the test split is never read.
    holdout: Literal["test", "validation"] = "test"
    validation_fraction: float = Field(0.2, gt=0, lt=1)
    # a public split set aside before anything else (stratified by group, seeded by public_seed, so every
    # run seed sees the same one): no client and no test split ever holds it. model.recipe = "btx" trains
    # its experts on it; 0 sets nothing aside.
    public_fraction: float = Field(0.0, ge=0, lt=1)
    public_seed: StrictInt = Field(0, ge=0, lt=2**32)


class PartitionConfig(_Section):
    scheme: Literal["dirichlet", "iid", "pathological"] = "dirichlet"
    alpha: float = Field(0.1, gt=0)  # Dirichlet concentration; smaller is more skewed
    classes_per_client: StrictInt = Field(2, ge=1)  # pathological scheme only
    num_clients: StrictInt = Field(10, ge=1)
    min_partition_size: StrictInt = Field(2, ge=1)


class ModelConfig(_Section):
    # minilm: all-MiniLM-L6-v2 encoder upcycled to MoE; smollm2: SmolLM2-135M upcycled to Mixtral;
    # tiny-<family>: a small random model of a transformers MoE family (tests, smoke runs; FAMILY_BACKBONES);
    # any other value: a local folder or hub id of a transformers MoE checkpoint (docs/models.md).
    backbone: str = "minilm"
    num_experts: StrictInt = Field(4, ge=1)
    top_k: StrictInt = Field(2, ge=1)
    moe_layers: tuple[StrictInt, ...] = (4, 5)  # encoder layers whose FFN becomes MoE (minilm only)
    router_std: float = Field(0.02, ge=0)  # new routers start as N(0, std^2)
    expert_noise: float = Field(0.01, ge=0)  # relative noise that breaks expert symmetry at upcycling
    # how the experts get their roles (minilm): "upcycle" copies the dense FFN into every expert (sparse
    # upcycling); "drop-upcycle" re-initialises a share drop_ratio of each expert's inner dimensions from
    # the FFN's statistics (Drop-Upcycling, arXiv 2502.19261); "btx" trains each expert as a dense copy on
    # its own domain of the public split, then the routers on the whole public split (Branch-Train-MiX,
    # arXiv 2403.07816). A btx model is built once per machine and kept in build_cache_dir.
    recipe: Literal["upcycle", "drop-upcycle", "btx"] = "upcycle"
    drop_ratio: float = Field(0.5, ge=0, le=1)
    btx_epochs: StrictInt = Field(4, ge=1)  # passes over each domain's public examples (expert training)
    btx_router_epochs: StrictInt = Field(2, ge=1)  # passes over the public split (router training)
    btx_lr: float = Field(2e-4, gt=0)
    btx_balance_coef: float = Field(0.01, ge=0)  # Switch load-balancing loss weight during router training
    build_seed: StrictInt = Field(0, ge=0, lt=2**32)  # seed of the btx build (the same model for every run seed)
    build_cache_dir: str | None = "~/.cache/fedalign-moe/models"  # None: build in every process, keep nothing
    # what trains and travels: "experts-routers" (routed experts, routers, head), "all", "lora-experts" (LoRA
    # on the routed experts, routers and head in full) or "lora" (LoRA on the routed experts and on every
    # other linear layer of the decoder: attention, dense and shared-expert MLPs; routers and head in full)
    trainable: Literal["experts-routers", "all", "lora-experts", "lora"] = "experts-routers"
    lora_rank: StrictInt = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    # trainable = "lora": the linear modules that get LoRA, by the last part of their name (q_proj, o_proj,
    # gate_proj, ...); None: every nn.Linear inside the decoder's layers but the routers
    lora_targets: tuple[str, ...] | None = None
    # the dtype of the frozen base; what trains (and its optimiser state) stays float32, and the forward runs
    # under autocast in this dtype (mixed precision). "auto": a checkpoint in the dtype it was saved in (its
    # config.json; float32 when it names none), so a bfloat16 checkpoint is never widened to twice its
    # size; the built-in backbones in float32, so every published number stays as it was
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # "4bit" (QLoRA, Dettmers et al. 2023, arXiv 2305.14314): a checkpoint's frozen linear layers held in 4 bits
    # (NF4, bitsandbytes) under the LoRA factors, which train in float32; the routers, embeddings, norms, the
    # output layer and stacked routed experts (tensors, not linear layers: bitsandbytes quantises nn.Linear
    # only) stay in ``dtype``. Needs trainable = "lora" or "lora-experts" and the package's qlora extra
    quantize: Literal["none", "4bit"] = "none"
    # run a checkpoint's own modelling code (the .py files its folder or hub repository ships, as
    # DeepSeek-MoE-16B does): only for checkpoints you trust; a deployed node refuses it unless its node
    # config says allow-remote-code=true
    trust_remote_code: bool = False
    cache_frozen_prefix: bool = True  # encoder: cache outputs of the frozen layers below the MoE
    # ...and keep them on disk, keyed by the frozen weights and the token ids (None: memory only)
    prefix_cache_dir: str | None = "~/.cache/fedalign-moe/prefix"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @property
    def is_checkpoint(self) -> bool:
        """Whether ``backbone`` names a checkpoint folder (or hub id) rather than a built-in backbone."""
        return self.backbone not in ("minilm", "smollm2") and not self.backbone.startswith("tiny-")

    @model_validator(mode="after")
    def _check_top_k(self) -> ModelConfig:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed num_experts ({self.num_experts})")
        if self.backbone.startswith("tiny-") and self.backbone not in FAMILY_BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; the tiny ones are {', '.join(FAMILY_BACKBONES)}")
        if self.quantize != "none" and not (self.is_checkpoint and self.trainable in ("lora", "lora-experts")):
            raise ValueError(f"quantize = {self.quantize!r} freezes a checkpoint's base in 4 bits under LoRA: it needs a "
                             f"checkpoint backbone (not {self.backbone!r}) and trainable = 'lora' or 'lora-experts' "
                             f"(not {self.trainable!r})")
        if self.recipe != "upcycle" and self.backbone != "minilm":
            raise ValueError(f"recipe {self.recipe!r} builds minilm experts; backbone {self.backbone!r} takes "
                             "recipe = 'upcycle' (its own experts, or upcycled copies)")
        return self


class TrainConfig(_Section):
    local_epochs: StrictInt = Field(1, ge=0)
    local_steps: StrictInt | None = Field(None, ge=1)  # if set, overrides local_epochs
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: StrictInt = Field(32, ge=1)
    eval_batch_size: StrictInt = Field(128, ge=1)
    proximal_mu: float = Field(0.01, ge=0)  # FedProx only
    torch_threads: StrictInt | None = Field(None, ge=1)  # per simulated client process; None = torch's default
    # "longest": each batch padded to its own longest sequence (less compute where texts are shorter than
    # data.max_length; the same accuracy for models whose outputs ignore padding, the loss within float
    # rounding); "max_length": every batch padded to data.max_length, as every published run was (the
    # presets behind published numbers pin it). Switch Transformers' expert capacity counts padding tokens:
    # there the two differ.
    padding: Literal["max_length", "longest"] = "longest"
    # recompute each decoder layer's activations in the backward pass instead of keeping them: less memory
    # (transformers' own gradient checkpointing; the numbers stay the same), about a third more compute
    gradient_checkpointing: bool = False


class FederationConfig(_Section):
    strategy: str = "fedavg"
    rounds: StrictInt = Field(5, ge=1)
    fraction_train: float = Field(1.0, gt=0, le=1)
    client_cpus: float = Field(1.0, gt=0)  # simulation: CPU cores reserved per client actor
    client_gpus: float = Field(0.0, ge=0)  # GPUs a client process reserves; 0 on CUDA: from the memory plan
    # simulation: how many client processes (workers) run at once, each holding one copy of the frozen base
    # and serving many clients in turn; None: as many as the CPU cores, client_cpus and the memory plan allow
    workers: StrictInt | None = Field(None, ge=1)
    # where the global model is evaluated: "server" (the server process builds the model too), "node" (a
    # worker that already holds the base evaluates it; the server builds its model on the meta device and
    # never holds the weights), "auto": "node" when the frozen base is larger than 1 GB
    global_eval: Literal["auto", "server", "node"] = "auto"
    round_timeout: float | None = Field(None, gt=0)  # seconds to wait for replies; missing ones count as failures
    # stop the run after this many consecutive rounds that adopted no new global model (no valid reply,
    # e.g. dead client processes, which Flower's simulation does not revive, or a non-finite
    # aggregate); the summary then says so and the run exits 1. None: never stop.
    stop_after_silent_rounds: StrictInt | None = Field(2, ge=1)
    # a reply whose update norm per local step, ||w_i - w_g|| / steps, exceeds this many times the round's
    # median is dropped (robustness; None: never). Honest replies of every stored run: at most 4.8x (docs/robustness.md).
    max_update_norm_ratio: float | None = Field(10.0, gt=1)
    # [ours] a norm clip, off by default (docs/robustness.md "Measured under attack"), with 3 or more replies: an
    # update whose norm per square root of its local steps is above this x the round's median is scaled down
    # to it (kept, not dropped; honest replies of every stored run: at most 2.41x)
    clip_update_norm_ratio: float | None = Field(None, ge=1)
    # what a reply's example count (its weight in every average) may claim. "checked": it must equal its
    # partition's size in the run's data, which the server prepares too; "claimed": taken within the bounds
    # below; "auto": checked unless the data is a file, which a deployed node may replace with its own
    # (node config data-path)
    example_counts: Literal["auto", "checked", "claimed"] = "auto"
    # bounds on a claimed count (None: none): it counts at most max_examples_ratio x the round's median,
    # and no reply weighs more than max_weight_share of a round of 4 or more replies. Honest spread over
    # every published run: at most 16.5x the median, a share of 0.43 (docs/robustness.md)
    max_examples_ratio: float | None = Field(50.0, gt=1)
    max_weight_share: float | None = Field(0.5, gt=0, le=1)
    # nodes: a round starts once min_available_nodes are connected; before round 1 the server waits up
    # to node_wait_seconds for all num_clients nodes, then starts with those connected (deployments); with
    # global_eval = node, the request for the initial model waits as long for the first node.
    min_available_nodes: StrictInt = Field(1, ge=1)
    node_wait_seconds: float = Field(120.0, ge=0)
    fedmoe_coverage: float = Field(0.9, gt=0, le=1)  # FedMoE: share of selections a sub-MoE covers [ours]
    # Flower's robust baselines: the share cut from each end per coordinate (fedtrimmedavg), and the hostile
    # nodes the rule is built to withstand (krum, multikrum, bulyan; bulyan needs 4f + 3 replies a round)
    trim_beta: float = Field(0.2, ge=0, lt=0.5)
    num_malicious: StrictInt = Field(1, ge=0)
    # server optimisers: the step the server takes along the round's average update (FedAvgM's server
    # learning rate; eta of the adaptive ones, whose step per coordinate is about eta x update / (|update| +
    # tau): with eta = tau it is FedAvg's for updates much smaller than tau), FedAvgM's momentum, and the
    # adaptive ones' moments and adaptivity (FedAdagrad reads tau only). None: 1.0 for FedAvgM, 1e-3 for the
    # adaptive ones (Flower's 0.1 moves a fine-tuned model ~100x further a round than its clients did)
    server_lr: float | None = Field(None, gt=0)
    server_momentum: float = Field(0.9, ge=0, lt=1)
    server_beta_1: float = Field(0.9, ge=0, lt=1)
    server_beta_2: float = Field(0.99, ge=0, lt=1)
    server_tau: float = Field(1e-3, gt=0)
    # the dtype a training round's parameters travel in, each way: "bfloat16" halves the bytes (the server keeps
    # its global model in float32 and clients send their update, trained minus received, so rounding never
    # accumulates over rounds); on `specialised` (3 seeds, paired) -0.7 +- 5.4 points over the last 5 rounds
    # for half the bytes (docs/llm.md)
    wire_dtype: Literal["float32", "bfloat16"] = "float32"

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v: str) -> str:
        if v not in STRATEGIES:
            raise ValueError(f"unknown strategy {v!r}; choose one of {', '.join(STRATEGIES)}")
        return v


    def effective_server_lr(self) -> float:
        """``server_lr``, or the strategy's default step when it is None."""
        return self.server_lr if self.server_lr is not None else (1.0 if self.strategy == "fedavgm" else 1e-3)


class FedAlignConfig(_Section):
    """FedAlign-MoE's knobs. The ``fedalign*`` strategy names set the four switches (the ablation
    ladder); a user file or ``--set fedalign.<field>=...`` can set any of them for ``fedalign``."""

    reg_lambda: float = Field(0.1, ge=0)  # weight of the gate regulariser [summary]
    beta: float = Field(1.0, ge=0)  # threshold tau = M - beta * S [ours]
    consistency_floor: float = 0.5  # clients with c_i >= floor stay aligned whatever tau says [ours]
    omega_times_tokens: bool = False  # weight consistency by routed tokens [ours]
    stats_noise_sigma: float = Field(0.0, ge=0)  # Gaussian noise on uploaded statistics (relative)
    gate_aggregation: Literal["consistency", "uniform", "fedavg"] = "consistency"
    gate_regulariser: bool = True
    adaptive_alpha: bool = True
    expert_aggregation: Literal["semantic", "fedavg"] = "semantic"
    # the weights of the aligned clients' updates of expert e [ours]: "tokens" w_i = n_i(e) / sum over A(e)
    # of n (they sum to 1 over A(e)); "examples" w_i = N_i / N, FedAvg's weight, for i in A(e) and 0 outside
    # (not renormalised: the left-out clients' share keeps the global value, so A(e) = everyone is FedAvg);
    # "examples" is the default since validation runs (docs/fedalign.md#expert-weights)
    # "routed" [ours]: w_i = N_i / N_routed(e), N_routed(e) the examples of the clients that routed any
    # token to e, so clients that never use e do not shrink its step
    expert_weights: Literal["tokens", "examples", "routed"] = "examples"
    # model.trainable = lora-experts: expert e's update compared across clients as its LoRA product B_e A_e
    # ("product") or as its two factors ("factors"); either way A_e and B_e are then averaged over A(e) [ours]
    lora_direction: Literal["product", "factors"] = "product"
    # a client outside A(e) keeps its own expert e (and router row e) for its own use instead of taking the
    # global one (core.personal); needs expert_aggregation = "semantic" [ours]
    personal_experts: bool = False
    # FedProx's proximal term (mu/2) ||w - w_global||^2 added to each client's loss beside the gate
    # regulariser: the regulariser anchors the routing distribution, this anchors the weights; 0 is the
    # paper's objective [ours: docs/fedalign.md#proximal-term]
    proximal_mu: float = Field(0.0, ge=0)
    # no client weighs more than this many times its example share in any router row (and so in p_g): a
    # bound on what routing statistics can buy (docs/robustness.md); None: the paper's unbounded weights.
    # Honest consistency weights reach 700x a small client's share on specialised [ours]
    router_share_factor: float | None = Field(None, ge=1)
    # expert e's update over its aligned set A(e) as a coordinate-wise trimmed mean cutting this share of
    # A(e) from each end (0.5: the median) instead of the weighted mean, where A(e) holds 3 or more clients;
    # None: the weighted mean. Robust to a minority of hostile experts of the same role [ours]
    expert_trim: float | None = Field(None, gt=0, le=0.5)
    # keeping agreeing clients in A(e) [ours]: A(e) holds at least this share of the clients that
    # routed to e, the most consistent first (0.5: a majority); None: the threshold's set as it is
    min_aligned_share: float | None = Field(None, gt=0, le=1)
    # "set": A(e) by the threshold (the paper's); "soft": no hard set, each client's weight times
    # s_i = clamp(c_i / max_j c_j, 0, 1), so a client whose expert plays another role (c_i <= 0) weighs nothing
    expert_selection: Literal["set", "soft"] = "set"


class OutputConfig(_Section):
    """What a run writes beside its metrics (none of it changes a number)."""

    # TensorBoard event files in DIR/tensorboard: per-round metrics, FedAlign-MoE's decisions as scalars,
    # each round's routing heatmap as an image (`tensorboard --logdir DIR`)
    tensorboard: bool = False


class AttackConfig(_Section):
    """Hostile clients, for measuring what an attack costs (simulation only: a deployed node refuses to
    attack, whatever the run config says). The hostile clients train honestly, then change their reply."""

    # none | sign-flip (send w_g - update) | scale (send w_g + factor x update; 9: just inside the norm rule
    # when the honest paces are alike) | inflate (claim factor x its examples, with a consistent step count)
    # | capture (FedAlign-MoE statistics: all tokens, probability, overlap and margin on one expert, which
    # passes every consistency rule of the screen)
    kind: Literal["none", "sign-flip", "scale", "inflate", "capture"] = "none"
    clients: list[StrictInt] = [0]  # partition ids of the hostile clients (two or more: they collude)
    factor: float | None = Field(None, gt=0)  # scale: 9; inflate: 100
    expert: StrictInt = Field(0, ge=0)  # capture: the expert every layer's statistics point at


class Config(_Section):
    preset: str = "custom"
    seed: StrictInt = Field(0, ge=0, lt=2**32)  # whole numbers only: true is not 1
    out_dir: str = "runs/latest"
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    federation: FederationConfig = FederationConfig()
    fedalign: FedAlignConfig = FedAlignConfig()
    output: OutputConfig = OutputConfig()
    attack: AttackConfig = AttackConfig()

    @model_validator(mode="after")
    def _nodes_exist(self) -> Config:
        if self.attack.kind != "none":
            bad = [c for c in self.attack.clients if not 0 <= c < self.partition.num_clients]
            if bad or not self.attack.clients:
                raise ValueError(f"attack.clients {self.attack.clients} must name partitions in 0..{self.partition.num_clients - 1}")
            if self.attack.expert >= self.model.num_experts and not self.model.is_checkpoint:
                raise ValueError(f"attack.expert {self.attack.expert} must be below model.num_experts ({self.model.num_experts})")
        if self.federation.min_available_nodes > self.partition.num_clients:
            raise ValueError(f"federation.min_available_nodes ({self.federation.min_available_nodes}) cannot exceed "
                             f"partition.num_clients ({self.partition.num_clients})")
        if self.model.recipe == "btx" and self.data.public_fraction == 0:
            raise ValueError("model.recipe = 'btx' trains its experts on a public split: set data.public_fraction "
                             "(for example 0.2)")
        if self.federation.global_eval == "node" and self.model.backbone in ("minilm", "smollm2"):
            raise ValueError(f"federation.global_eval = 'node' keeps the base out of the server, which builds its model "
                             f"without weights; {self.model.backbone} is built from its weights: use 'server' or 'auto'")
        if self.keeps_personal_experts() and self.effective_fedalign().expert_aggregation != "semantic":
            raise ValueError(f"fedalign.personal_experts keeps the experts outside their aligned sets, and strategy "
                             f"{self.federation.strategy!r} aggregates experts without aligned sets (expert_aggregation "
                             "= fedavg): use strategy fedalign")
        if self.keeps_personal_experts() and self.federation.clip_update_norm_ratio is not None:
            raise ValueError("federation.clip_update_norm_ratio measures each reply against the global model, and with "
                             "fedalign.personal_experts a node's own experts lie far from it by design (up to 3.9x the "
                             "round's median on specialised): use one or the other")
        return self

    def effective_fedalign(self) -> FedAlignConfig:
        """The FedAlign-MoE options of this run, with the ablation rung's switches applied."""
        return self.fedalign.model_copy(update=spec(self.federation.strategy).fixed)

    def keeps_personal_experts(self) -> bool:
        """Whether this run's clients keep their own copy of the experts outside their aligned sets."""
        return "fedalign" in spec(self.federation.strategy).reads and self.effective_fedalign().personal_experts

    def to_json(self) -> str:
        return self.model_dump_json()

    def result_key(self) -> dict[str, Any]:
        """Everything that can change a run's numbers: the config minus where files go and what is written,
        and minus the options its strategy never reads, so that a new default of one strategy's option
        keeps the other strategies' finished runs (FedAvg's runs do not depend on ``fedalign.*``)."""
        raw = self.model_dump(mode="json")
        raw.pop("out_dir")
        raw.pop("output")
        raw["model"].pop("prefix_cache_dir")
        raw["model"].pop("build_cache_dir")
        raw["model"].pop("trust_remote_code")  # whether a checkpoint's code may run: it loads, or it does not
        if raw["model"]["dtype"] == "auto" and not self.model.is_checkpoint:
            raw["model"]["dtype"] = "float32"  # what "auto" means for the built-in backbones (stored runs: LEGACY)
        raw["federation"].pop("workers")  # where and how many processes compute changes no number
        raw["federation"].pop("global_eval")
        strategy = spec(self.federation.strategy)
        for option in STRATEGY_OPTIONS:  # options this strategy never reads
            if option in strategy.reads:
                continue
            section, _, name = option.partition(".")
            if name:
                raw[section].pop(name)
            else:
                raw.pop(section)
        if "fedalign" in strategy.reads:
            raw["fedalign"] = self.effective_fedalign().model_dump(mode="json")  # the rung's switches applied
            if raw["fedalign"]["expert_aggregation"] != "semantic":  # read by semantic expert aggregation only
                for option in ("beta", "consistency_floor", "expert_weights", "lora_direction", "expert_trim",
                               "min_aligned_share", "expert_selection"):
                    raw["fedalign"].pop(option)
        if not strategy.federated:  # nothing travels
            raw["federation"].pop("wire_dtype")
        if self.attack.kind == "none":  # no hostile client: where it would be changes no number
            raw.pop("attack")
        return raw

    @classmethod
    def from_json(cls, text: str) -> Config:
        """A config as written by ``to_json``, also one stored by an older version (``from_stored``)."""
        return cls.from_stored(json.loads(text))

    @classmethod
    def from_stored(cls, raw: Any) -> Config:
        """A stored config (a run's summary, config.json, checkpoint): a field it lacks, added since with a
        default that differs from what runs did before it existed, takes that earlier value (``LEGACY``)."""
        return cls.model_validate(with_legacy(raw))


def with_legacy(raw: Any) -> Any:
    """A stored config tree with every ``LEGACY`` field it lacks set to the value runs used before it existed."""
    if not isinstance(raw, dict):
        return raw
    raw = {**raw}
    for (section, field), value in LEGACY.items():
        stored = raw.get(section, {})
        if isinstance(stored, dict) and field not in stored:
            raw[section] = {**stored, field: value}
    return raw


def preset_names() -> list[str]:
    """Names of the presets shipped with the package."""
    files = resources.files("fedalign_moe").joinpath("presets").iterdir()
    return sorted(f.name[: -len(".toml")] for f in files if f.name.endswith(".toml"))


def read_preset(name: str) -> dict[str, Any]:
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(preset_names())}")
    text = resources.files("fedalign_moe").joinpath("presets", f"{name}.toml").read_text()
    return tomllib.loads(text)


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
        raw = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"cannot read config file {p}: {err.strerror}") from None
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"cannot parse config file {p}: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a table of sections, not a {type(raw).__name__}")
    return raw


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Merge ``top`` into ``base`` recursively; values of ``top`` win."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=1e-4", "model.top_k=1"]`` into a nested dict (values parsed as JSON if possible)."""
    nested: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = nested
        *parents, leaf = dotted.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def validate(raw: dict[str, Any]) -> Config:
    """Validate a merged dict, turning pydantic's report into one readable line."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "config"
        msg = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"invalid config value at {where}: {msg}") from None


def load_config(
    preset: str, config_file: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> Config:
    """Preset, then file, then overrides; validated."""
    raw = read_preset(preset)
    raw["preset"] = preset
    if config_file is not None:
        raw = deep_merge(raw, read_config_file(config_file))
    return validate(deep_merge(raw, overrides or {}))
