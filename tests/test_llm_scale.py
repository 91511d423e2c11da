"""MoE LLMs at scale: a 16-bit base under float32 adapters, LoRA across the model, one base per worker and
none in the server, and the memory plan that decides the workers and refuses what cannot fit."""

import json
import math
import subprocess
import sys

import pytest
import torch

from fedalign_moe.config import ConfigError, load_config
from fedalign_moe.models.build import build_model
from fedalign_moe.training import setup
from fedalign_moe.training.plan import ENGINE_BYTES, RUNTIME_BYTES, ModelFacts, check_fits, make_plan, plan_model


def _cfg(**sections):
    return load_config("tiny", overrides={k: v for k, v in sections.items()})


def test_lora_puts_adapters_on_attention_dense_shared_and_routed_experts_over_a_16_bit_base():
    cfg = _cfg(model={"backbone": "tiny-qwen2-moe", "trainable": "lora", "dtype": "bfloat16"})
    built = build_model(cfg.model, ["a", "b", "c"], "classification", seed=0)
    params = dict(built.model.named_parameters())
    frozen = {n: p for n, p in params.items() if n not in built.trainable}
    assert {p.dtype for p in frozen.values()} == {torch.bfloat16}  # the base
    assert {params[n].dtype for n in built.trainable} == {torch.float32}  # what trains and travels
    lora = [n for n in built.trainable if "lora_" in n]
    for part in ("self_attn.q_proj", "self_attn.o_proj", "shared_expert.down_proj", "experts.base_layer"):
        assert any(part in n for n in lora), part
    assert not any("shared_expert_gate" in n and "lora_" in n for n in params)  # one output: frozen, no adapter
    routers = {layer.router for layer in built.layout.layers}
    assert routers <= set(built.trainable) and all("lora_" not in r for r in routers)  # routers train in full
    assert all(layer.lora for layer in built.layout.layers)  # routed-expert factors aggregated per expert
    assert built.model.compute_dtype == torch.bfloat16


def test_lora_targets_choose_the_adapted_linears_and_an_unknown_name_is_one_error():
    from fedalign_moe.models.assets import ModelLoadError

    cfg = _cfg(model={"backbone": "tiny-mixtral", "trainable": "lora", "lora_targets": ["q_proj", "v_proj"]})
    built = build_model(cfg.model, ["a", "b"], "classification", seed=0)
    adapted = {n.split(".lora_")[0].split(".")[-1] for n in built.trainable if "lora_" in n and "experts" not in n}
    assert adapted == {"q_proj", "v_proj"}
    bad = _cfg(model={"backbone": "tiny-mixtral", "trainable": "lora", "lora_targets": ["qproj"]})
    with pytest.raises(ModelLoadError, match="names no linear layer"):
        build_model(bad.model, ["a", "b"], "classification", seed=0)


def test_plan_counts_the_tiny_mixtral_by_hand():
    cfg = _cfg()  # tiny-mixtral: 4 experts top-2, hidden 64, expert inner 128, 2 layers, float32, experts-routers
    built = plan_model(cfg)
    assert next(built.model.parameters()).device.type == "meta"  # nothing loaded to plan
    f = ModelFacts.of(built)
    routed_per_layer = 4 * (2 * 128 * 64 + 64 * 128)  # gate_up [E, 2I, H] + down [E, H, I]
    assert f.expert_parameters_per_layer == routed_per_layer
    assert f.active_parameters == f.parameters - 2 * routed_per_layer // 2  # a token visits 2 of 4 experts
    plan = make_plan(cfg, built, available=(int(10e9), 1))
    assert plan.worker.trainable_bytes == f.trainable_parameters * 4 * 6  # the server holds the base: no initial copy
    assert plan.worker.base_bytes == (f.parameters - f.trainable_parameters) * 4
    assert plan.reply_bytes_down == f.trainable_parameters * 4
    # two cores and one core a client: two workers, however much memory is free
    assert plan.workers == 2 and plan.fits
    server = RUNTIME_BYTES + 3 * 3 * plan.reply_bytes_up + plan.worker.base_bytes + 2 * f.trainable_parameters * 4
    assert plan.total_bytes == server + ENGINE_BYTES + 2 * plan.worker.peak_bytes
    # memory for one worker only: one worker
    one = plan.server_bytes + ENGINE_BYTES + plan.worker.peak_bytes
    assert make_plan(cfg, built, available=(one + 1, 1)).workers == 1
    assert not make_plan(cfg, built, available=(one - 1, 1)).fits


