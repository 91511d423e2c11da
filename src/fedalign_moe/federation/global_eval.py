"""Where the server's global model lives: in the server process, or on a node that already holds the base.

The server evaluates every aggregate on the global test split before adopting it, and starts the run from
the model as built. ``ServerModel`` does both in the server process, which then holds a whole copy of the
model. ``NodeModel`` asks a node instead (``federation.global_eval = "node"``; "auto" for a base above
1 GB): the server builds its model on the meta device (names, shapes, the MoE layout; no weight), a node
that holds the base for its own clients answers an initial-state query and evaluates each aggregate on
the global test split. Memory then holds one base per worker and none in the server.

Trust: a node that evaluates the global model, or hands the initial one, is trusted with that answer; the
answer is checked (names, shapes, dtype and finiteness of the initial arrays; ranges of the figures), not
verified. In a deployment with untrusted nodes keep ``global_eval = "server"`` where the server can hold
the base (docs/robustness.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from ..config import UserError
from ..training.local import evaluate, load_state, trainable_state
from ..training.setup import Workspace
from . import protocol
from .protocol import ReplyError
from .screening import error_cause

logger = logging.getLogger(__name__)
MAX_NODES_ASKED = 3  # nodes asked in turn before the server gives up on a request


def connected_nodes(grid: Grid, want: int, wait_seconds: float) -> list[int]:
    """The connected nodes by id, polled each second until ``want`` are connected or ``wait_seconds`` passed."""
    deadline = time.monotonic() + wait_seconds
    while len(nodes := sorted(grid.get_node_ids())) < want and time.monotonic() < deadline:
        time.sleep(1)
    return nodes


class NoNodeAnswer(UserError):
    """No connected node answered a request of the server's; one line naming each node's reason."""


class ServerModel:
    """The global model held and evaluated by the server process itself."""

    def __init__(self, ws: Workspace):
        self.ws = ws

    def initial_state(self) -> ArrayRecord:
        return ArrayRecord(trainable_state(self.ws.built.model, self.ws.built.trainable))

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> dict:
        """``arrays`` loaded into the server's model, evaluated on the global test split."""
        load_state(self.ws.built.model, arrays.to_torch_state_dict())
        return evaluate(self.ws.built.model, self.ws.global_test(), self.ws.cfg.train.eval_batch_size, self.ws.device)


class NodeModel:
    """The global model evaluated on a node: the first connected node (by id) that answers."""

    def __init__(self, grid: Grid, ws: Workspace):
        self.grid, self.ws, self.cfg = grid, ws, ws.cfg
        params = dict(ws.built.model.named_parameters())
        self.shapes = {n: tuple(params[n].shape) for n in ws.built.trainable}

    def _ask(self, what: str, content: Callable[[], RecordDict], message_type: str, read: Callable[[Message], object],
             timeout: float | None):
        reasons = []
        # the initial model is asked for before round 1, when SuperNodes (or a loaded machine's simulated
        # nodes) may not have connected yet
        for node in connected_nodes(self.grid, 1, self.cfg.federation.node_wait_seconds)[:MAX_NODES_ASKED]:
            msg = Message(content=content(), dst_node_id=node, message_type=message_type)
            replies = list(self.grid.send_and_receive([msg], timeout=timeout))
            if not replies:
                reasons.append(f"node {node}: no reply")
                continue
            reply = replies[0]
            try:
                if reply.has_error():
                    raise ReplyError(error_cause(reply))
                return read(reply)
            except ReplyError as err:
                logger.warning("%s: node %s gave no usable answer: %s", what, node, err)
                reasons.append(f"node {node}: {err}")
        wait = self.cfg.federation.node_wait_seconds
        raise NoNodeAnswer(f"{what}: no node answered ({'; '.join(reasons[:3]) or f'no node connected within {wait:g} s'})")

    def initial_state(self) -> ArrayRecord:
        """The trainable parameters as a node built them. No time limit: the node may first load a base of
        many GB, far longer than a round's ``round_timeout``; a dead node answers with an error at once."""
        return self._ask("the initial model", lambda: protocol.initial_state_request(self.cfg.to_json()),
                         MessageType.QUERY, lambda m: protocol.read_initial_state(m, self.shapes), None)

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> dict:
        """``arrays`` evaluated on the global test split by a node (a non-finite loss is an answer: the
        aggregate diverged); ``NoNodeAnswer`` when no node could."""
        size = len(self.ws.data.global_test)

        def read(reply: Message) -> dict:
            got = protocol.read_eval_reply(reply, self.cfg.partition.num_clients, finite_loss=False)
            if got.num_examples != max(size, 1):
                raise ReplyError(f"it evaluated {got.num_examples} examples, the global test split holds {size}")
            return {"loss": got.loss, "accuracy": got.accuracy, "num-examples": got.num_examples}

        return self._ask(f"round {server_round}'s global evaluation",
                         lambda: protocol.global_eval_instruction(self.cfg.to_json(), server_round, arrays),
                         MessageType.EVALUATE, read, self.cfg.federation.round_timeout)


def global_model(grid: Grid, ws: Workspace) -> ServerModel | NodeModel:
    """Where this run's global model is evaluated: on a node when the server built it on the meta device."""
    return NodeModel(grid, ws) if ws.on_meta else ServerModel(ws)
