"""Protocol messages built by hand for the strategy tests: a grid of fixed nodes, the server's
instructions through a real strategy, and clients' replies through the real ``protocol.train_reply``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, Message

from fedalign_moe.config import load_config
from fedalign_moe.core.fedmoe import sub_moe_LE
from fedalign_moe.core.statistics import ModelRoutingStatistics
from fedalign_moe.federation import protocol
from fedalign_moe.federation.strategies import make_strategy
from fedalign_moe.models.base import MoELayerLayout, MoELayout
from fedalign_moe.registry import FEDERATED

L, E, K, H = 1, 4, 2, 3
LAYOUT = MoELayout(E, K, (MoELayerLayout(0, "r", ("x",)),))
TOKENS = 20  # real tokens each client trained on
BATCH = 16  # the tiny preset's batch size: one local epoch of n examples is ceil(n / 16) steps


STRATEGIES = list(FEDERATED)  # every federated one


def strategy(name: str, num_clients: int, partition_sizes: tuple[int, ...] | None = None, **federation):
    """A real strategy of the tiny preset over ``LAYOUT``; num_malicious 0, so that Bulyan aggregates 3 replies."""
    cfg = load_config("tiny", overrides={"federation": {"strategy": name, "num_malicious": 0, **federation},
                                         "partition": {"num_clients": num_clients}})
    return make_strategy(cfg, LAYOUT, partition_sizes)


def global_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"r": torch.randn(E, H, generator=g), "x": torch.randn(E, 2, 5, generator=g), "head": torch.randn(6, generator=g)}


def perturbed(state: dict[str, torch.Tensor], seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


class ScriptedGrid:
    """A Grid of fixed node ids whose clients answer through ``answer(message)`` (None: no reply)."""

    def __init__(self, node_ids: list[int], answer: Callable[[Message], Message | None] | None = None):
        self.node_ids, self.answer, self.sent = node_ids, answer, []

    def get_node_ids(self):
        return list(self.node_ids)

    def send_and_receive(self, messages, timeout=None):
        self.sent.append(list(messages))
        return [r for r in (self.answer(m) for m in messages) if r is not None]


def instructions(strategy, state: dict[str, torch.Tensor], nodes: int, server_round: int = 1) -> list[Message]:
    """The strategy's training messages to ``nodes`` nodes (ids 1..nodes)."""
    return list(strategy.configure_train(server_round, ArrayRecord(state), protocol.round_config("{}"),
                                         ScriptedGrid(list(range(1, nodes + 1)))))


def routing(counts_E: list[float] | None = None, tokens: int = TOKENS) -> ModelRoutingStatistics:
    n_LE = torch.tensor([counts_E or [10.0, 10.0, 10.0, 10.0]])  # sums to top-2 x 20 tokens
    p_LE = (n_LE + 1) / (n_LE + 1).sum(-1, keepdim=True)
    used_LE = n_LE > 0  # o and m are means over the tokens routed to e: 0 where none was
    return ModelRoutingStatistics(p_LE, n_LE, torch.where(used_LE, 0.5, 0.0), torch.where(used_LE, 0.2, 0.0),
                                  torch.ones(L, E, H), tokens)


def reply(sent: Message, pid: int, state: dict[str, torch.Tensor], examples: int = 10,
          stats: ModelRoutingStatistics | None = None) -> Message:
    """A valid reply of partition ``pid`` to the instruction ``sent``."""
    ins = protocol.read_instruction(sent.content)
    stats = stats or routing()
    held = None if ins.sub_moe_coverage is None else sub_moe_LE(stats.n_LE.double(), ins.sub_moe_coverage, K)
    steps = -(-examples // BATCH)
    figures = protocol.TrainFigures(1.0 + pid, steps, stats.tokens, 0.1, 0.5, 1.0, 4, 0.01 if ins.alignment else None)
    content = protocol.train_reply(pid, examples, state, figures, stats, LAYOUT, ins, held)
    return Message(content=content, reply_to=sent)
