"""Checkpoints whose modelling code keeps routed experts as a list of modules (DeepSeek-MoE-16B's, run with
``model.trust_remote_code``): stacked at load into the layout every other family has, with the forward of the
checkpoint's own code unchanged to 1e-5, trained through the real server loop, and refused by a node that does
not allow remote code."""

import json

import pytest
import torch

from fedalign_moe.config import load_config
from fedalign_moe.models.assets import ModelLoadError
from fedalign_moe.models.build import build_model
from fedalign_moe.models.hf_moe import StackedExperts, stack_listed_experts


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A folder holding the tiny DeepSeek-MoE-style model, its modelling code (``remote_moe.py``, copied by
    ``save_pretrained`` and named in ``config.json``'s ``auto_map``) and MiniLM's tokenizer."""
    import remote_moe
    from fedalign_moe.models.build import minilm_tokenizer

    remote_moe.TinyDeepseekMoEConfig.register_for_auto_class()
    remote_moe.TinyDeepseekMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    folder = tmp_path_factory.mktemp("deepseek-moe")
    torch.manual_seed(0)
    remote_moe.TinyDeepseekMoEForCausalLM(remote_moe.TinyDeepseekMoEConfig(vocab_size=30522)).save_pretrained(folder)
    minilm_tokenizer().save_pretrained(folder)
    assert "auto_map" in json.loads((folder / "config.json").read_text()) and (folder / "remote_moe.py").is_file()
    return str(folder)


def test_stacking_keeps_the_checkpoints_own_forward(checkpoint):
    from transformers import AutoModelForCausalLM

    listed = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    stacked = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    assert stack_listed_experts(stacked) == 2  # layers 1 and 2; layer 0 is dense
    block = stacked.model.layers[1].mlp
    assert isinstance(block.experts, StackedExperts) and len(block.experts) == 4
    assert block.experts.gate_up_proj.shape == (4, 32, 32) and block.experts.down_proj.shape == (4, 32, 16)
    ids_BS = torch.randint(0, 30522, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (listed(ids_BS).logits - stacked(ids_BS).logits).abs().max().item()
    assert diff < 1e-5
    original = listed.model.layers[1].mlp.experts
    back = block.experts.to_list(lambda: type(original[0])(32, 16))
    assert all(torch.equal(getattr(a, n).weight, getattr(b, n).weight) for a, b in zip(original, back)
               for n in ("gate_proj", "up_proj", "down_proj"))


def test_the_adapter_finds_the_stacked_blocks_and_lora_reaches_each_expert(checkpoint):
    cfg = load_config("tiny", overrides={"model": {"backbone": checkpoint, "trust_remote_code": True, "trainable": "lora"}})
    built = build_model(cfg.model, ["a", "b"], "classification", seed=0)
    layout = built.layout
    assert (layout.num_experts, layout.top_k, len(layout.layers)) == (4, 2, 2)
    assert [l.index for l in layout.layers] == [1, 2]
    assert all(l.lora for l in layout.layers)  # LoRA on the stacked experts, aggregated per expert
    meta = build_model(cfg.model, ["a", "b"], "classification", seed=0, meta=True)
    assert meta.trainable == built.trainable and meta.layout == built.layout


def test_without_trust_remote_code_one_line_says_what_to_set(checkpoint):
    cfg = load_config("tiny", overrides={"model": {"backbone": checkpoint}})
    with pytest.raises(ModelLoadError, match="model.trust_remote_code") as err:
        build_model(cfg.model, ["a", "b"], "classification", seed=0)
    assert "\n" not in str(err.value)


def test_a_node_runs_remote_code_only_when_its_config_allows_it(checkpoint):
    from fedalign_moe.federation.node_policy import NodePolicy, NodePolicyError

    cfg = load_config("tiny", overrides={"model": {"backbone": checkpoint, "trust_remote_code": True}})
    with pytest.raises(NodePolicyError, match="set allow-remote-code=true in the node config"):
        NodePolicy.of_node({"model-roots": checkpoint}, environ={}).apply(cfg)
    assert NodePolicy.of_node({"model-roots": checkpoint, "allow-remote-code": "true"}, environ={}).apply(cfg)


def test_two_rounds_of_fedalign_on_the_listed_expert_checkpoint(checkpoint, tmp_path, monkeypatch):
    from fedalign_moe.federation.client_app import cached_workspace
    from in_process import run_in_process

    cached_workspace.cache_clear()
    cfg = load_config("tiny", overrides={"out_dir": str(tmp_path), "federation": {"strategy": "fedalign"},
                                         "data": {"max_train": 90, "max_test": 30},
                                         "model": {"backbone": checkpoint, "trust_remote_code": True}})
    summary = run_in_process(cfg, monkeypatch)
    cached_workspace.cache_clear()
    assert summary["rounds"] == 2 and summary["rounds_not_adopted"] == [] and summary["failures_total"] == 0
    routing = [json.loads(line) for line in (tmp_path / "routing.jsonl").read_text().splitlines()]
    p_CLE = torch.tensor([routing[-1]["clients"][c] for c in sorted(routing[-1]["clients"])])
    assert p_CLE.shape == (3, 2, 4) and (p_CLE - 0.25).abs().max() > 1e-3  # the checkpoint's own routing


def test_lora_on_stacked_experts_reaches_each_expert_the_checkpoints_code_indexes(checkpoint):
    """The block's own code indexes its experts through peft's wrapper: each expert view adds its slice of the
    LoRA update, the same model as the update merged into the stacks, and the factors get gradients (without
    ``with_indexable_lora`` the update was never applied: the factors got none)."""
    import copy

    cfg = load_config("tiny", overrides={"model": {"backbone": checkpoint, "trust_remote_code": True, "trainable": "lora"}})
    built = build_model(cfg.model, ["a", "b"], "classification", seed=0)
    params = dict(built.model.named_parameters())
    expert_lora = [n for l in built.layout.layers for pair in l.lora for n in pair]
    assert expert_lora and all("mlp.experts" in n for n in expert_lora)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n in expert_lora:
            if ".lora_B." in n:
                params[n].copy_(torch.randn(params[n].shape, generator=g) * 0.1)
    ids_BS = torch.randint(0, 30522, (2, 9), generator=g)
    mask_BS = torch.ones_like(ids_BS)
    got_BC = built.model(ids_BS, mask_BS)
    merged = copy.deepcopy(built.model)
    with torch.no_grad():
        for block in merged.lm.model.layers[1:]:
            stack = block.mlp.experts
            while not isinstance(stack, StackedExperts):
                stack = stack.base_layer
            assert len(stack.lora_wrappers) == 2  # one on gate_up_proj, one on down_proj
            for w in stack.lora_wrappers:
                getattr(stack, w.parameter_name).add_(w.get_delta_weight("default"))
            object.__setattr__(stack, "lora_wrappers", ())  # the update now lives in the stacks themselves
    assert torch.allclose(got_BC, merged(ids_BS, mask_BS), atol=1e-5)
    got_BC.logsumexp(-1).sum().backward()
    assert all(params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in expert_lora)
