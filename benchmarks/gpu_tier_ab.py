"""A/B of the client's local step on one GPU: old code (4adcfc8) vs new code (d7827ae), in ONE process.

Both package snapshots (``git archive <commit> src``) are imported once each and swapped in
sys.modules (and sys.path) before each measurement, so gpu_tier.py's functions, which import
``fedalign_moe`` lazily, run the chosen version. One Mixtral (the gpu preset's model, built once by the
new snapshot) is shared: each version wraps the same ``lm`` in its own ``CausalLMTaskModel`` and
``HFMoEAdapter`` (neither holds parameters of its own; the routing hooks exist only inside
``train_local``), so weights, memory and warm-up are common to both.

Order (ABBA at each config): round 1 runs old then new at every (batch, step); round 2 new then old.
Each measurement is gpu_tier's: 3 warm-up steps, then 2 repetitions of one 8-step call; the summary is
the median over the 4 repetitions of each version.

Prepare (here), then run on the GPU host with the folder ``.gpu`` carried (docs/gpu.md, "After one
accumulator for every strategy"):
    mkdir -p .gpu/old .gpu/new
    git archive 4adcfc8 src | tar -x -C .gpu/old; git archive d7827ae src | tar -x -C .gpu/new
    cp benchmarks/gpu_tier.py .gpu/; cp benchmarks/gpu_tier_ab.py .gpu/ab.py
CPU check (tiny dims, 25 s):
    .venv/bin/python .gpu/ab.py --device cpu --tiny --warmup 1 --steps 2 --reps 1 --profile-batch 4
Results of 2026-11-26 (H100): benchmarks/results/gpu_tier/h100-ab/.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

import gpu_tier as gt

T0 = time.perf_counter()
MODS = ["fedalign_moe.training.local", "fedalign_moe.training.alignment", "fedalign_moe.models.build",
        "fedalign_moe.models.hf_moe", "fedalign_moe.models.task", "fedalign_moe.models.upcycle_llama",
        "fedalign_moe.core.statistics", "fedalign_moe.models.base"]
VERSIONS: dict[str, tuple[str, dict]] = {}


def _ours(name: str) -> bool:
    return name == "fedalign_moe" or name.startswith("fedalign_moe.")


def load(tag: str, path: str) -> None:
    import importlib
    for k in [k for k in sys.modules if _ours(k)]:
        del sys.modules[k]
    sys.path.insert(0, path)
    for m in MODS:
        importlib.import_module(m)
    VERSIONS[tag] = (path, {k: v for k, v in sys.modules.items() if _ours(k)})
    assert all(getattr(v, "__file__", path) is None or str(getattr(v, "__file__", path)).startswith(path)
               for v in VERSIONS[tag][1].values()), f"{tag}: a module from outside {path}"
    sys.path.remove(path)


def activate(tag: str) -> None:
    path, mods = VERSIONS[tag]
    for k in [k for k in sys.modules if _ours(k)]:
        del sys.modules[k]
    sys.modules.update(mods)
    for p in [p for _, (p, _) in VERSIONS.items() if p in sys.path]:
        sys.path.remove(p)
    sys.path.insert(0, path)


def profile_host(fn, device, rows=12) -> dict:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    gt.sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        gt.sync(device)
    wall = time.perf_counter() - t0
    ka = prof.key_averages()
    dkey = "self_device_time_total" if hasattr(ka[0], "self_device_time_total") else "self_cuda_time_total"
    on_dev = [e for e in ka if str(getattr(e, "device_type", "")).endswith("CUDA")]
    cpu_ops = [e for e in ka if not str(getattr(e, "device_type", "")).endswith("CUDA")]
    top_cpu = sorted(cpu_ops, key=lambda e: -e.self_cpu_time_total)[:rows]
    top_dev = sorted(on_dev, key=lambda e: -getattr(e, dkey, 0))[:rows]
    return {"wall_s": wall, "device_busy_s": sum(getattr(e, dkey, 0) for e in on_dev) / 1e6,
            "host_self_s": sum(e.self_cpu_time_total for e in cpu_ops) / 1e6,
            "top_host": [{"name": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in top_cpu],
            "top_device": [{"name": e.key, "self_device_ms": getattr(e, dkey, 0) / 1e3, "calls": e.count} for e in top_dev],
            "host_table": ka.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--old", default=".gpu/old/src")
    ap.add_argument("--new", default=".gpu/new/src")
    ap.add_argument("--batches", default=None)
    ap.add_argument("--impls", default="ours-fedavg,ours-fedalign,ours-bare")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=200, help="start no new measurement after this")
    ap.add_argument("--profile-batch", type=int, default=None, help="profile fedavg old and new at this batch")
    ap.add_argument("--out", default="/tmp/ab")
    ap.add_argument("--old-label", default="4adcfc8", help="the commit the --old snapshot is (for the record)")
    ap.add_argument("--new-label", default="d7827ae", help="the commit the --new snapshot is")
    args = ap.parse_args()
    args.batches = args.batches or ("2,4" if args.tiny else "16,64,128")
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    load("old", str(Path(args.old).resolve()))
    load("new", str(Path(args.new).resolve()))
    import transformers
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "python": sys.version.split()[0], "argv": sys.argv[1:], "old": args.old_label, "new": args.new_label,
            "order": "per config: round 1 old then new, round 2 new then old (ABBA)"}
    res = {"meta": meta, "rows": [], "profiles": {}, "errors": []}
    save = lambda: (out / "ab.json").write_text(json.dumps(res, indent=1))  # noqa: E731
    gt.log("meta " + json.dumps(meta))

    activate("new")
    t = time.perf_counter()
    model_new, adapter_new, names = gt.build(args, device, torch.bfloat16)
    activate("old")
    from fedalign_moe.models.build import _select_trainable
    from fedalign_moe.models.hf_moe import HFMoEAdapter
    from fedalign_moe.models.task import CausalLMTaskModel
    model_old = CausalLMTaskModel(model_new.lm, 4, model_new.label_token_ids.tolist()).to(device)
    adapter_old = HFMoEAdapter.from_model(model_old, model_new.lm.config)
    names_old = _select_trainable(model_old, adapter_old.layout, "experts-routers")
    assert tuple(names_old) == tuple(names), "trainable sets differ"
    assert type(adapter_old).__module__ != type(adapter_new).__module__ or type(adapter_old) is not type(adapter_new)
    meta["build_s"] = time.perf_counter() - t
    for tag in ("old", "new"):
        activate(tag)
        import fedalign_moe.training.alignment as al
        import fedalign_moe.training.local as lo
        meta[f"{tag}_code"] = {"local": lo.__file__, "aligner_has_statistics": hasattr(al.ClientAligner, "statistics"),
                               "has_observer": hasattr(al, "RoutingObserver")}
    gt.log("code " + json.dumps({k: meta[k] for k in ("old_code", "new_code")}))
    gt.log(f"built in {meta['build_s']:.1f}s; {len(names)} trainable tensors")
    built = {"old": (model_old, adapter_old), "new": (model_new, adapter_new)}
    gt.set_experts(model_new, "grouped_mm")

    batches = [int(b) for b in args.batches.split(",")]
    impls = args.impls.split(",")
    for rnd in range(args.rounds):
        order = ["old", "new"] if rnd % 2 == 0 else ["new", "old"]
        for B in batches:
            for impl in impls:
                for tag in order:
                    el = time.perf_counter() - T0
                    if el > args.budget_s:
                        gt.log(f"budget passed ({el:.0f}s): skip round {rnd + 1} {impl} B={B} {tag}")
                        res["errors"].append({"config": [rnd + 1, impl, B, tag], "skipped": "wall budget"})
                        continue
                    activate(tag)
                    model, adapter = built[tag]
                    try:
                        gt.set_trainable(model, names)
                        gc.collect()
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                            torch.cuda.reset_peak_memory_stats(device)
                        if impl == "ours-bare":
                            reps = gt.time_bare(model, adapter, names, B, args.seq, args, device)
                        else:
                            reps = gt.time_ours(model, adapter, names, B, args.seq, args, device,
                                                aligned=impl == "ours-fedalign")
                        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                        row = {"round": rnd + 1, "code": tag, "impl": impl, "batch": B, "seq": args.seq,
                               "secs": [s for s, _, _ in reps], "tokens": reps[0][1],
                               "tokens_per_s_reps": [tok / s for s, tok, _ in reps],
                               "step_ms_reps": [1e3 * s / args.steps for s, _, _ in reps], "peak_gib": peak,
                               "loss_last": reps[-1][2]}
                        res["rows"].append(row)
                        gt.log(f"r{rnd + 1} {tag} {impl:13} B={B:4}: "
                               + ", ".join(f"{x:,.0f}" for x in row["tokens_per_s_reps"]) + " tok/s, "
                               + ", ".join(f"{x:.1f}" for x in row["step_ms_reps"]) + " ms/step, peak "
                               + (f"{peak:.2f} GiB" if peak is not None else "-"))
                    except Exception as err:  # noqa: BLE001
                        tb = traceback.format_exc()
                        gt.log(f"FAILED r{rnd + 1} {tag} {impl} B={B}: {type(err).__name__}: {err}")
                        print(tb, flush=True)
                        res["errors"].append({"config": [rnd + 1, impl, B, tag], "error": tb[-3000:]})
                        for p in model.parameters():
                            p.grad = None
                    save()

    # summary: median over every repetition of every round, per (impl, batch, code)
    summary = []
    for impl in impls:
        for B in batches:
            s = {"impl": impl, "batch": B}
            for tag in ("old", "new"):
                rows = [r for r in res["rows"] if r["impl"] == impl and r["batch"] == B and r["code"] == tag]
                if rows:
                    s[tag] = {"tokens_per_s": statistics.median(x for r in rows for x in r["tokens_per_s_reps"]),
                              "step_ms": statistics.median(x for r in rows for x in r["step_ms_reps"]),
                              "peak_gib": max((r["peak_gib"] or 0) for r in rows), "n": sum(len(r["secs"]) for r in rows)}
            if "old" in s and "new" in s:
                s["ratio_new_old"] = s["new"]["tokens_per_s"] / s["old"]["tokens_per_s"]
            summary.append(s)
    res["summary"] = summary
    save()

    if args.profile_batch and time.perf_counter() - T0 < args.budget_s + 20:
        B = args.profile_batch
        for tag in ("old", "new"):
            activate(tag)
            model, adapter = built[tag]
            try:
                gt.set_trainable(model, names)
                pargs = SimpleNamespace(**{**vars(args), "warmup": 1, "steps": 4, "reps": 1})
                def ours(model=model, adapter=adapter, pargs=pargs):
                    return gt.time_ours(model, adapter, names, B, args.seq, pargs, device, False)
                prof = profile_host(ours, device)
                prof["note"] = f"ours-fedavg {tag} B={B}: 1 warm-up call of 1 step + 1 call of 4 steps, under the profiler"
                res["profiles"][f"{tag}/ours-fedavg/B{B}"] = prof
                gt.log(f"profile {tag} fedavg B={B}: wall {prof['wall_s']:.2f}s, device busy {prof['device_busy_s']:.2f}s, "
                       f"host self {prof['host_self_s']:.2f}s\n" + prof["host_table"])
            except Exception as err:  # noqa: BLE001
                gt.log(f"profile {tag} failed: {type(err).__name__}: {err}")
                res["errors"].append({"config": ["profile", tag], "error": f"{type(err).__name__}: {err}"[:2000]})
            save()

    print("\n| step | batch x seq | old tok/s | new tok/s | new/old | old ms | new ms | old GiB | new GiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for s in summary:
        if "old" in s and "new" in s:
            o, n = s["old"], s["new"]
            print(f"| {s['impl']} | {s['batch']} x {args.seq} | {o['tokens_per_s']:,.0f} | {n['tokens_per_s']:,.0f} | "
                  f"{s['ratio_new_old']:.3f} | {o['step_ms']:.1f} | {n['step_ms']:.1f} | "
                  f"{o['peak_gib'] or 0:.2f} | {n['peak_gib'] or 0:.2f} |")
    for e in res["errors"]:
        print("not measured:", e["config"], e.get("skipped") or e.get("error", "")[-300:])
    res["meta"]["wall_s"] = time.perf_counter() - T0
    save()
    gt.log(f"done: {len(res['rows'])} measurements, {len(res['errors'])} errors or skips")
    return 0


if __name__ == "__main__":
    sys.exit(main())
