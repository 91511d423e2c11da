"""How far honest clients' claims spread: the figures the example-count bounds and the router-share bound
were set from (issue 33, docs/robustness.md "What a claim can buy").

1. Example counts over every round of every run in benchmarks/results (rounds of 4 or more replies for
   the share): the largest count / its round's median, and the largest share of a round.
2. The partitions of `specialised` at alpha 0.1 and 0.01, seeds 0-5 (the partitions alone, no training).
3. FedAlign-MoE's router weights against data: in every stored run, the largest omega_i(e) over client
   i's example share, and over its routed-token share p_i(e) T_i / sum_j p_j(e) T_j.
4. Update norms for the work done, the figure `federation.clip_update_norm_ratio` is set from: over every
   round of every stored honest run that records each client's update norm, the largest
   ||w_i - w_g|| / sqrt(steps_i) over its round's median (per step too, beside it), and the seed's largest
   client's mean; runs with `fedalign.personal_experts` apart (a node's own experts are far from the
   global ones by design, so the clip is refused with them).
5. Where `fedalign.router_share_factor` is set (honest runs): how often it binds, the share of router
   columns (round, layer, expert) in which some client sits at its cap, and of client entries at the cap.

Usage: .venv/bin/python benchmarks/honest_spread.py [--results benchmarks/results]
Writes benchmarks/results/honest_spread.json and prints the same.
"""

import argparse
import json
import statistics
from pathlib import Path

from common import write_result
from fedalign_moe.config import load_config
from fedalign_moe.data.sources import DataError
from fedalign_moe.federation.protocol import LocalWork
from fedalign_moe.runlog import read_jsonl
from fedalign_moe.training.setup import prepare_data


def honest_runs(results: Path):
    """(run folder, its config as stored) of every finished run under ``results`` with no hostile client."""
    for run in sorted(p.parent for p in results.rglob("summary.json")):
        config = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
        if config.get("attack", {}).get("kind", "none") == "none":
            yield run, config


def count_spread(results: Path) -> dict:
    ratio, share = (0.0, ""), (0.0, "")
    for run, _ in honest_runs(results):
        for r in read_jsonl(run / "metrics.jsonl"):
            n = [c["num_examples"] for c in r.get("clients", [])]
            if n and max(n) / statistics.median(n) > ratio[0]:
                ratio = (max(n) / statistics.median(n), f"{run.relative_to(results)} round {r['round']}")
            if len(n) >= 4 and max(n) / sum(n) > share[0]:
                share = (max(n) / sum(n), f"{run.relative_to(results)} round {r['round']}")
    return {"max_over_median": ratio[0], "where_ratio": ratio[1], "max_share": share[0], "where_share": share[1]}


def partition_spread(alpha: float, seeds: range) -> list[dict]:
    rows = []
    for seed in seeds:
        cfg = load_config("specialised", overrides={"seed": seed, "partition": {"alpha": alpha}})
        try:
            n = [len(part) for part in prepare_data(cfg).client_train]
        except DataError as err:
            rows.append({"seed": seed, "error": str(err)[:160]})
            continue
        rows.append({"seed": seed, "sizes": n, "max_over_median": max(n) / statistics.median(n), "max_share": max(n) / sum(n)})
    return rows


def router_weights(results: Path) -> list[dict]:
    rows = []
    for run in sorted(p.parent for p in results.rglob("summary.json")):
        if not run.name.startswith("fedalign-alpha") or not any(run.glob("diagnostics.jsonl*")):
            continue
        rounds = {r["round"]: r for r in read_jsonl(run / "metrics.jsonl") if "clients" in r}
        routing = {r["round"]: r["clients"] for r in read_jsonl(run / "routing.jsonl")}
        by_data, by_tokens = 0.0, 0.0
        for d in read_jsonl(run / "diagnostics.jsonl"):
            if "omega" not in d or d["round"] not in rounds or d["round"] not in routing:
                continue
            rows_c = {c["partition_id"]: c for c in rounds[d["round"]]["clients"]}
            ids = d["clients"]
            total = sum(rows_c[i]["num_examples"] for i in ids)
            for l, omega_CE in enumerate(d["omega"]):
                for e in range(len(omega_CE[0])):
                    soft = [routing[d["round"]][str(i)][l][e] * (rows_c[i].get("train_tokens") or rows_c[i]["num_examples"]) for i in ids]
                    for c, i in enumerate(ids):
                        by_data = max(by_data, omega_CE[c][e] / (rows_c[i]["num_examples"] / total))
                        by_tokens = max(by_tokens, omega_CE[c][e] / max(soft[c] / sum(soft), 1e-9))
        rows.append({"run": str(run.relative_to(results)), "max_omega_over_data_share": by_data,
                     "max_omega_over_token_share": by_tokens})
    return rows


