"""Issue 36's merge rules on `specialised`'s validation split: accuracy and what each rule did to the aligned
sets and the global routing, per run (seed), beside the runs they are compared with.

For each setup folder of benchmarks/results/tuning-specialised and each seed it holds: final and last-5
global accuracy, the mean share of clients merged per (round, layer, expert) (mean |A(e)|/N; for soft
selection, clients with a positive weight), the share of (round, layer, expert) merging half the clients or
fewer, the largest global routing probability p_g over the run, and what the filter reads: over every pair
of clients that both routed to e, the mean pairwise consistency gamma and the share of pairs at gamma <= 0
(their update directions do not agree: cos(Delta_i, Delta_j) <= 0; for updates of independent direction
that share is one half), and what a null-calibrated floor would keep: the share of (round, layer, expert,
routing client) entries whose consistency c_i (mean gamma with the other routing clients) is <= 0, no better
than independent directions give, and that share among the entries the run's rule left out. Writes
benchmarks/results/tuning-specialised/merge_rules.json and prints a markdown table.
Usage: .venv/bin/python benchmarks/merge_rules.py SETUP [SETUP ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common import write_result
from fedalign_moe.runlog import read_jsonl

ROOT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "tuning-specialised"


def facts(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    shares, small, routed, dropped, gammas, disagree, p_max = [], [], [], [], [], [], 0.0
    null_c, null_c_left_out = [], []  # per routing client entry: c_i <= 0; the same over the entries left out
    for r in read_jsonl(run / "diagnostics.jsonl"):
        C, sizes = len(r["clients"]), [len(s) for layer in r["aligned"] for s in layer]
        shares.append(sum(sizes) / len(sizes) / C)
        small.append(sum(s <= C / 2 for s in sizes) / len(sizes))
        for aligned_E, routed_E in zip(r["aligned"], r["routed"]):  # who routed a token to e, and who of them A(e) left out
            for a, ro in zip(aligned_E, routed_E):
                routed.append(len(ro) / C)
                dropped.append(len(set(ro) - set(a)) / C)
        p_max = max(p_max, max(max(row) for row in r["p_g"]))
        for key, gamma_CC in (r.get("gamma") or {}).items():  # "layer{l}-expert{e}": [C, C] over r["clients"]
            layer, expert = (int(x) for x in key.removeprefix("layer").split("-expert"))
            where = [r["clients"].index(i) for i in r["routed"][layer][expert]]
            pairs = [gamma_CC[a][b] for a in where for b in where if a != b]
            if pairs:
                gammas.append(sum(pairs) / len(pairs))
                disagree.append(sum(g <= 1e-9 for g in pairs) / len(pairs))
                aligned = {r["clients"].index(i) for i in r["aligned"][layer][expert]}
                for a in where:
                    below = sum(gamma_CC[a][b] for b in where if b != a) / (len(where) - 1) <= 1e-9
                    null_c.append(below)
                    if a not in aligned:
                        null_c_left_out.append(below)
    return {"seed": summary["seed"], "final": summary["final_accuracy"], "last5": summary["last5_accuracy"],
            "aligned_share": sum(shares) / len(shares), "half_or_fewer": sum(small) / len(small),
            "routed_share": sum(routed) / len(routed), "left_out_share": sum(dropped) / len(dropped), "largest_p_g": p_max,
            "mean_gamma": sum(gammas) / len(gammas) if gammas else None,
            "pairs_not_agreeing": sum(disagree) / len(disagree) if disagree else None,
            "routing_c_at_or_below_null": sum(null_c) / len(null_c) if null_c else None,
            "left_out": len(null_c_left_out),
            "left_out_c_at_or_below_null": sum(null_c_left_out) / len(null_c_left_out) if null_c_left_out else None}


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main() -> None:
    rows = {}
    print("| setup | seed | global, final | global, last 5 | mean \\|A(e)\\|/N | half or fewer merged | routed to e / N | "
          "routed but left out / N | largest p_g | mean gamma, routing pairs | pairs with gamma <= 0 | "
          "routing clients with c_i <= 0 | left out (entries) | of them c_i <= 0 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for setup in sys.argv[1:]:
        for run in sorted((ROOT / setup).glob("*-alpha0.1-seed*")):
            if (run / "summary.json").is_file():
                f = facts(run)
                rows.setdefault(setup, []).append(f)
                print(f"| {setup} | {f['seed']} | {f['final']:.3f} | {f['last5']:.3f} | {f['aligned_share']:.3f} | "
                      f"{f['half_or_fewer']:.3f} | {f['routed_share']:.3f} | {f['left_out_share']:.3f} | {f['largest_p_g']:.3f} | "
                      f"{_num(f['mean_gamma'])} | {_num(f['pairs_not_agreeing'])} | "
                      f"{_num(f['routing_c_at_or_below_null'])} | {f['left_out']} | {_num(f['left_out_c_at_or_below_null'])} |")
    write_result(ROOT / "merge_rules.json", rows)


if __name__ == "__main__":
    main()
