"""Memory of a large simulated federation over rounds (issue 13): the driver and the client processes.

Runs `fedalign-moe run` on a preset with N clients of which 10 are sampled a round, and samples every
second the resident memory of the driver (the CLI process: server, strategy, Ray's driver) and of each
client process Ray starts for it (ray::ClientAppActor, told apart from other runs' by arriving after the
start). Writes each client count's peaks and the per-round driver memory (the sample closest to the end
of each round, from metrics.jsonl) to benchmarks/results/scale_memory/<host>.json.

Usage: .venv/bin/python benchmarks/scale_memory.py [--preset tiny] [--clients 100,1000] [--rounds 6] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_result

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def actor_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "ray::ClientAppActor"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def measure(preset: str, clients: int, rounds: int, sets: list[str]) -> dict:
    before = actor_pids()
    out = Path(tempfile.mkdtemp(prefix=f"scale{clients}-"))
    cmd = [str(ROOT / ".venv" / "bin" / "fedalign-moe"), "run", "--preset", preset, "--num-clients", str(clients),
           "--rounds", str(rounds), "--set", f"federation.fraction_train={10 / clients}", "--out", str(out)]
    for item in sets:
        cmd += ["--set", item]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = []  # (seconds, driver MB, {actor pid: MB})
    while proc.poll() is None:
        actors = {pid: rss_mb(pid) for pid in actor_pids() - before}
        samples.append((time.time() - t0, rss_mb(proc.pid), {p: m for p, m in actors.items() if m}))
        time.sleep(1.0)
    wall = time.time() - t0
    ends, elapsed = [], 0.0
    metrics = out / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    first_round_start = wall - sum(r["seconds"] for r in records)
    for r in records:
        elapsed += r["seconds"]
        t = first_round_start + elapsed
        driver = [s[1] for s in samples if s[1] and s[0] <= t]
        ends.append(round(driver[-1], 1) if driver else None)
    actor_peak = max((m for s in samples for m in s[2].values()), default=None)
    return {"clients": clients, "rounds": rounds, "returncode": proc.returncode, "wall_s": round(wall, 1),
            "driver_peak_mb": round(max((s[1] for s in samples if s[1]), default=0), 1),
            "driver_mb_at_round_end": ends, "client_process_peak_mb": actor_peak and round(actor_peak, 1),
            "client_processes": len({p for s in samples for p in s[2]}), "out": str(out)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--clients", default="100,1000")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--set", dest="sets", action="append", default=None,
                    help="config overrides (default: data.max_train=null, so that 1,000 clients have data)")
    args = ap.parse_args()
    sets = args.sets if args.sets is not None else ["data.max_train=null"]
    results = [measure(args.preset, int(c), args.rounds, sets) for c in args.clients.split(",")]
    for r in results:
        print(f"{r['clients']} clients, {r['rounds']} rounds: exit {r['returncode']}, {r['wall_s']} s; driver peak "
              f"{r['driver_peak_mb']} MB, at each round's end {r['driver_mb_at_round_end']}; "
              f"{r['client_processes']} client processes, peak {r['client_process_peak_mb']} MB each")
    dest = ROOT / "benchmarks" / "results" / "scale_memory"
    dest.mkdir(parents=True, exist_ok=True)
    write_result(dest / f"{platform.node() or 'host'}.json", {"preset": args.preset, "runs": results})
    sys.exit(0 if all(r["returncode"] == 0 for r in results) else 1)


if __name__ == "__main__":
    main()
