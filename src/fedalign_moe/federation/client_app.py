"""The Flower ClientApp: local training and evaluation on one partition (Message API).

The server's message says everything a round asks (``protocol.read_instruction``): the run's config,
the global parameters, FedProx's mu, whether to upload a sub-MoE (FedMoE), FedAlign-MoE's target. The
node config gives the ``partition-id`` (set by the simulation engine, or by ``flower-supernode
--node-config 'partition-id=3 num-partitions=10'``) and the node's own limits: what it reads, where it
writes, its device (``node_policy.NodePolicy``); a run config that asks for more is refused.

Personalised experts (FedAlign-MoE, [ours]): when the instruction names the experts this client keeps, it
trains from its own copies of those (kept in the node's ``context.state`` from its last round, never
uploaded anywhere but in its ordinary update) and keeps a copy of its trained experts for the next round.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ..config import Config
from ..core.fedmoe import sub_moe_LE
from ..core.personal import with_own_experts
from ..models.base import MoELayout
from ..training.alignment import ClientAligner
from ..training.local import evaluate, load_state, round_seed, train_local, trainable_state
from ..training.setup import Workspace, cached_workspace
from . import attacks, protocol
from .node_policy import NodePolicy
from .protocol import Instruction, TrainFigures

app = ClientApp()
logger = logging.getLogger(__name__)
OWN_EXPERTS = "own-experts"  # context.state: this node's experts and routers after its last round (personalised experts)


def _workspace(run_config: str, context: Context) -> tuple[Workspace, int]:
    """This node's workspace for the run: the run config's experiment within the node's own policy."""
    policy = NodePolicy.of_node(context.node_config)
    ws = cached_workspace(run_config if policy.trust_run_config else policy.apply(Config.from_json(run_config)).to_json())
    partition_id = int(context.node_config[protocol.PARTITION_ID])
    if not 0 <= partition_id < ws.cfg.partition.num_clients:
        raise ValueError(f"partition-id {partition_id} outside 0..{ws.cfg.partition.num_clients - 1}")
    return ws, partition_id


def train_round(ins: Instruction, context: Context) -> RecordDict:
    """Do what the instruction says on this node's partition; return the reply's content."""
    ws, pid = _workspace(ins.run_config, context)
    target = ins.alignment
    personal = None if target is None else target.personal_LE
    layout = ws.built.adapter.layout
    load_state(ws.built.model, ins.arrays if personal is None else _own_experts_in(ins.arrays, personal, layout,
                                                                                 context, pid))
    train_data, test_data = ws.client(pid)
    seed = round_seed(ws.cfg.seed, ins.server_round, pid)
    aligner = None if target is None else ClientAligner(ws.built.adapter, target.p_g_LE, target.alpha_LE,
                                                        target.reg_lambda, target.stats_noise_sigma, seed)
    result = train_local(ws.built.model, ws.built.adapter, train_data, ws.built.trainable, ws.cfg.train, seed=seed,
                         proximal_mu=ins.proximal_mu, device=ws.device, aligner=aligner)
    if result.tokens == 0:
        raise ValueError(f"partition {pid} trained on zero tokens ({result.num_examples} examples)")
    local = evaluate(ws.built.model, test_data, ws.cfg.train.eval_batch_size, ws.device)
    routing = result.routing if aligner is None else aligner.upload(result.routing)
    held = None if ins.sub_moe_coverage is None else sub_moe_LE(routing.n_LE.double(), ins.sub_moe_coverage, layout.top_k)
    figures = TrainFigures(result.loss, result.steps, result.tokens, result.seconds, local["accuracy"], local["loss"],
                           local["num-examples"], aligner.mean_regulariser() if aligner else None)
    state = trainable_state(ws.built.model, ws.built.trainable)
    if personal is not None:  # the copies this node may keep next round
        context.state[OWN_EXPERTS] = ArrayRecord({n: state[n] for n in layout.moe_parameter_names() if n in state})
    num_examples = result.num_examples
    if ws.cfg.attack.kind != "none" and pid in ws.cfg.attack.clients:  # a simulation's hostile client (attacks.py)
        state = attacks.hostile_update(ws.cfg.attack, state, ins.arrays)
        num_examples, figures = attacks.hostile_claim(ws.cfg.attack, num_examples, figures, protocol.LocalWork.of_config(ws.cfg))
        routing = attacks.hostile_statistics(ws.cfg.attack, routing, layout.top_k)
        held = None if ins.sub_moe_coverage is None else sub_moe_LE(routing.n_LE.double(), ins.sub_moe_coverage, layout.top_k)
    return protocol.train_reply(pid, num_examples, state, figures, routing, layout, ins, held)


def _own_experts_in(arrays: dict[str, torch.Tensor], personal_LE: torch.Tensor, layout: MoELayout,
                    context: Context, pid: int) -> dict[str, torch.Tensor]:
    """The global arrays with this node's own copies of the experts it keeps; the global ones, with a log
    line, when it holds no copy of them (a node that restarted since its last round)."""
    if not personal_LE.any():
        return arrays
    own = context.state[OWN_EXPERTS].to_torch_state_dict() if OWN_EXPERTS in context.state else {}
    missing = sorted(n for n in layout.moe_parameter_names() if n in arrays and n not in own)
    if missing:
        logger.warning("partition %d keeps %d experts but holds no copy of %s (restarted?): it trains from the "
                       "global ones this round", pid, int(personal_LE.sum()), missing[0])
        return arrays
    return with_own_experts(arrays, own, personal_LE, [l.names() for l in layout.layers])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on the local split; reply the update, metrics and routing statistics."""
    return Message(content=train_round(protocol.read_instruction(msg.content), context), reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the received (global) model on this client's own test split, or on the run's global test
    split when the instruction says so (the server of a run whose base it does not hold)."""
    ins = protocol.read_instruction(msg.content)
    split = protocol.read_eval_split(msg.content)
    ws, pid = _workspace(ins.run_config, context)
    load_state(ws.built.model, ins.arrays)
    test_data = ws.global_test() if split == "global" else ws.client(pid)[1]
    with torch.no_grad():
        res = evaluate(ws.built.model, test_data, ws.cfg.train.eval_batch_size, ws.device)
    return Message(content=protocol.eval_reply(pid, res["num-examples"], res["accuracy"], res["loss"]), reply_to=msg)


@app.query()
def initial_state(msg: Message, context: Context) -> Message:
    """The trainable parameters of the model as this node built it, before any round: the server that holds
    no base starts the run from them and sends them to every client."""
    ws, _ = _workspace(protocol.read_run_config(msg.content), context)
    if ws.initial_trainable is None:
        raise ValueError("this node keeps no initial model: the run does not evaluate on nodes (federation.global_eval)")
    return Message(content=protocol.initial_state_reply(ws.initial_trainable), reply_to=msg)