def pace_spread(results: Path) -> dict:
    found = {"runs": 0, "rounds": 0, "max_sqrt_step": (0.0, ""), "max_per_step": (0.0, ""), "largest_client_sqrt_step": [],
             "personal_experts_max_sqrt_step": 0.0}
    for run, config in honest_runs(results):
        if "train" not in config:
            continue
        t = config["train"]
        work = LocalWork(t["batch_size"], 0, t.get("local_epochs", 1), t.get("local_steps"))
        personal = config.get("fedalign", {}).get("personal_experts", False) and "fedalign" in config["federation"]["strategy"]
        rounds = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("clients")]
        rounds = [r for r in rounds if all("update_norm" in c for c in r["clients"]) and len(r["clients"]) >= 3]
        found["runs"] += bool(rounds)
        for r in rounds:
            steps = {c["partition_id"]: work.steps(c["num_examples"]) for c in r["clients"]}
            sqrt = {c["partition_id"]: c["update_norm"] / steps[c["partition_id"]] ** 0.5 for c in r["clients"]}
            ratio = max(sqrt.values()) / statistics.median(sqrt.values())
            if personal:
                found["personal_experts_max_sqrt_step"] = max(found["personal_experts_max_sqrt_step"], ratio)
                continue
            found["rounds"] += 1
            where = f"{run.relative_to(results)} round {r['round']}"
            per = [c["update_norm"] / steps[c["partition_id"]] for c in r["clients"]]
            found["max_sqrt_step"] = max(found["max_sqrt_step"], (ratio, where))
            found["max_per_step"] = max(found["max_per_step"], (max(per) / statistics.median(per), where))
            largest = max(r["clients"], key=lambda c: c["num_examples"])["partition_id"]
            found["largest_client_sqrt_step"].append(sqrt[largest] / statistics.median(sqrt.values()))
    biggest = found.pop("largest_client_sqrt_step")
    found["largest_client_sqrt_step_mean"] = statistics.mean(biggest) if biggest else None
    for key in ("max_sqrt_step", "max_per_step"):
        found[key], found[key.replace("max", "where")] = found[key]
    return found


def share_bound_binds(results: Path) -> list[dict]:
    rows = []
    for run, config in honest_runs(results):
        factor = config.get("fedalign", {}).get("router_share_factor")
        if factor is None:
            continue
        examples = {r["round"]: {c["partition_id"]: c["num_examples"] for c in r["clients"]}
                    for r in read_jsonl(run / "metrics.jsonl") if r.get("clients")}
        columns = capped_columns = entries = capped_entries = 0
        for d in read_jsonl(run / "diagnostics.jsonl"):
            if "omega" not in d or d["round"] not in examples:
                continue
            n = examples[d["round"]]
            total = sum(n[i] for i in d["clients"])
            for omega_CE in d["omega"]:
                for e in range(len(omega_CE[0])):
                    at_cap = [abs(omega_CE[c][e] - factor * n[i] / total) < 1e-4 for c, i in enumerate(d["clients"])]
                    columns, capped_columns = columns + 1, capped_columns + any(at_cap)
                    entries, capped_entries = entries + len(at_cap), capped_entries + sum(at_cap)
        if columns:
            rows.append({"run": str(run.relative_to(results)), "factor": factor, "columns_with_a_capped_client": capped_columns / columns,
                         "client_entries_capped": capped_entries / entries})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    out = {"example_counts_in_stored_runs": count_spread(args.results),
           "specialised_partitions": {str(a): partition_spread(a, range(6)) for a in (0.1, 0.01)},
           "fedalign_router_weights": router_weights(args.results),
           "update_norm_for_the_work": pace_spread(args.results),
           "router_share_bound_binds": share_bound_binds(args.results)}
    print(write_result(args.results / "honest_spread.json", out).read_text(), end="")


if __name__ == "__main__":
    main()