def test_a_run_that_cannot_fit_is_refused_before_any_work_with_the_option_that_fits(tmp_path):
    cfg = _cfg(data={"max_length": 4096}, train={"batch_size": 8192})
    with pytest.raises(ConfigError, match=r"set .*train.batch_size = \d+ to fit"):
        check_fits(cfg)
    cmd = [sys.executable, "-m", "fedalign_moe"]
    args = ["--preset", "tiny", "--set", "data.max_length=4096", "--set", "train.batch_size=8192"]
    res = subprocess.run([*cmd, "run", *args, "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: the run needs ") and "per worker" in errors[0]
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
    res = subprocess.run([*cmd, "plan", "--json", *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    plan = json.loads(res.stdout)
    assert plan["fits"] is False and plan["peak_bytes"] == plan["worker"]["peak_bytes"] > 0
    fast, slow = plan["h100_hours_at_most"]  # the compute estimate beside the memory plan
    assert plan["train_tokens_at_most"] > 0 and plan["flops_at_most"] > 0 and 0 <= fast <= slow


def test_one_base_per_worker_and_none_in_the_server(monkeypatch, tmp_path):
    """Five clients served by one process: the base is built once there; the server builds its model on
    the meta device, takes the initial model from a node and has a node evaluate each aggregate; the
    numbers are those of the server evaluating itself."""
    from fedalign_moe.federation.client_app import cached_workspace
    from in_process import run_in_process

    builds = []
    real_build = setup.build_model

    def counting_build(*args, **kwargs):
        built = real_build(*args, **kwargs)
        builds.append(next(built.model.parameters()).device.type)
        return built

    monkeypatch.setattr(setup, "build_model", counting_build)
    base = {"model": {"backbone": "tiny-olmoe", "trainable": "lora", "dtype": "bfloat16"},
            "partition": {"num_clients": 5}, "federation": {"strategy": "fedalign"}}
    summaries = {}
    for where in ("node", "server"):
        cached_workspace.cache_clear()
        builds.clear()
        cfg = load_config("tiny", overrides={**base, "federation": {**base["federation"], "global_eval": where},
                                             "out_dir": str(tmp_path / where)})
        summaries[where] = run_in_process(cfg, monkeypatch)
        assert builds == (["meta", "cpu"] if where == "node" else ["meta", "cpu", "cpu"])  # server, then one worker
    assert summaries["node"]["accuracy_per_round"] == summaries["server"]["accuracy_per_round"]
    losses = {where: [json.loads(line)["loss"] for line in (tmp_path / where / "metrics.jsonl").read_text().splitlines()]
              for where in summaries}
    assert losses["node"] == losses["server"] and len(losses["node"]) == 2
    for key in ("global_model_on_client_tests", "global_model_on_client_tests_by_client"):
        assert summaries["node"][key] == summaries["server"][key]
    cached_workspace.cache_clear()


def test_a_node_whose_initial_model_or_evaluation_is_bad_is_passed_over_with_a_line_naming_it(monkeypatch, caplog):
    from flwr.app import Message

    from fedalign_moe.federation import global_eval, protocol
    from fedalign_moe.federation.client_app import cached_workspace
    from fedalign_moe.federation.global_eval import NodeModel, NoNodeAnswer
    from in_process import InProcessGrid

    class OneBadNode(InProcessGrid):
        def send_and_receive(self, messages, timeout=None):
            msg = messages[0]
            if msg.metadata.dst_node_id != 1:
                return super().send_and_receive(messages, timeout)
            if msg.metadata.message_type == "query":  # a forged initial model: one tensor of the wrong shape
                good = super().send_and_receive(messages, timeout)[0].content[protocol.ARRAYS].to_torch_state_dict()
                name = sorted(good)[0]
                good[name] = torch.zeros(3)
                return [Message(protocol.initial_state_reply(good), reply_to=msg)]
            return [Message(protocol.eval_reply(0, 10, 2.0, 0.1), reply_to=msg)]  # accuracy 2.0: out of range

    from flwr.supercore.task_identity import TaskIdentity

    from fedalign_moe.federation.node_policy import TRUST_ENV

    monkeypatch.setenv(TRUST_ENV, "run-config")
    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    cached_workspace.cache_clear()
    cfg = _cfg(federation={"global_eval": "node"})
    ws = setup.open_workspace(cfg, server=True)
    assert ws.on_meta and all(p.device.type == "meta" for p in ws.built.model.parameters())
    model = NodeModel(OneBadNode(3), ws)
    with caplog.at_level("WARNING"):
        initial = model.initial_state()
        result = model.evaluate(1, initial)
    assert set(initial.keys()) == set(ws.built.trainable)
    assert 0 <= result["accuracy"] <= 1 and result["num-examples"] == len(ws.data.global_test)
    lines = [r.getMessage() for r in caplog.records if "node 1 gave no usable answer" in r.getMessage()]
    assert len(lines) == 2 and "expected float32" in lines[0] and "eval-accuracy" in lines[1]

    class Diverged(InProcessGrid):  # node 1 finds the aggregate's loss NaN; node 2 evaluated 10 examples only
        asked: list = []

        def send_and_receive(self, messages, timeout=None):
            node = messages[0].metadata.dst_node_id
            self.asked.append(node)
            loss, n = (float("nan"), len(ws.data.global_test)) if node == 1 else (0.5, 10)
            return [Message(protocol.eval_reply(0, n, 0.5, loss), reply_to=messages[0])]

    assert math.isnan(NodeModel(Diverged(3), ws).evaluate(1, initial)["loss"]) and Diverged.asked == [1]  # an answer
    Diverged.asked.clear()
    with pytest.raises(NoNodeAnswer, match="node 2: it evaluated 10 examples, the global test split holds"):
        _skip_first(Diverged, NodeModel, ws, initial)  # nodes 2 and 3 both count 10 examples

    class NoNode(InProcessGrid):
        def send_and_receive(self, messages, timeout=None):
            return []

    with pytest.raises(NoNodeAnswer, match="node 1: no reply"):
        NodeModel(NoNode(2), ws).initial_state()
    with pytest.raises(NoNodeAnswer, match="global evaluation: no node answered"):  # the round keeps its model
        NodeModel(NoNode(2), ws).evaluate(1, initial)

    class LateNodes(InProcessGrid):  # the nodes connect after the server has started (a loaded machine, SuperNodes)
        polls = 0

        def get_node_ids(self):
            LateNodes.polls += 1
            return super().get_node_ids() if LateNodes.polls > 2 else []

    monkeypatch.setattr(global_eval.time, "sleep", lambda s: None)
    assert set(NodeModel(LateNodes(3), ws).initial_state().keys()) == set(ws.built.trainable) and LateNodes.polls == 3
    never = NodeModel(NoNode(0), ws)
    never.cfg = _cfg(federation={"global_eval": "node", "node_wait_seconds": 0})
    with pytest.raises(NoNodeAnswer, match=r"the initial model: no node answered \(no node connected within 0 s\)"):
        never.initial_state()
    cached_workspace.cache_clear()


def _skip_first(grid_class, model_class, ws, arrays):
    """Evaluate on a grid whose first node is gone: node 2 answers first."""
    class WithoutNodeOne(grid_class):
        def get_node_ids(self):
            return [n for n in super().get_node_ids() if n != 1]

    return model_class(WithoutNodeOne(3), ws).evaluate(1, arrays)


def test_a_checkpoint_with_lora_builds_the_same_adapters_in_every_process(tmp_path):
    """A checkpoint run's LoRA factors come from its seed, not from whatever the process drew before."""
    from transformers import AutoModelForCausalLM

    from fedalign_moe.models.build import minilm_tokenizer
    from fedalign_moe.models.hf_moe import tiny_config

    folder = tmp_path / "ckpt"
    AutoModelForCausalLM.from_config(tiny_config("olmoe", vocab_size=30522)).save_pretrained(folder)
    minilm_tokenizer().save_pretrained(folder)
    cfg = _cfg(model={"backbone": str(folder), "trainable": "lora", "num_experts": 4, "top_k": 2})
    states = []
    for draw in (1, 2):
        torch.rand(draw)  # a process that used its generator differently before building
        built = build_model(cfg.model, ["a", "b"], "classification", seed=0)
        states.append({n: p.detach().clone() for n, p in built.model.named_parameters() if n in built.trainable})
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][n], states[1][n]) for n in states[0])


