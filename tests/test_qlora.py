"""``model.quantize = "4bit"`` (QLoRA): a checkpoint's frozen linear layers in NF4 (bitsandbytes, on this CPU)
under float32 LoRA factors; the same 4-bit set whether built for real or on the meta device (the plan's
model); routers, output layer and stacked experts untouched; one line for a config that cannot be quantised."""

import json

import pytest
import torch

from fedalign_moe.config import ConfigError, load_config
from fedalign_moe.models.assets import ModelLoadError
from fedalign_moe.models.build import FOUR_BIT_BYTES, build_model
from fedalign_moe.training.setup import base_bytes

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Qwen2-MoE checkpoint in bfloat16 (attention, shared expert and its gate as linear layers)."""
    from transformers import AutoModelForCausalLM

    from fedalign_moe.models.build import minilm_tokenizer
    from fedalign_moe.models.hf_moe import tiny_config

    folder = tmp_path_factory.mktemp("qwen2-moe")
    AutoModelForCausalLM.from_config(tiny_config("qwen2_moe", vocab_size=30522), dtype=torch.bfloat16).save_pretrained(folder)
    minilm_tokenizer().save_pretrained(folder)
    return str(folder)


def _cfg(backbone: str, **model):
    return load_config("tiny", overrides={"model": {"backbone": backbone, "trainable": "lora", **model}})


def test_the_frozen_linears_are_4_bit_and_nothing_else_is(checkpoint):
    cfg = _cfg(checkpoint, quantize="4bit")
    built = build_model(cfg.model, ["a", "b"], "classification", seed=0)
    params = dict(built.model.named_parameters())
    held = sorted(n for n, p in params.items() if getattr(p, "quant_state", None) is not None)
    assert held == list(built.four_bit) and len(held) == 2 * (4 + 3 + 1)  # a layer: q k v o, the shared MLP, its gate
    assert all(params[n].dtype == torch.uint8 for n in held)
    untouched = [l.router for l in built.layout.layers] + [n for l in built.layout.layers for n in l.experts]
    assert not set(untouched) & set(held) and not any("lm_head" in n or "embed" in n for n in held)
    # the same trainable set as the 16-bit build: a 4-bit client's reply fits a 16-bit run's model
    plain = build_model(_cfg(checkpoint).model, ["a", "b"], "classification", seed=0)
    assert built.trainable == plain.trainable
    assert {params[n].dtype for n in built.trainable} == {torch.float32}
    # the plan's model (meta device) names the same 4-bit weights and counts the same bytes
    meta = build_model(cfg.model, ["a", "b"], "classification", seed=0, meta=True)
    assert meta.four_bit == built.four_bit and base_bytes(meta) == base_bytes(built)
    four_bit_weights = sum(params[n].quant_state.shape.numel() for n in held)
    assert base_bytes(plain) - base_bytes(built) == pytest.approx(four_bit_weights * (2 - FOUR_BIT_BYTES), abs=1)


def test_a_4_bit_base_trains_its_adapters(checkpoint):
    from fedalign_moe.training.local import autocast

    built = build_model(_cfg(checkpoint, quantize="4bit").model, ["a", "b"], "classification", seed=0)
    ids_BS = torch.randint(0, 1000, (2, 8))
    with autocast(built.model, torch.device("cpu")):
        logits_BC = built.model(ids_BS, torch.ones_like(ids_BS))
    logits_BC.float().logsumexp(-1).sum().backward()
    params = dict(built.model.named_parameters())
    assert all(params[n].grad is not None for n in built.trainable if "q_proj.lora_B" in n)
    assert all(params[n].grad is None for n in built.four_bit)


@pytest.mark.parametrize("model, says", [
    ({"backbone": "tiny-olmoe", "quantize": "4bit"}, "needs a checkpoint backbone (not 'tiny-olmoe')"),
    ({"trainable": "experts-routers", "quantize": "4bit"}, "and trainable = 'lora' or 'lora-experts' (not 'experts-routers')"),
])
def test_a_config_that_cannot_be_quantised_is_one_line(model, says, checkpoint):
    with pytest.raises(ConfigError, match=r"model: .*" + says.replace("(", r"\(").replace(")", r"\)")) as err:
        _cfg(**{"backbone": checkpoint, **model})
    assert "\n" not in str(err.value)


def test_without_bitsandbytes_one_line_says_how_to_install_it(checkpoint, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ModelLoadError, match=r"needs bitsandbytes, which is not installed: pip install 'fedalign-moe\[qlora\]'"):
        build_model(_cfg(checkpoint, quantize="4bit").model, ["a", "b"], "classification", seed=0)


def test_two_rounds_of_fedalign_over_a_4_bit_base(checkpoint, tmp_path, monkeypatch):
    """The real ServerApp loop and ClientApp (in this process); the server's model is built on the meta
    device, a node evaluates, and the plan counts the base at 4 bits."""
    from fedalign_moe.federation.client_app import cached_workspace
    from in_process import run_in_process

    cached_workspace.cache_clear()
    cfg = load_config("tiny", overrides={"out_dir": str(tmp_path), "federation": {"strategy": "fedalign", "global_eval": "node"},
                                         "data": {"max_train": 90, "max_test": 30},
                                         "model": {"backbone": checkpoint, "trainable": "lora", "quantize": "4bit"}})
    summary = run_in_process(cfg, monkeypatch)
    cached_workspace.cache_clear()
    assert summary["rounds"] == 2 and summary["rounds_not_adopted"] == [] and summary["failures_total"] == 0
    losses = [json.loads(line)["train_loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < loss < 10 for loss in losses)
