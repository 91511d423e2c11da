"""Federated runs without Ray, for the tests that cover many model families (a Flower simulation costs
~30 s here, this ~2 s): the real ServerApp loop (``server_app.serve``) drives a grid whose nodes answer
each message by calling the real ClientApp (``client_app.app``) in this process, with the node config
Flower's simulation gives (``partition-id``, ``num-partitions``). Only the transport differs from
``fedalign-moe run``; the CLI tests cover that."""

from __future__ import annotations

from flwr.app import Context, Message, RecordDict

from fedalign_moe.config import Config
from fedalign_moe.federation import client_app, protocol
from fedalign_moe.federation.node_policy import TRUST_ENV
from fedalign_moe.federation.server_app import serve


class InProcessGrid:
    """Nodes 1..N, node n holding partition n - 1; each message is answered by the real ClientApp."""

    def __init__(self, num_nodes: int):
        self.contexts = {n: Context(run_id=1, node_id=n, state=RecordDict(), run_config={},
                                    node_config={protocol.PARTITION_ID: n - 1, "num-partitions": num_nodes})
                         for n in range(1, num_nodes + 1)}

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        return [client_app.app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]


def run_in_process(cfg: Config, monkeypatch) -> dict:
    """Run ``cfg`` (its rounds, its strategy) and return the run's summary, as ``simulate`` would."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setenv(TRUST_ENV, "run-config")  # what simulate sets in its client processes
    for name in ("_run_id", "_node_id", "_task_id"):  # what Flower sets in its app processes
        monkeypatch.setattr(TaskIdentity, name, 1)
    return serve(InProcessGrid(cfg.partition.num_clients), cfg)