def test_a_run_whose_nodes_cannot_give_the_initial_model_stops_with_one_line(monkeypatch, tmp_path):
    from flwr.app import Message

    import in_process
    from fedalign_moe.federation.global_eval import NoNodeAnswer
    from in_process import InProcessGrid, run_in_process

    class Refusing(InProcessGrid):
        def send_and_receive(self, messages, timeout=None):
            if messages[0].metadata.message_type == "query":
                return [Message(content=protocol_error(), reply_to=m) for m in messages]
            return super().send_and_receive(messages, timeout)

    def protocol_error():
        from flwr.app import RecordDict

        return RecordDict()  # no arrays: not an initial model

    monkeypatch.setattr(in_process, "InProcessGrid", Refusing)
    cfg = _cfg(federation={"global_eval": "node"}, out_dir=str(tmp_path))
    with pytest.raises(NoNodeAnswer, match=r"the initial model: no node answered \(node 1: records \[\], expected"):
        run_in_process(cfg, monkeypatch)


def test_a_bfloat16_checkpoint_with_lora_runs_through_the_cli_with_its_base_only_in_the_worker(tmp_path):
    """The real simulation: the plan line first; the server asks a worker (through Ray) for the initial
    model and for every evaluation; the checkpoint stays bfloat16 ("auto")."""
    from transformers import AutoModelForCausalLM

    from fedalign_moe.models.build import minilm_tokenizer
    from fedalign_moe.models.hf_moe import tiny_config

    folder = tmp_path / "ckpt"
    AutoModelForCausalLM.from_config(tiny_config("qwen2_moe", vocab_size=30522), dtype=torch.bfloat16).save_pretrained(folder)
    minilm_tokenizer().save_pretrained(folder)
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "fedalign_moe", "run", "--preset", "tiny", "--strategy", "fedalign",
                          "--rounds", "1", "--out", str(out), "--set", f"model.backbone={folder}",
                          "--set", "model.trainable=lora", "--set", "federation.global_eval=node",
                          "--set", "train.padding=longest"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    plan_line = next(line for line in res.stdout.splitlines() if line.startswith("plan: "))
    assert "global model evaluated on the node" in plan_line and "1 worker" not in plan_line  # two cores: two workers
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["adopted"] and math.isfinite(record["loss"]) and record["replied"] == 3
    assert json.loads((out / "config.json").read_text())["model"]["dtype"] == "auto"


