"""Every MoE family of transformers the package lists, Switch Transformers and saved checkpoints (issue 10).

Each tiny random family: the adapter finds its routers and stacked experts from the model's own modules,
the recorded logits are the router's, and two federated rounds of FedAlign-MoE run on it (the real
ServerApp loop and ClientApp, in this process: ``in_process``) with routing statistics that are not
zero and aligned sets that were decided. Saved tiny Switch and DeepSeek-V3 checkpoints run through the
CLI and Flower's simulation (Switch's run is test_cli's terminal test: one simulation for both)."""

import json

import pytest
import torch
import torch.nn.functional as F

from fedalign_moe.config import FAMILY_BACKBONES, ModelConfig, load_config
from fedalign_moe.models.build import build_model, minilm_tokenizer
from fedalign_moe.models.hf_moe import FAMILIES, build_tiny_causal_lm
from in_process import run_in_process


def _top_k(backbone: str) -> int:
    return 1 if backbone == "tiny-switch-transformers" else 2


def _batch(vocab=1000):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def test_the_listed_backbones_are_the_families_the_adapter_builds():
    assert {b.removeprefix("tiny-").replace("-", "_") for b in FAMILY_BACKBONES} == set(FAMILIES) | {"switch_transformers"}


@pytest.mark.parametrize("backbone", FAMILY_BACKBONES)
def test_family_adapter_finds_routers_and_stacked_experts(backbone):
    built = build_model(ModelConfig(backbone=backbone, num_experts=4, top_k=_top_k(backbone)), ["a", "b", "c"],
                        "classification", 0)
    layout, adapter = built.layout, built.adapter
    assert (layout.num_experts, layout.top_k, len(layout.layers)) == (4, _top_k(backbone), 2)
    params = dict(built.model.named_parameters())
    for l, layer in enumerate(layout.layers):
        assert adapter.router_weight(l).shape[0] == 4
        assert layer.experts and all(params[n].shape[0] == 4 for n in layer.experts)
        name = layer.experts[0]
        before = params[name].detach().clone()
        with torch.no_grad():
            adapter.expert_slice(l, 1)[name].add_(1.0)  # a view of exactly expert 1
        assert torch.allclose(params[name][1], before[1] + 1.0) and torch.equal(params[name][0], before[0])
    ids, mask = _batch()
    with adapter.recorder() as rec:
        assert built.model(ids, mask).shape == (3, 3)
    for l, r in enumerate(rec.records):
        assert r.logits_TE.shape == (27, 4) and not r.logits_TE.requires_grad
        router = adapter.routers[l]
        bias = getattr(router, "bias", None)
        expected = F.linear(r.hidden_TH, router.weight.detach(), None if bias is None else bias.detach())
        assert torch.allclose(r.logits_TE, expected, atol=1e-5) and r.logits_TE.std() > 0
    assert all(not r._forward_hooks for r in adapter.routers)


@pytest.mark.parametrize("backbone", FAMILY_BACKBONES)
def test_two_federated_rounds_of_fedalign_on_each_family(backbone, tmp_path, monkeypatch):
    cfg = load_config("tiny", overrides={"out_dir": str(tmp_path), "federation": {"strategy": "fedalign"},
                                         "data": {"max_train": 90, "max_test": 30},
                                         "model": {"backbone": backbone, "top_k": _top_k(backbone)}})
    summary = run_in_process(cfg, monkeypatch)
    assert summary["rounds"] == 2 and not summary["stopped_early"] and summary["rounds_not_adopted"] == []
    routing = [json.loads(line) for line in (tmp_path / "routing.jsonl").read_text().splitlines()]
    assert [r["round"] for r in routing] == [1, 2]
    p_CLE = torch.tensor([routing[-1]["clients"][c] for c in sorted(routing[-1]["clients"])])
    assert p_CLE.shape == (3, 2, 4) and torch.allclose(p_CLE.sum(-1), torch.ones(3, 2), atol=1e-4)
    assert (p_CLE - 0.25).abs().max() > 1e-3  # clients' real routing, not a uniform or empty record
    diagnostics = [json.loads(line) for line in (tmp_path / "diagnostics.jsonl").read_text().splitlines()]
    assert all(len(d["aligned"]) == 2 and all(len(a) == 4 for a in d["aligned"]) for d in diagnostics)


# ------------------------------------------------------------------------------------------- Switch

