"""Peak memory of a whole run (the CLI process and every process under it: Ray's, the workers) beside
the memory plan's estimate, and the run's training throughput.

Runs `fedalign-moe plan --json ARGS`, then `fedalign-moe run ARGS`, sampling every process of the run's
tree twice a second: its resident memory (RSS) and its proportional set size less file mappings (Pss - Pss_File:
anonymous memory, and shared memory such as Ray's object store divided among the processes that map it,
so the tree's sum counts each page once; a checkpoint's safetensors files stay memory-mapped after
loading and their clean pages count in RSS although the kernel can drop them).
Writes benchmarks/results/llm_memory/NAME.json: the plan, both peaks of the tree, each process's peaks,
the wall time, and tokens per second of local training (metrics.jsonl's train_tokens / train_seconds).

Usage: .venv/bin/python benchmarks/llm_memory.py NAME -- --preset tiny --set model.backbone=DIR ...
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from common import write_result

ROOT = Path(__file__).resolve().parents[1]
CLI = str(ROOT / ".venv" / "bin" / "fedalign-moe")


def held_bytes(proc: psutil.Process) -> tuple[int, int]:
    """(RSS, proportional memory less file mappings) of one process, in bytes; (0, 0) once it is gone. The
    second is Pss - Pss_File: anonymous memory, plus each shared page (Ray's object store) divided among
    the processes that map it, so that a sum over processes counts every page once."""
    try:
        text = Path(f"/proc/{proc.pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in text.splitlines()[1:] if ":" in line}
    return fields.get("Rss", 0), fields.get("Pss", 0) - fields.get("Pss_File", 0)


def tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return [root]


def main() -> None:
    if "--" not in sys.argv:
        sys.exit(__doc__)
    name, args = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    plan = subprocess.run([CLI, "plan", "--json", *args], capture_output=True, text=True)
    plan_json = json.loads(plan.stdout) if plan.stdout.strip().startswith("{") else None
    out = Path(tempfile.mkdtemp(prefix=f"llm-{name}-"))
    t0 = time.time()
    proc = subprocess.Popen([CLI, "run", *args, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    root = psutil.Process(proc.pid)
    peak_rss = peak_held = 0
    per_process: dict[int, dict] = {}
    while proc.poll() is None:
        rss_sum = held_sum = 0
        for p in tree(root):
            rss, held = held_bytes(p)
            rss_sum, held_sum = rss_sum + rss, held_sum + held
            try:
                label = " ".join(p.cmdline())[:80]
            except psutil.Error:
                label = "?"
            entry = per_process.setdefault(p.pid, {"command": label, "peak_rss": 0, "peak_held": 0})
            entry["peak_rss"], entry["peak_held"] = max(entry["peak_rss"], rss), max(entry["peak_held"], held)
        peak_rss, peak_held = max(peak_rss, rss_sum), max(peak_held, held_sum)
        time.sleep(0.5)
    output = proc.stdout.read()
    wall = time.time() - t0
    metrics = out / "metrics.jsonl"
    rounds = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    clients = [c for r in rounds for c in r.get("clients", [])]
    tokens, seconds = sum(c["train_tokens"] for c in clients), sum(c["train_seconds"] for c in clients)
    result = {
        "name": name, "args": args, "returncode": proc.returncode, "wall_seconds": round(wall, 1),
        "plan": plan_json, "peak_tree_rss_bytes": peak_rss, "peak_tree_held_bytes": peak_held,
        "plan_total_bytes": plan_json and plan_json["total_bytes"],
        "held_over_plan": plan_json and round(peak_held / plan_json["total_bytes"], 3),
        "train_tokens": tokens, "train_seconds": round(seconds, 1),
        "train_tokens_per_second": round(tokens / seconds, 1) if seconds else None,
        "rounds": [{k: r.get(k) for k in ("round", "accuracy", "loss", "replied", "failures", "seconds")} for r in rounds],
        "processes": sorted(per_process.values(), key=lambda e: -e["peak_held"])[:8],
        "output_tail": output.splitlines()[-12:], "out": str(out),
    }
    dest = ROOT / "benchmarks" / "results" / "llm_memory"
    dest.mkdir(parents=True, exist_ok=True)
    write_result(dest / f"{name}.json", result)
    print(f"{name}: exit {proc.returncode} in {wall:.0f} s; peak of the process tree {peak_held / 1e9:.2f} GB held "
          f"({peak_rss / 1e9:.2f} GB RSS); plan {plan_json and plan_json['total_bytes'] / 1e9:.2f} GB; "
          f"{result['train_tokens_per_second']} training tokens/s")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