def test_the_tiny_preset_gives_the_numbers_it_gave_before_dtype_padding_and_node_evaluation(monkeypatch, tmp_path):
    """A float32 preset keeps its published numbers bit for bit: the global loss of each round of FedAlign-MoE on
    `tiny`, as measured on commit 9a08e26 (before model.dtype, train.padding and global_eval existed)."""
    from fedalign_moe.federation.client_app import cached_workspace
    from in_process import run_in_process

    cached_workspace.cache_clear()
    cfg = load_config("tiny", overrides={"federation": {"strategy": "fedalign"}, "out_dir": str(tmp_path)})
    summary = run_in_process(cfg, monkeypatch)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses == [1.3779239654541016, 1.375481414794922]
    assert summary["accuracy_per_round"] == [0.2833333333333333, 0.31666666666666665]
    cached_workspace.cache_clear()


@pytest.mark.parametrize("run", ["specialised/fedalign-alpha0.1-seed0", "evidence/fedavg-alpha0.1-seed0"])
def test_a_stored_run_is_the_same_setup_as_its_preset_today(run):
    """A run stored before model.dtype and train.padding existed counts as finished for the same preset and
    options today (compare skips it, resume accepts its checkpoint): "auto" is float32 for a built-in
    backbone, and the presets behind published numbers pin their padding."""
    from pathlib import Path

    from fedalign_moe.config import Config

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / run / "config.json"
    if not path.exists():
        pytest.skip(f"{run} is not among the stored results")
    raw = json.loads(path.read_text())
    assert "dtype" not in raw["model"] and "padding" not in raw["train"]  # stored before both
    today = load_config(raw["preset"], overrides={k: v for k, v in raw.items() if k != "preset"})
    assert today.model.dtype == "auto" and Config.from_stored(raw).result_key() == today.result_key()


