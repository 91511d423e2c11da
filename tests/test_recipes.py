"""Model recipes that give experts distinct roles (issue 9): domains, Drop-Upcycling, Branch-Train-MiX, the
premise figures. The BTX test builds a tiny diversified MoE on toy data, as CI must."""

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from fedalign_moe.config import ConfigError, ModelConfig, validate
from fedalign_moe.data import DataError, domains, load_source, public_split
from fedalign_moe.models.build import build_model
from fedalign_moe.models.encoder_moe import MoEOutput
from fedalign_moe.report.premise import (
    is_recipe_figures,
    mutual_information,
    premise_table,
    recipe_figures,
    routing_shares,
    write_premise,
)
from fedalign_moe.training.local import routing_by_label
from fedalign_moe.training.setup import open_workspace, prepare_data

WORDS = {  # four labels, two groups each, disjoint vocabularies
    "sport": {"ball": "goal striker pitch referee penalty match league keeper corner".split(),
              "race": "lap sprint finish marathon runner track relay hurdle pace".split()},
    "food": {"bake": "flour oven dough bread yeast crust pastry butter knead".split(),
             "cook": "pan simmer garlic onion sauce boil stew pepper salt".split()},
    "money": {"bank": "loan interest deposit credit mortgage account savings branch teller".split(),
              "trade": "stock share market broker dividend equity bond index futures".split()},
    "space": {"star": "galaxy nebula supernova pulsar quasar constellation telescope light year".split(),
              "planet": "orbit moon crater mars jupiter saturn ring asteroid comet".split()},
}


def _toy_csv(path: Path, per_group: int = 40) -> Path:
    rng = random.Random(0)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label", "topic"])
        for label, groups in WORDS.items():
            for group, vocab in groups.items():
                for _ in range(per_group):
                    w.writerow([" ".join(rng.choice(vocab) for _ in range(8)), label, group])
    return path


def _cfg(tmp_path: Path, recipe: str, **model) -> object:
    return validate({
        "data": {"source": "csv", "path": str(_toy_csv(tmp_path / "toy.csv")), "group_column": "topic",
                 "max_length": 16, "public_fraction": 0.5},
        "partition": {"num_clients": 2, "alpha": 1.0},
        "model": {"backbone": "minilm", "recipe": recipe, "num_experts": 4, "top_k": 1, "moe_layers": [5],
                  "btx_epochs": 3, "btx_router_epochs": 3, "btx_lr": 1e-3, "build_cache_dir": str(tmp_path / "models"),
                  "prefix_cache_dir": None, **model},
    })


def _mi(ws) -> float:
    counts = routing_by_label(ws.built.model, ws.built.adapter, ws.global_test(), 4, 64).numpy()
    return mutual_information(counts[0])


def _expert_spread(ws) -> float:
    """Mean distance of each expert's up projection from the experts' mean, relative to its norm."""
    up = next(m for m in ws.built.model.modules() if isinstance(m, MoEOutput)).experts.up_proj.detach()
    return float((up - up.mean(0)).norm() / up.norm())


def test_btx_builds_experts_that_differ_and_routing_that_tells_the_domains_apart(tmp_path):
    upcycled = open_workspace(_cfg(tmp_path, "upcycle"))
    btx = open_workspace(_cfg(tmp_path, "btx"))
    assert btx.built.build_seconds is not None and btx.built.build_seconds > 0
    assert _expert_spread(btx) > 3 * _expert_spread(upcycled)  # upcycled experts are copies + 1% noise
    mi_btx, mi_upcycled = _mi(btx), _mi(upcycled)
    # measured 0.18 against 0.066 nats (H(label) = ln 4 = 1.39): routing carries the domain
    assert mi_btx > 0.1 and mi_btx > 2 * mi_upcycled, (mi_btx, mi_upcycled)
    # built once: the second workspace reads the cached tensors (same values, the first build's time)
    cached = list((tmp_path / "models").glob("*.safetensors"))
    assert len(cached) == 1
    again = open_workspace(_cfg(tmp_path, "btx"))
    assert again.built.build_seconds == pytest.approx(btx.built.build_seconds, abs=0.1)
    for (n, a), b in zip(btx.built.model.named_parameters(), again.built.model.parameters()):
        if "experts" in n or "router" in n:
            assert torch.equal(a, b), n
    # a damaged cache file is built again, not trusted
    cached[0].write_bytes(b"not a safetensors file")
    rebuilt = open_workspace(_cfg(tmp_path, "btx"))
    assert _mi(rebuilt) == pytest.approx(mi_btx, abs=1e-6)


