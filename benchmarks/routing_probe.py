"""How differently the clients route before any federated round, for model-building variants (issue 9, part 2).

The premise target is a mean pairwise Jensen-Shannon divergence of at least 0.07 nats between clients' routing
distributions under FedAvg at alpha 0.1. A FedAvg run costs 15-30 min here; this probe measures the same
divergence on the model as built: each client's routing distribution p over its own training split, as its
client reports it in round 1 (`training.alignment.RoutingObserver`: the mean router softmax over its real
tokens, per MoE layer; here without the training steps that move the routers during the pass), then
`report.evidence.routing_spread`. Beside it the same divergence of the top-k choice counts, and the
expert-label information on the global test split, all in the time of a build. It screens recipe settings;
the one chosen still needs its FedAvg run.

Usage: .venv/bin/python benchmarks/routing_probe.py OUT.json [--preset specialised] [--seed 0]
           --variant NAME [k=v ...] [--variant NAME k=v ...] ...
Example: .venv/bin/python benchmarks/routing_probe.py benchmarks/results/specialised/routing_probe.json \
           --variant default --variant top2 model.top_k=2 --variant router-epochs-6 model.btx_router_epochs=6
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from common import write_result
from fedalign_moe.config import load_config, parse_overrides
from fedalign_moe.report.evidence import routing_concentration, routing_spread
from fedalign_moe.report.premise import mutual_information
from fedalign_moe.training.alignment import RoutingObserver
from fedalign_moe.training.local import routing_by_label
from fedalign_moe.training.setup import open_workspace


@torch.no_grad()
def soft_routing(ws, data, batch_size: int) -> list[list[float]]:
    """p [L][E]: the mean router softmax over the real tokens of ``data``, as a client reports it."""
    model, adapter = ws.built.model, ws.built.adapter
    model.eval()
    observer = RoutingObserver(adapter)
    with adapter.recorder() as rec:
        for start in range(0, len(data), batch_size):
            batch = data.batch(torch.arange(start, min(start + batch_size, len(data))), ws.device)
            model(**batch)
            observer.observe(rec.records, batch["attention_mask_BS"].reshape(-1).bool())
    return observer.result().p_LE.tolist()


def probe(preset: str, seed: int, sets: list[str]) -> dict:
    overrides = parse_overrides(sets)
    overrides["seed"] = seed
    overrides.setdefault("partition", {}).setdefault("alpha", 0.1)
    cfg = load_config(preset, overrides=overrides)
    started = time.perf_counter()
    ws = open_workspace(cfg)
    K, batch = len(ws.data.source.label_names), cfg.train.eval_batch_size
    counts_LKE = routing_by_label(ws.built.model, ws.built.adapter, ws.global_test(), K, batch, ws.device).numpy()
    soft, chosen = {}, {}
    for cid in range(cfg.partition.num_clients):
        train, _ = ws.client(cid)
        if len(train):
            soft[str(cid)] = soft_routing(ws, train, batch)
            chosen[str(cid)] = routing_by_label(ws.built.model, ws.built.adapter, train, K, batch, ws.device).sum(1).tolist()
    return {
        "sets": sets, "seed": seed, "alpha": cfg.partition.alpha,
        "routing_js_as_built_nats": routing_spread(soft),
        "topk_js_as_built_nats": routing_spread(chosen),
        "mi_expert_label_nats": float(np.mean([mutual_information(c) for c in counts_LKE])),
        "largest_expert_share": routing_concentration(chosen)[0],
        "build_seconds": ws.built.build_seconds,
        "wall_seconds": time.perf_counter() - started,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--preset", default="specialised")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME [k=v ...]")
    args = ap.parse_args()
    torch.set_num_threads(2)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name, *sets in args.variant:
        results[name] = probe(args.preset, args.seed, sets)
        write_result(args.out, results, indent=2)  # after each variant: an interrupted probe keeps the rest
        r = results[name]
        print(f"{name}: JS as built {r['routing_js_as_built_nats']:.4f} nats (top-k choices "
              f"{r['topk_js_as_built_nats']:.4f}), I(expert; label) "
              f"{r['mi_expert_label_nats']:.3f} nats, largest expert share {r['largest_expert_share']:.2f}, "
              f"build {r['build_seconds'] or 0:.0f} s, wall {r['wall_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