def test_simulation_resources_are_whole_cpus_for_exactly_the_planned_workers():
    from fedalign_moe.federation.server_app import backend_config

    cfg = _cfg(federation={"client_cpus": 0.5})
    plan = make_plan(cfg, plan_model(cfg), available=(int(10e9), 1))
    assert plan.workers == 3  # 2 cores / 0.5, bounded by the 3 clients
    backend = backend_config(cfg, plan, verbose=False)
    cpus, per_client = backend["init_args"]["num_cpus"], backend["client_resources"]["num_cpus"]
    assert cpus == 2 and isinstance(cpus, int) and int(cpus / per_client) == 3  # Ray's pool: 3 actors


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_planning_for_cuda_without_a_gpu_is_one_error_line():
    cfg = _cfg(model={"device": "cuda"})
    with pytest.raises(ConfigError, match="no CUDA device is available"):
        make_plan(cfg, plan_model(cfg))


def test_the_final_mean_over_clients_does_not_depend_on_the_order_replies_arrive(monkeypatch, server_identity):
    """Replies arrive in any order (Ray); the mean is summed in partition order, so it is the same float."""
    from types import SimpleNamespace

    from flwr.app import Message, RecordDict

    from fedalign_moe.federation import protocol
    from fedalign_moe.federation import server as server_mod

    accuracies = {0: 0.1, 1: 0.2, 2: 0.3}  # (0.1 + 0.2) + 0.3 != (0.3 + 0.2) + 0.1 in floats
    sent = [Message(RecordDict(), dst_node_id=p + 1, message_type="evaluate") for p in accuracies]
    replies = [Message(protocol.eval_reply(p, 10, a, 1.0), reply_to=m) for (p, a), m in zip(accuracies.items(), sent)]
    means = []
    for order in (replies, replies[::-1]):
        monkeypatch.setattr(server_mod, "send_and_collect", lambda *args, order=order, **kw: list(order))
        stub = SimpleNamespace(cfg=_cfg(), arrays=None, grid=None, interrupted=None, check_interrupt=lambda *a: None,
                               strategy=SimpleNamespace(configure_evaluate=lambda *a: sent),
                               log=SimpleNamespace(summary=lambda **kw: kw))
        means.append(server_mod._final_evaluation(stub, None)["global_model_on_client_tests"])
    assert means[0] == means[1] == (0.1 + 0.2 + 0.3) / 3


def test_gradient_checkpointing_recomputes_each_layer_and_changes_no_number():
    from fedalign_moe.training.local import ClientTensors, train_local

    cfg = _cfg(model={"backbone": "tiny-olmoe", "trainable": "lora", "dtype": "bfloat16"})
    ids = torch.randint(3, 500, (8, 12), generator=torch.Generator().manual_seed(0))
    data = ClientTensors(ids, torch.ones(8, 12, dtype=torch.long), torch.tensor([0, 1] * 4))
    losses, calls = {}, {}
    for checkpointing in (False, True):
        built = build_model(cfg.model, ["a", "b"], "classification", seed=0, gradient_checkpointing=checkpointing)
        count = [0]
        built.model.lm.model.layers[0].mlp.register_forward_pre_hook(lambda *a, count=count: count.__setitem__(0, count[0] + 1))
        result = train_local(built.model, built.adapter, data, built.trainable, cfg.train.model_copy(update={"batch_size": 8}),
                             seed=0)
        losses[checkpointing], calls[checkpointing] = result.loss, count[0]
    assert calls == {False: 1, True: 2}  # one training step: the checkpointed layer runs again in the backward
    assert losses[True] == losses[False]