def test_the_public_split_is_set_aside_before_every_other_split(tmp_path):
    cfg = _cfg(tmp_path, "btx")
    seen = []
    for seed in (0, 1):
        data = prepare_data(cfg.model_copy(update={"seed": seed}))
        public = set(data.public.dataset["text"])
        used = set(data.global_test["text"]).union(*(set(d["text"]) for d in data.client_train + data.client_test))
        assert public and not public & used  # toy texts repeat rarely; a shared text would be a leak
        seen.append(sorted(public))
    assert seen[0] == seen[1]  # the public split does not move with the run seed


def test_drop_upcycling_reinitialises_the_chosen_share_of_each_experts_inner_dimensions():
    cfg = ModelConfig(backbone="minilm", recipe="drop-upcycle", drop_ratio=0.25, num_experts=4, top_k=1,
                      moe_layers=(5,), expert_noise=0.0)
    built = build_model(cfg, ["a", "b"], "classification", seed=0)
    experts = next(m for m in built.model.modules() if isinstance(m, MoEOutput)).experts
    plain = build_model(cfg.model_copy(update={"recipe": "upcycle"}), ["a", "b"], "classification", seed=0)
    dense_up = next(m for m in plain.model.modules() if isinstance(m, MoEOutput)).experts.up_proj[0]
    inner = dense_up.shape[0]
    for e in range(4):
        changed = (experts.up_proj[e] != dense_up).any(1)
        assert int(changed.sum()) == round(0.25 * inner)
        moved_down = (experts.down_proj[e] != plain.model.layers[5].output.experts.down_proj[0]).any(0)
        assert torch.equal(moved_down, changed)  # the same inner dimensions in both projections
    assert not torch.equal(experts.up_proj[0], experts.up_proj[1])


def test_domains_follow_the_labels_and_refuse_single_group_domains():
    data = load_source("mmlu-topic")
    public, _ = public_split(data, 0.2, 0)
    domain_N, names = domains(public, 8)
    labels = np.array(public.dataset["label"])
    assert sorted(set(domain_N.tolist())) == list(range(8))
    for d in range(8):
        assert len(set(labels[domain_N == d].tolist())) == 1  # a domain never mixes labels
    sizes = np.bincount(domain_N)
    assert sizes.max() < 2.5 * sizes.min()
    two, _ = domains(public, 2)  # fewer domains than labels: runs of (label, group) order
    assert sorted(set(two.tolist())) == [0, 1]
    with pytest.raises(DataError, match="single group"):
        domains(public, 57)
    with pytest.raises(DataError, match="at least as many groups"):
        domains(public, 58)


def test_recipe_settings_that_cannot_work_are_one_clear_error():
    with pytest.raises(ConfigError, match="public_fraction"):
        validate({"model": {"recipe": "btx"}})
    with pytest.raises(ConfigError, match="builds minilm experts"):
        validate({"model": {"backbone": "tiny-mixtral", "recipe": "drop-upcycle"}})


def test_mutual_information_and_shares_have_known_answers():
    assert mutual_information(np.array([[5.0, 5.0], [5.0, 5.0]])) == pytest.approx(0.0)
    assert mutual_information(np.array([[7.0, 0.0], [0.0, 7.0]])) == pytest.approx(np.log(2))
    assert mutual_information(np.zeros((2, 3))) == 0.0
    # I = H(label) - H(label | expert): expert 0 always label 0, expert 1 half-half
    counts = np.array([[2.0, 1.0], [0.0, 1.0]])
    h = lambda p: -sum(x * np.log(x) for x in p if x > 0)  # noqa: E731
    assert mutual_information(counts) == pytest.approx(h([0.75, 0.25]) - 0.5 * h([0.5, 0.5]))
    np.testing.assert_allclose(routing_shares(np.array([[1.0, 3.0], [0.0, 0.0]])), [[0.25, 0.75], [0.0, 0.0]])


