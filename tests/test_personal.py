"""Personalised experts (issue 9, section 4): a client outside A(e) keeps its own expert e and router row e.

Known answers for the tensor function (``core.personal``), the wire field (validated where it is read),
the config rule, the client (what it trains from, what it keeps), and a federated run in-process whose
instructions name exactly the experts each client was outside of in its last aggregated round.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedalign_moe.config import load_config
from fedalign_moe.core.aggregate import LayerNames
from fedalign_moe.core.lora_experts import a_view, b_view
from fedalign_moe.core.personal import personal_mask_LEC, with_own_experts
from fedalign_moe.federation import client_app, protocol
from fedalign_moe.federation.node_policy import TRUST_ENV
from in_process import InProcessGrid, run_in_process

# ----------------------------------------------------------------------------------------------- core

def test_own_experts_replace_exactly_their_rows_and_router_rows():
    E, H, F = 3, 2, 4
    layers = [LayerNames("r0", ("w0",)), LayerNames("r1", ("w1",))]
    glob = {"r0": torch.zeros(E, H), "w0": torch.zeros(E, F, H), "r1": torch.zeros(E, H), "w1": torch.zeros(E, F, H),
            "head": torch.zeros(2)}
    own = {n: torch.full_like(t, 7.0) for n, t in glob.items()}
    personal_LE = torch.tensor([[False, True, False], [False, False, False]])
    out = with_own_experts(glob, own, personal_LE, layers)
    assert out["r0"][1].eq(7).all() and out["r0"][[0, 2]].eq(0).all()
    assert out["w0"][1].eq(7).all() and out["w0"][[0, 2]].eq(0).all()
    assert out["r1"] is glob["r1"] and out["w1"] is glob["w1"] and out["head"] is glob["head"]  # untouched: no copy
    assert glob["r0"].eq(0).all() and glob["w0"].eq(0).all()  # the global state itself is not written


def test_own_lora_factors_replace_expert_e_through_the_views():
    """A [E*r, I] holds expert e in rows e*r..e*r+r-1, B [O, r*E] in columns k*E + e (lora_experts)."""
    E, r, I, O = 3, 2, 4, 5
    layers = [LayerNames("router", (), (("A", "B"),))]
    glob = {"router": torch.zeros(E, I), "A": torch.zeros(E * r, I), "B": torch.zeros(O, r * E)}
    own = {"router": torch.ones(E, I), "A": torch.arange(E * r * I, dtype=torch.float).view(E * r, I),
           "B": torch.arange(O * r * E, dtype=torch.float).view(O, r * E)}
    out = with_own_experts(glob, own, torch.tensor([[False, False, True]]), layers)
    assert torch.equal(out["A"][4:6], own["A"][4:6]) and out["A"][:4].eq(0).all()
    assert torch.equal(out["B"][:, [2, 5]], own["B"][:, [2, 5]]) and out["B"][:, [0, 1, 3, 4]].eq(0).all()
    assert torch.equal(a_view(out["A"], E)[2], a_view(own["A"], E)[2]) and torch.equal(b_view(out["B"], E)[2], b_view(own["B"], E)[2])
    assert out["router"][2].eq(1).all() and out["router"][:2].eq(0).all()


def test_frozen_expert_tensors_are_skipped_and_shape_mismatches_are_errors():
    layers = [LayerNames("router", ("frozen",))]
    glob = {"router": torch.zeros(2, 3)}  # the stacked experts do not travel (LoRA, or frozen)
    out = with_own_experts(glob, {"router": torch.ones(2, 3)}, torch.tensor([[True, False]]), layers)
    assert out["router"][0].eq(1).all() and "frozen" not in out
    with pytest.raises(ValueError, match="router: own copy"):
        with_own_experts(glob, {"router": torch.ones(3, 3)}, torch.tensor([[True, False]]), layers)


def test_the_mask_is_the_complement_of_the_aligned_sets_where_experts_were_aligned():
    aligned_LEC = torch.tensor([[[True, False], [True, True]], [[False, False], [True, False]]])
    keep = personal_mask_LEC(aligned_LEC, torch.tensor([True, False]))
    assert keep.tolist() == [[[False, True], [False, False]], [[False, False], [False, False]]]


# ------------------------------------------------------------------------------------------- protocol

def _fedalign_content(L=2, E=3) -> RecordDict:
    content = RecordDict({protocol.ARRAYS: ArrayRecord({"w": torch.zeros(2)}),
                          protocol.CONFIG: ConfigRecord({protocol.RUN_CONFIG: "{}", protocol.SERVER_ROUND: 2})})
    protocol.attach_alignment(content, protocol.AlignmentTarget(torch.full((L, E), 1 / E), torch.ones(L, E), 0.1))
    return content


def test_a_personal_mask_travels_in_one_clients_copy_only():
    shared = _fedalign_content()
    mask = torch.tensor([[True, False, False], [False, False, True]])
    mine = protocol.with_personal_experts(shared, mask)
    assert protocol.PERSONAL_EXPERTS not in shared[protocol.CONFIG]  # the other clients' content is untouched
    assert mine[protocol.ARRAYS] is shared[protocol.ARRAYS]  # nothing large copied
    assert torch.equal(protocol.read_instruction(mine).alignment.personal_LE, mask)
    assert protocol.read_instruction(shared).alignment.personal_LE is None


@pytest.mark.parametrize("value, why", [([0, 1], "list of 6"), ([0, 1, 2, 0, 0, 0], "zeros and ones"),
                                        ([True, False, False, False, False, False], "zeros and ones"),
                                        ("011000", "list of 6")])
def test_a_malformed_personal_mask_is_refused_in_one_line(value, why):
    content = _fedalign_content()
    content[protocol.CONFIG][protocol.PERSONAL_EXPERTS] = value
    with pytest.raises(protocol.InstructionError, match=why):
        protocol.read_instruction(content)


def test_a_personal_mask_without_a_fedalign_target_is_refused():
    content = _fedalign_content()
    del content[protocol.FEDALIGN_TARGET]
    content[protocol.CONFIG][protocol.PERSONAL_EXPERTS] = [0] * 6
    with pytest.raises(protocol.InstructionError, match="personal-experts without a fedalign-target"):
        protocol.read_instruction(content)


def test_personal_experts_need_the_semantic_expert_aggregation():
    with pytest.raises(ValueError, match="fedalign.personal_experts .* strategy 'fedalign-adaptive'"):
        load_config("tiny", overrides={"federation": {"strategy": "fedalign-adaptive"},
                                       "fedalign": {"personal_experts": True}})
    load_config("tiny", overrides={"federation": {"strategy": "fedavg"}, "fedalign": {"personal_experts": True}})


# --------------------------------------------------------------------------------------------- client

def _client_round(cfg, monkeypatch, context, personal_LE):
    """One real client round on partition 0 with a FedAlign-MoE instruction; returns what it loaded."""
    from fedalign_moe.training.setup import open_workspace

    monkeypatch.setenv(TRUST_ENV, "run-config")
    ws = open_workspace(cfg)
    state = {n: p.detach().clone() for n, p in ws.built.model.named_parameters() if n in ws.built.trainable}
    L, E = len(ws.built.adapter.layout.layers), ws.built.adapter.layout.num_experts
    ins = protocol.Instruction(2, cfg.to_json(), state, alignment=protocol.AlignmentTarget(
        torch.full((L, E), 1 / E), torch.ones(L, E), 0.1, 0.0, personal_LE))
    loaded = {}
    real_load = client_app.load_state
    monkeypatch.setattr(client_app, "load_state", lambda model, s: (loaded.update(s), real_load(model, s)))
    client_app.train_round(ins, context)
    return state, loaded, ws.built.adapter.layout


def test_a_client_trains_from_its_own_copies_of_the_experts_it_keeps_and_keeps_its_trained_ones(tmp_path, monkeypatch, caplog):
    cfg = load_config("tiny", overrides={"out_dir": str(tmp_path), "federation": {"strategy": "fedalign"},
                                         "fedalign": {"personal_experts": True}})
    context = Context(run_id=1, node_id=1, node_config={protocol.PARTITION_ID: 0, "num-partitions": 3},
                      state=RecordDict(), run_config={})
    personal_LE = torch.zeros(2, 4, dtype=torch.bool)
    personal_LE[1, 2] = True
    with caplog.at_level(logging.WARNING):  # no copy yet (a node that restarted): the global experts, said in a line
        glob, loaded, layout = _client_round(cfg, monkeypatch, context, personal_LE)
    assert "holds no copy" in caplog.text and all(torch.equal(loaded[n], glob[n]) for n in glob)
    own = context.state[client_app.OWN_EXPERTS].to_torch_state_dict()  # what it trained, kept for the next round
    layer = layout.layers[1]
    assert set(own) == layout.moe_parameter_names() & set(glob)
    assert not torch.equal(own[layer.experts[0]][2], glob[layer.experts[0]][2])  # trained: differs from the global

    caplog.clear()
    glob2, loaded, _ = _client_round(cfg, monkeypatch, context, personal_LE)
    assert "holds no copy" not in caplog.text
    for name in (layer.router, *layer.experts):
        assert torch.equal(loaded[name][2], own[name][2])  # its own expert 2 of layer 1 and router row 2
        assert torch.equal(loaded[name][[0, 1, 3]], glob2[name][[0, 1, 3]])  # the global ones elsewhere
    other = layout.layers[0]
    assert all(torch.equal(loaded[n], glob2[n]) for n in (other.router, *other.experts))


def test_a_client_told_nothing_keeps_nothing(tmp_path, monkeypatch):
    cfg = load_config("tiny", overrides={"out_dir": str(tmp_path), "federation": {"strategy": "fedalign"}})
    context = Context(run_id=1, node_id=1, node_config={protocol.PARTITION_ID: 0, "num-partitions": 3},
                      state=RecordDict(), run_config={})
    _client_round(cfg, monkeypatch, context, None)
    assert client_app.OWN_EXPERTS not in context.state


# --------------------------------------------------------------------------------------- federated run

class RecordingGrid(InProcessGrid):
    def __init__(self, num_nodes):
        super().__init__(num_nodes)
        self.masks: list[dict[int, list[int]]] = []  # per training round: node -> the mask it was sent

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if messages and protocol.FEDALIGN_TARGET in messages[0].content:
            self.masks.append({m.metadata.dst_node_id: m.content[protocol.CONFIG][protocol.PERSONAL_EXPERTS]
                               for m in messages})
        return super().send_and_receive(messages, timeout)


def test_each_client_is_told_the_experts_it_was_outside_of_in_the_last_round(tmp_path, monkeypatch):
    cfg = load_config("tiny", overrides={"out_dir": str(tmp_path), "federation": {"strategy": "fedalign", "rounds": 3},
                                         "fedalign": {"personal_experts": True}, "partition": {"alpha": 0.1}})
    grid = RecordingGrid(cfg.partition.num_clients)
    monkeypatch.setattr("in_process.InProcessGrid", lambda n: grid)
    summary = run_in_process(cfg, monkeypatch)
    assert summary["rounds"] == 3 and summary["rounds_not_adopted"] == []
    assert len(grid.masks) == 3 and all(sum(m) == 0 for m in grid.masks[0].values())  # round 1: nothing to keep
    diagnostics = [json.loads(line) for line in (tmp_path / "diagnostics.jsonl").read_text().splitlines()]
    kept = 0
    for rnd in (1, 2):  # the mask of round r + 1 is the complement of round r's aligned sets
        aligned = diagnostics[rnd - 1]["aligned"]
        for node, mask in grid.masks[rnd].items():
            pid = node - 1
            expected = [int(pid not in aligned[l][e]) for l in range(len(aligned)) for e in range(len(aligned[l]))]
            assert mask == expected
            kept += sum(mask)
    assert kept > 0  # some client really was outside some aligned set
    assert all(client_app.OWN_EXPERTS in c.state for c in grid.contexts.values())


def test_resuming_a_personal_experts_run_says_what_the_restart_lost():
    """Kept experts live in Flower's node state, which a restart loses: `resume` must not claim the same
    numbers as an uninterrupted run without saying so (the CLI prints this as a warning line)."""
    from fedalign_moe.experiment import resume_caveat

    on = load_config("tiny", overrides={"federation": {"strategy": "fedalign"}, "fedalign": {"personal_experts": True}})
    line = resume_caveat(on, 7)
    assert line is not None and "round 8 trains every client from the global experts" in line
    assert resume_caveat(load_config("tiny", overrides={"federation": {"strategy": "fedalign"}}), 7) is None
    assert resume_caveat(load_config("tiny", overrides={"federation": {"strategy": "fedavg"},
                                                          "fedalign": {"personal_experts": True}}), 7) is None