def test_stacked_switch_experts_compute_what_transformers_computes():
    from transformers import SwitchTransformersForConditionalGeneration

    from fedalign_moe.models.switch import stack_switch_experts_, tiny_switch_config, to_transformers_state

    torch.manual_seed(0)
    original = SwitchTransformersForConditionalGeneration(tiny_switch_config(num_experts=4)).eval()
    stacked = SwitchTransformersForConditionalGeneration(tiny_switch_config(num_experts=4)).eval()
    stacked.load_state_dict(original.state_dict())
    assert stack_switch_experts_(stacked) == 4  # 2 encoder + 2 decoder sparse layers
    ids, mask = _batch(vocab=500)
    start = torch.zeros(3, 2, dtype=torch.long)
    with torch.no_grad():
        want = original(input_ids=ids, attention_mask=mask, decoder_input_ids=start).logits
        got = stacked(input_ids=ids, attention_mask=mask, decoder_input_ids=start).logits
    assert torch.allclose(got, want, atol=1e-5)
    state = stacked.state_dict()
    assert state["encoder.block.0.layer.1.mlp.experts.wi"].shape == (4, 128, 64)
    # renamed back, the trained state loads into transformers' own class, every key matched
    back = SwitchTransformersForConditionalGeneration(tiny_switch_config(num_experts=4))
    missing, unexpected = back.load_state_dict(to_transformers_state(state), strict=False)
    assert not unexpected and all("lm_head" in k or "embed_tokens" in k for k in missing)
    with torch.no_grad():
        assert torch.allclose(back.eval()(input_ids=ids, attention_mask=mask, decoder_input_ids=start).logits, want,
                              atol=1e-5)


def test_switch_multiple_choice_routes_through_encoder_and_decoder_layers():
    built = build_model(ModelConfig(backbone="tiny-switch-transformers", top_k=1), ["A", "B", "C", "D"],
                        "multiple-choice", 0)
    assert [l.index for l in built.layout.layers] == [0, 1, 2, 3]  # decoder layers follow the encoder's
    ids, mask = _batch()
    with built.adapter.recorder() as rec:
        assert built.model(ids, mask).shape == (3, 4)
    assert [r.logits_TE.shape[0] for r in rec.records] == [27, 27, 3, 3]  # the decoder's one step a row
    keep_T = mask.reshape(-1).bool()
    assert rec.records[0].real(keep_T).sum() == 24 and rec.records[2].real(keep_T).sum() == 3


# ------------------------------------------------------------------------------- saved checkpoints

def _run_cli(*args):
    from typer.testing import CliRunner

    from fedalign_moe.cli import app

    res = CliRunner().invoke(app, list(args))
    res.text = res.stdout + res.stderr
    return res


def save_switch(folder):
    from transformers import SwitchTransformersForConditionalGeneration

    from fedalign_moe.models.switch import tiny_switch_config

    tok = minilm_tokenizer()
    torch.manual_seed(0)
    SwitchTransformersForConditionalGeneration(tiny_switch_config(num_experts=4, vocab_size=tok.vocab_size)).save_pretrained(folder)
    tok.save_pretrained(folder)


def _save_deepseek_v3(folder):
    tok = minilm_tokenizer()
    build_tiny_causal_lm("deepseek_v3", 0, num_experts=4, top_k=2, vocab_size=tok.vocab_size).save_pretrained(folder)
    tok.save_pretrained(folder)


def test_a_saved_deepseek_v3_checkpoint_runs_fedalign_through_the_cli(tmp_path):
    folder = tmp_path / "checkpoint"
    _save_deepseek_v3(folder)
    res = _run_cli("run", "--preset", "tiny", "--strategy", "fedalign", "--set", f"model.backbone={folder}",
                   "--out", str(tmp_path / "out"))
    assert res.exit_code == 0, res.text[-2000:]
    assert "(4 experts, top-2)" in res.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["backbone"] == str(folder)
    diagnostics = (tmp_path / "out" / "diagnostics.jsonl").read_text().splitlines()
    assert len(diagnostics) == 2 and "aligned" in json.loads(diagnostics[-1])


def test_a_dense_checkpoint_is_one_clear_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "dense"
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(folder)
    res = _run_cli("run", "--preset", "tiny", "--set", f"model.backbone={folder}", "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "Traceback" not in res.text
    assert f"error: checkpoint {folder} is a 'llama' model whose config names no expert count" in res.text


def test_a_hub_id_that_cannot_be_reached_is_one_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at start-up
    res = _run_cli("run", "--preset", "tiny", "--set", "model.backbone=google/switch-base-16", "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "Traceback" not in res.text
    assert "error: cannot read a model checkpoint at google/switch-base-16" in res.text


def test_an_unknown_tiny_family_is_a_config_error():
    with pytest.raises(ValueError, match="unknown backbone 'tiny-nope'; the tiny ones are tiny-mixtral"):
        ModelConfig(backbone="tiny-nope")