def test_premise_figures_from_runs(tmp_path):
    run = tmp_path / "fedavg"
    run.mkdir()
    (run / "routing.jsonl").write_text(
        '{"round": 1, "clients": {"0": [[0.5, 0.5]], "1": [[0.5, 0.5]]}}\n'
        '{"round": 2, "clients": {"0": [[1.0, 0.0]], "1": [[0.0, 1.0]]}}\n')
    fig = recipe_figures(np.array([[[3.0, 0.0], [0.0, 3.0]]]), ["x", "y"], {"final_accuracy": 0.6},
                         {"final_accuracy": 0.75}, run, 12.0)
    assert fig["routing_js_first_round_nats"] == pytest.approx(0.0)
    assert fig["routing_js_last_round_nats"] == pytest.approx(np.log(2))
    assert fig["non_iid_drop_points"] == pytest.approx(15.0)
    assert fig["mi_expert_label_nats"] == pytest.approx(np.log(2))
    assert "| btx | 0.693 (of 0.69) | 0.0000 / 0.6931 | 0.600 | 0.750 | 15.0 | 12 |" in premise_table({"btx": fig})
    written = write_premise({"btx": fig}, tmp_path / "not" / "yet")  # the folder is made (a bug: it was not)
    assert is_recipe_figures(json.loads(written.read_text())["btx"])


def test_premise_command_writes_premise_json_for_each_recipe(tmp_path):
    """The CLI end to end: FedAvg (Flower simulation) and centralised per recipe, then premise.json."""
    import json

    from typer.testing import CliRunner

    from fedalign_moe.cli import app

    toy = _toy_csv(tmp_path / "toy.csv", per_group=20)
    args = ["premise", "--preset", "tiny", "--recipes", "btx", "--out", str(tmp_path / "out"),
            "--set", "data.source=csv", "--set", f"data.path={toy}", "--set", "data.group_column=topic",
            "--set", "data.public_fraction=0.5", "--set", "data.max_train=null", "--set", "data.max_test=null",
            "--set", "model.backbone=minilm", "--set", "model.num_experts=4", "--set", "model.top_k=1",
            "--set", "model.moe_layers=[5]", "--set", "model.btx_epochs=3", "--set", "model.btx_lr=1e-3",
            "--set", f"model.build_cache_dir={tmp_path / 'models'}", "--set", "partition.num_clients=2",
            "--set", "federation.rounds=1"]
    (tmp_path / "out").mkdir()
    earlier = recipe_figures(np.ones((1, 4, 4)), list("abcd"), None, None, None, None)  # another recipe's figures
    (tmp_path / "out" / "premise.json").write_text(json.dumps({"upcycle": earlier, "junk": {"kept": False}}))
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.stdout
    premise = json.loads((tmp_path / "out" / "premise.json").read_text())
    assert premise["upcycle"] == json.loads(json.dumps(earlier))  # other recipes' figures stay
    assert "junk" not in premise  # what is not a recipe's figures is dropped
    p = premise["btx"]
    assert p["fedavg_accuracy"] is not None and p["centralised_accuracy"] is not None
    assert p["non_iid_drop_points"] == pytest.approx(100 * (p["centralised_accuracy"] - p["fedavg_accuracy"]))
    assert p["routing_js_first_round_nats"] is not None and p["routing_js_last_round_nats"] >= 0
    assert len(p["routing_shares_by_layer"]) == 1 and len(p["routing_shares_by_layer"][0]) == 4
    assert p["mi_expert_label_nats"] > 0.1 and p["build_seconds"] > 0
    assert (tmp_path / "out" / "premise_routing.png").stat().st_size > 0
    assert "| btx |" in res.stdout and "| upcycle | 0.000" in res.stdout and "premise figures in" in res.stdout


def test_a_public_split_without_btx_needs_no_domains(tmp_path):
    """Domains are a btx matter: 16 experts over the toy data's 8 groups could not be cut into domains,
    and an upcycled model with a public split set aside must not ask for them (it did)."""
    ws = open_workspace(_cfg(tmp_path, "upcycle", num_experts=16))
    assert ws.built.layout.num_experts == 16 and ws.data.public is not None
    with pytest.raises(DataError, match="at least as many groups"):
        open_workspace(_cfg(tmp_path, "btx", num_experts=16))
