"""The paper presets (``paper-switch``, ``paper-deepseek``): the paper's setup with its hub ids; offline, one
line naming what could not be fetched; on stand-ins (a small Switch checkpoint, a small model in
DeepSeek-MoE-16B's own layout and code, an AG-News-like file) each preset runs as it would on the real ones."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedalign_moe.config import load_config

PAPER = {"paper-switch": "google/switch-base-16", "paper-deepseek": "deepseek-ai/deepseek-moe-16b-base"}


@pytest.mark.parametrize("preset", sorted(PAPER))
def test_a_paper_preset_is_the_papers_setup(preset):
    cfg = load_config(preset)
    assert cfg.model.backbone == PAPER[preset] and cfg.data.source == "hf:fancyzhx/ag_news"
    assert (cfg.partition.num_clients, cfg.partition.scheme, cfg.federation.rounds) == (10, "dirichlet", 25)
    assert (cfg.train.local_epochs, cfg.train.lr, cfg.federation.strategy) == (1, 1e-4, "fedalign")


def test_offline_a_paper_preset_is_one_line_naming_the_hub_id(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "fedalign_moe", "run", "--preset", "paper-switch", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    lines = [l for l in res.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "google/switch-base-16" in lines[0], res.stderr[-2000:]


def _ag_news_like(path: Path, n: int = 160) -> str:
    topics = ["World", "Sports", "Business", "Sci/Tech"]
    words = {"World": "minister election border treaty", "Sports": "match goal season coach",
             "Business": "shares profit market bank", "Sci/Tech": "software chip internet space"}
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(n):
            t = topics[i % 4]
            w.writerow([f"item {i}: {words[t]} news today {i % 7}", t])
    return str(path)


def _stand_in(tmp_path, backbone: str, **model) -> dict:
    """Overrides that put a stand-in model and an AG-News-like file under a paper preset, at a test's size."""
    return {"out_dir": str(tmp_path / "run"), "data": {"source": "csv", "path": _ag_news_like(tmp_path / "ag.csv"),
                                                        "max_test": 40, "max_length": 24},
            "partition": {"num_clients": 3}, "federation": {"rounds": 2},
            "model": {"backbone": backbone, "device": "cpu", **model}, "train": {"batch_size": 16}}


def test_paper_switch_on_a_small_switch_checkpoint(tmp_path, monkeypatch):
    from fedalign_moe.federation.client_app import cached_workspace
    from in_process import run_in_process
    from test_families import save_switch

    save_switch(tmp_path / "switch")
    cached_workspace.cache_clear()
    cfg = load_config("paper-switch", overrides=_stand_in(tmp_path, str(tmp_path / "switch")))
    summary = run_in_process(cfg, monkeypatch)
    cached_workspace.cache_clear()
    assert summary["rounds"] == 2 and summary["rounds_not_adopted"] == [] and summary["failures_total"] == 0


def test_paper_deepseek_on_a_small_model_in_deepseek_moes_own_layout(tmp_path, monkeypatch):
    import remote_moe
    from fedalign_moe.federation.client_app import cached_workspace
    from fedalign_moe.models.build import minilm_tokenizer
    from in_process import run_in_process

    remote_moe.TinyDeepseekMoEConfig.register_for_auto_class()
    remote_moe.TinyDeepseekMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    folder = tmp_path / "deepseek"
    torch.manual_seed(0)
    config = remote_moe.TinyDeepseekMoEConfig(vocab_size=30522, n_routed_experts=8, num_experts_per_tok=2)
    remote_moe.TinyDeepseekMoEForCausalLM(config).save_pretrained(folder)
    minilm_tokenizer().save_pretrained(folder)
    cached_workspace.cache_clear()
    cfg = load_config("paper-deepseek", overrides=_stand_in(tmp_path, str(folder), num_experts=8, top_k=2))
    assert cfg.model.trust_remote_code and cfg.train.gradient_checkpointing and cfg.model.trainable == "lora"
    summary = run_in_process(cfg, monkeypatch)
    cached_workspace.cache_clear()
    assert summary["rounds"] == 2 and summary["rounds_not_adopted"] == [] and summary["failures_total"] == 0
    diagnostics = [json.loads(l) for l in (tmp_path / "run" / "diagnostics.jsonl").read_text().splitlines()]
    assert all(len(d["aligned"]) == 2 and all(len(a) == 8 for a in d["aligned"]) for d in diagnostics)
