"""What one training message costs a deployed node, phase by phase.

Flower 1.41's deployment runtime starts a fresh ClientApp process for every message, so each round pays, on
every node, for the imports, the data, the model and the client's tensors before it trains. This script
does what such a process does, in a fresh interpreter each time, and times each phase: the imports the
ClientApp module pulls in; ``prepare_data`` (load, split, partition); building the model; the client's
train and test tensors (tokenising, and the frozen prefix of an encoder, read from the node's disk cache
after the first message); one round of local training through ``client_app.train_round``. The first
repeat fills the node's disk caches (prefix, built models); the others are what every later message costs.

Usage: .venv/bin/python benchmarks/message_startup.py [--preset quick] [--repeats 3] [--label NAME]
         [--no-cache] [--set section.key=value ...]
``--no-cache``: a node that keeps nothing between messages (node config ``cache-dir='none'``: no prefix
cache, no kept models). Writes benchmarks/results/message_startup/NAME.json and prints one line a repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(preset: str, strategy: str, no_cache: bool, sets: list[str]) -> dict:
    """One message's work in this (fresh) process; seconds per phase."""
    t0 = time.perf_counter()
    from flwr.app import Context, RecordDict

    from fedalign_moe.federation import client_app, protocol  # what the ClientApp module imports
    t_import = time.perf_counter()
    from fedalign_moe.config import deep_merge, load_config, parse_overrides
    from fedalign_moe.federation.node_policy import TRUST_ENV
    from fedalign_moe.federation.strategies import make_strategy
    from fedalign_moe.training import setup

    over = {"federation": {"strategy": strategy}}
    if no_cache:
        over["model"] = {"prefix_cache_dir": None, "build_cache_dir": None}
    cfg = load_config(preset, overrides=deep_merge(over, parse_overrides(sets)))
    data = setup.prepare_data(cfg)
    t_data = time.perf_counter()
    built = setup.build_for(cfg, data)
    t_model = time.perf_counter()
    ws = setup.Workspace(cfg, data, built, setup.resolve_device(cfg.model.device))
    ws.client(0)
    t_tensors = time.perf_counter()
    # one real instruction through the real strategy and the ClientApp's own round
    from flwr.app import ArrayRecord

    from fedalign_moe.training.local import trainable_state

    strategy = make_strategy(cfg, built.layout)
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):  # what Flower sets in its app processes
        setattr(TaskIdentity, name, 1)

    class OneNode:
        def get_node_ids(self):
            return [1]

    msg = list(strategy.configure_train(1, ArrayRecord(trainable_state(built.model, built.trainable)),
                                        protocol.round_config(cfg.to_json()), OneNode()))[0]
    client_app.cached_workspace = lambda _: ws  # the workspace this process opened above, phase by phase
    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={protocol.PARTITION_ID: 0, "num-partitions": cfg.partition.num_clients})
    os.environ[TRUST_ENV] = "run-config"  # what a simulation's client process is told
    client_app.train_round(protocol.read_instruction(msg.content), context)
    t_train = time.perf_counter()
    return {"imports": t_import - t0, "data": t_data - t_import, "model": t_model - t_data,
            "client_tensors": t_tensors - t_model, "train_round": t_train - t_tensors, "total": t_train - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--strategy", default="fedalign")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--label", default="current")
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.preset, args.strategy, args.no_cache, args.sets)))
        return
    runs = []
    for i in range(args.repeats):
        t0 = time.perf_counter()
        extra = ["--no-cache"] * args.no_cache + [a for s in args.sets for a in ("--set", s)]
        res = subprocess.run([sys.executable, __file__, "--child", "--preset", args.preset, "--strategy", args.strategy,
                              *extra], capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            sys.exit(f"repeat {i}: the child failed: {res.stderr.strip().splitlines()[-1:]}")
        phases = json.loads(res.stdout.strip().splitlines()[-1])
        phases["process_wall"] = wall
        runs.append(phases)
        print(f"repeat {i}: " + "  ".join(f"{k} {v:.2f}s" for k, v in phases.items()), flush=True)
    dest = ROOT / "benchmarks" / "results" / "message_startup"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{args.label}.json").write_text(json.dumps({"preset": args.preset, "strategy": args.strategy,
                                                         "no_cache": args.no_cache, "set": args.sets,
                                                         "repeats": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
