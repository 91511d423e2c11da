"""Server aggregation cost (issue 13): FedAlign-MoE against Flower's FedAvg on the same replies.

Synthetic replies in one process, shaped like the bench model's trainable part scaled to two MoE layers
(8 experts, hidden 384, FFN 1536: 28.3M parameters a reply), serialised as Flower ArrayRecords the way
they reach the server. Measured side by side, median of --repeats runs:
  flower_fedavg   flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords (FedAvg's arithmetic)
  fedalign        core.aggregate.fedalign_aggregate over protocol.ArrayView (what the strategy runs)
  reference       the float64 implementation before issue 13 (tests/reference_aggregate.py)
  fedavg_tensor   our weighted average of the non-expert bytes, against a plain copy of the same bytes
Peak memory: a fresh process per client count resets the peak RSS, aggregates, and reads it back.

Usage: .venv/bin/python benchmarks/aggregation.py [--clients 10] [--repeats 5] [--memory 5,20,50]
       [--reference-memory 5,20]
Writes benchmarks/results/aggregation/<host>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from common import write_result
from fedalign_moe.config import FedAlignConfig
from fedalign_moe.core.aggregate import LayerNames, fedalign_aggregate, fedavg_tensor
from fedalign_moe.core.statistics import RoundRoutingStatistics  # noqa: E402
from fedalign_moe.federation.protocol import ArrayView  # noqa: E402

L, E, H, I = 2, 8, 384, 1536


def model(seed: int, layers: int = L) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {"head.weight": torch.randn(4, H, generator=g), "head.bias": torch.randn(4, generator=g)}
    for l in range(layers):
        state[f"l{l}.router"] = torch.randn(E, H, generator=g) * 0.02
        state[f"l{l}.up"] = torch.randn(E, I, H, generator=g) * 0.02
        state[f"l{l}.up_bias"] = torch.randn(E, I, generator=g) * 0.02
        state[f"l{l}.down"] = torch.randn(E, H, I, generator=g) * 0.02
        state[f"l{l}.down_bias"] = torch.randn(E, H, generator=g) * 0.02
        state[f"l{l}.dense"] = torch.randn(32 * H, H, generator=g) * 0.02  # non-expert weights (28.3M in all, as issue 13)
    return state


def case(C: int, seed: int = 0):
    glob = model(seed)
    g = torch.Generator().manual_seed(seed + 1)
    records = []
    for c in range(C):
        update = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in glob.items()}
        records.append(RecordDict({"arrays": ArrayRecord(update), "metrics": MetricRecord({"num-examples": 10 + c})}))
        del update
    layers = [LayerNames(f"l{l}.router", (f"l{l}.up", f"l{l}.up_bias", f"l{l}.down", f"l{l}.down_bias")) for l in range(L)]
    p = torch.rand(C, L, E, generator=g) + 0.1
    stats = RoundRoutingStatistics(p / p.sum(-1, keepdim=True), torch.full((C, L, E), 20.0), torch.rand(C, L, E, generator=g),
                                   torch.rand(C, L, E, generator=g), torch.randn(C, L, E, H, generator=g))
    examples = torch.tensor([float(10 + c) for c in range(C)])
    return glob, records, examples, stats, layers


def run_fedalign(glob, records, examples, stats, layers):
    return fedalign_aggregate(glob, [ArrayView(r["arrays"]) for r in records], examples, stats, layers, FedAlignConfig())


def run_reference(glob, records, examples, stats, layers):
    import reference_aggregate

    states = [r["arrays"].to_torch_state_dict() for r in records]
    return reference_aggregate.fedalign_aggregate(glob, states, examples, stats, layers, FedAlignConfig())


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def speed(C: int, repeats: int) -> dict:
    glob, records, examples, stats, layers = case(C)
    reply_bytes = sum(r["arrays"].count_bytes() for r in records)
    times = {
        "flower_fedavg": timed(lambda: aggregate_arrayrecords(records, "num-examples"), repeats),
        "fedalign": timed(lambda: run_fedalign(glob, records, examples, stats, layers), repeats),
        "reference": timed(lambda: run_reference(glob, records, examples, stats, layers), repeats),
    }
    # bandwidth of our weighted average against a plain copy of the same bytes (already deserialised tensors)
    plain = [[r["arrays"][n].numpy() for r in records] for n in ("l0.up", "l0.down")]
    tensors = [[torch.from_numpy(a) for a in per_name] for per_name in plain]
    w = examples / examples.sum()
    nbytes = sum(t.numel() * 4 for per_name in tensors for t in per_name)
    times["fedavg_tensor"] = timed(lambda: [fedavg_tensor(ts, w) for ts in tensors], repeats)
    times["plain_copy"] = timed(lambda: [[t.clone() for t in ts] for ts in tensors], repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"clients": C, "reply_bytes": reply_bytes, "seconds": times, "median_s": med,
            "fedalign_over_flower": med["fedalign"] / med["flower_fedavg"],
            "reference_over_flower": med["reference"] / med["flower_fedavg"],
            "fedavg_tensor_GBps": nbytes / med["fedavg_tensor"] / 1e9, "plain_copy_GBps": nbytes / med["plain_copy"] / 1e9,
            "fedavg_share_of_copy": med["plain_copy"] / med["fedavg_tensor"]}


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def memory_child(C: int, which: str) -> dict:
    glob, records, examples, stats, layers = case(C)
    reply_bytes = sum(r["arrays"].count_bytes() for r in records)
    model_bytes = sum(t.numel() * t.element_size() for t in glob.values())
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    base = _rss_kb("VmRSS:")
    fn = {"fedalign": run_fedalign, "reference": run_reference,
          "flower_fedavg": lambda *a: aggregate_arrayrecords(records, "num-examples")}[which]
    result = fn(glob, records, examples, stats, layers)
    peak = _rss_kb("VmHWM:")
    del result
    return {"clients": C, "which": which, "reply_MB": reply_bytes / 1e6, "model_MB": model_bytes / 1e6,
            "extra_peak_MB": (peak - base) * 1024 / 1e6, "extra_peak_in_models": (peak - base) * 1024 / model_bytes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--memory", default="5,20,50")
    ap.add_argument("--reference-memory", default="5,20", help="client counts for the float64 reference (it needs "
                    "about 8 models per client: 15 GB at 50 clients)")
    ap.add_argument("--child", nargs=2, metavar=("CLIENTS", "WHICH"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.child:
        print(json.dumps(memory_child(int(args.child[0]), args.child[1])))
        return
    out = {"host": platform.node(), "torch": torch.__version__, "threads": 1, "params_per_reply": sum(
        t.numel() for t in model(0).values()), "speed": speed(args.clients, args.repeats), "memory": []}
    reference_counts = {int(c) for c in args.reference_memory.split(",") if c}
    for C in [int(c) for c in args.memory.split(",") if c]:
        for which in ("flower_fedavg", "fedalign", "reference")[: 3 if C in reference_counts else 2]:
            child = subprocess.run([sys.executable, __file__, "--child", str(C), which], capture_output=True, text=True,
                                   check=True)
            out["memory"].append(json.loads(child.stdout.strip().splitlines()[-1]))
    s = out["speed"]
    print(f"{s['clients']} clients x {out['params_per_reply'] / 1e6:.1f}M parameters, median of {args.repeats}:")
    for k, v in s["median_s"].items():
        print(f"  {k:14s} {v:.3f} s")
    print(f"  fedalign / flower fedavg: {s['fedalign_over_flower']:.2f}x (float64 reference: {s['reference_over_flower']:.2f}x)")
    print(f"  fedavg_tensor {s['fedavg_tensor_GBps']:.1f} GB/s, plain copy {s['plain_copy_GBps']:.1f} GB/s "
          f"({100 * s['fedavg_share_of_copy']:.0f}% of copy)")
    for m in out["memory"]:
        print(f"  memory C={m['clients']:3d} {m['which']:14s} replies {m['reply_MB']:.0f} MB, peak above replies "
              f"{m['extra_peak_MB']:.0f} MB = {m['extra_peak_in_models']:.2f} models")
    dest = ROOT / "benchmarks" / "results" / "aggregation"
    dest.mkdir(parents=True, exist_ok=True)
    write_result(dest / f"{out['host'] or 'host'}.json", out)


if __name__ == "__main__":
    main()
