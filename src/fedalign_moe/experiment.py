"""Run one configured experiment, whatever its strategy, and a grid of them.

Federated strategies run on Flower's simulation engine; ``local`` and ``centralised`` need no
federation and run directly on the same data splits and model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from .config import Config
from .federation import checkpoint
from .federation.checkpoint import Checkpoint
from .files import write_atomic
from .models.build import supports_meta
from .records import RoundRecord
from .registry import FEDERATED, spec
from .report.evidence import collect_summaries, write_comparison
from .report.plots import draw_run
from .report.tables import group_cells
from .runlog import dumps, read_summary
from .training.plan import Plan, check_fits, plan_model
from .training.setup import open_log, open_workspace, prepare_data

logger = logging.getLogger(__name__)


def run_experiment(cfg: Config, on_round: Callable[[RoundRecord], None] | None = None, resume: Checkpoint | None = None,
                   verbose: bool = False, on_reply: Callable[[int, int, int], None] | None = None,
                   on_plan: Callable[[Plan], None] | None = None) -> dict:
    """Run ``cfg`` (a federated one from ``resume``, its checkpoint, when given); write metrics, summary
    and plots under ``cfg.out_dir``; return the summary. Flower's own log goes to ``run.log`` there
    (``verbose``: to the terminal too). The memory plan comes first (``on_plan`` sees it); a run that
    cannot fit stops with ``ConfigError`` before any work."""
    strategy = cfg.federation.strategy
    if strategy in FEDERATED:
        from .federation.server_app import simulate

        if resume is not None and (caveat := resume_caveat(cfg, resume.round)):
            logger.warning(caveat)
        summary = simulate(cfg, on_round, resume, verbose=verbose, on_reply=on_reply, on_plan=on_plan)
    else:
        data = prepare_data(cfg)
        plan = check_fits(cfg, plan_model(cfg, data)) if supports_meta(cfg.model) else None
        ws = open_workspace(cfg, data=data)
        plan = plan or check_fits(cfg, ws.built)
        if on_plan is not None:
            on_plan(plan)
        from .federation.strategies import load_factory  # Flower is imported only where it is needed

        summary = load_factory(spec(strategy))(ws, open_log(ws), on_round)
    draw_run(cfg.out_dir)
    return summary


def resume_caveat(cfg: Config, last_round: int) -> str | None:
    """What a resumed run of ``cfg`` cannot give back exactly, in one line (None: it continues as if never
    stopped). Personalised experts: each client's kept experts live in its Flower node state, which does not
    survive the restart; the server's record of who keeps what is not checkpointed either."""
    if cfg.keeps_personal_experts():
        return (f"personalised experts: the clients' kept experts did not survive the interruption; round "
                f"{last_round + 1} trains every client from the global experts, so from there on this run "
                f"differs from an uninterrupted one")
    return None


def grid_configs(base: Config, strategies: list[str], alphas: list[float], seeds: list[int], out: Path) -> list[Config]:
    """One config per (strategy, alpha, seed), each writing to its own sub-directory of ``out``."""
    configs = []
    for alpha in alphas:
        for strategy in strategies:
            for seed in seeds:
                raw = base.model_dump()
                raw["seed"] = seed
                raw["partition"]["alpha"] = alpha
                raw["federation"]["strategy"] = strategy
                raw["out_dir"] = str(out / f"{strategy}-alpha{alpha:g}-seed{seed}")
                configs.append(Config.model_validate(raw))
    return configs


def _same_result(summary: dict, cfg: Config) -> bool:
    """A finished run counts if its config differs at most in where files went (the folder may have moved)."""
    if summary.get("stopped_early"):
        return False  # an interrupted run is run again
    if summary.get("strategy_revision", 1) != spec(cfg.federation.strategy).revision:
        return False  # measured by an older version of the strategy
    try:
        return Config.from_json(summary["config_json"]).result_key() == cfg.result_key()
    except (KeyError, ValueError):
        return False


def resumable(cfg: Config) -> Checkpoint | None:
    """The checkpoint of an interrupted federated run of exactly ``cfg`` in its folder, if any."""
    if cfg.federation.strategy not in FEDERATED:
        return None
    try:
        ckpt = checkpoint.load(Path(cfg.out_dir))
        same = ckpt.belongs_to(cfg)
    except (checkpoint.CheckpointError, ValueError):
        return None
    return ckpt if same and ckpt.round < cfg.federation.rounds else None


def check_fits_folder(configs: list[Config], out: Path) -> None:
    """Raise ``MixedCellError`` before anything runs when ``configs`` would share a table cell of ``out`` with
    a finished run of another setup (say, FedAlign-MoE with the other expert weighting), which would stop the
    tables only after every run had finished."""
    planned = {Path(c.out_dir).resolve() for c in configs}
    kept = [s for s in collect_summaries(out) if Path(s["run_dir"]).resolve() not in planned]
    group_cells(kept + [{"alpha": c.partition.alpha, "strategy": c.federation.strategy, "config_json": c.to_json(),
                         "strategy_revision": spec(c.federation.strategy).revision} for c in configs])


def run_comparison(configs: list[Config], out: Path, on_run: Callable[[Config], None] | None = None,
                   on_round: Callable[[RoundRecord], None] | None = None, verbose: bool = False) -> list[dict]:
    """Run every config (skipping finished ones, resuming interrupted ones), then write results.json,
    results.md, the plots and evidence.md over every finished run in ``out``; return this call's summaries."""
    out.mkdir(parents=True, exist_ok=True)
    check_fits_folder(configs, out)
    summaries = []
    for cfg in configs:
        done = Path(cfg.out_dir) / "summary.json"
        if on_run:
            on_run(cfg)
        summary = read_summary(done)
        if summary is None or not _same_result(summary, cfg):  # else finished before an interruption: kept
            summary = run_experiment(cfg, on_round, resumable(cfg), verbose)
            summary["config_json"] = cfg.to_json()
            write_atomic(done, dumps(summary, indent=2))
        summaries.append(dict(summary, run_dir=cfg.out_dir))  # a kept summary names the folder it ran in
    write_comparison(out)  # over every finished run in the folder, those of earlier calls too
    return summaries


def measure_premise(base: Config, recipes: list[str], seed: int, out: Path, on_run: Callable[[Config], None] | None = None,
                    on_round: Callable[[RoundRecord], None] | None = None, verbose: bool = False) -> Path:
    """The premise figures for each model recipe on ``base``: FedAvg and centralised at alpha 0.1 (runs in
    ``out/premise/<recipe>``, finished ones kept), the built model's expert-label information on the global
    test split; writes ``out/premise.json`` and ``out/premise_routing.png``."""
    import numpy as np

    from .report.premise import is_recipe_figures, recipe_figures, write_premise
    from .training.local import routing_by_label

    previous = read_summary(out / "premise.json") or {}  # a JSON object or nothing: recipes measured before stay
    premise = {k: v for k, v in previous.items() if k not in recipes and is_recipe_figures(v)}
    for recipe in recipes:
        raw = base.model_dump()
        raw["model"]["recipe"] = recipe
        cfg = Config.model_validate(raw)
        runs = run_comparison(grid_configs(cfg, ["fedavg", "centralised"], [0.1], [seed], out / "premise" / recipe),
                              out / "premise" / recipe, on_run, on_round, verbose)
        by_strategy = {s["strategy"]: s for s in runs}
        ws = open_workspace(cfg.model_copy(update={"seed": seed}))
        counts_LKE = routing_by_label(ws.built.model, ws.built.adapter, ws.global_test(),
                                      len(ws.data.source.label_names), cfg.train.eval_batch_size, ws.device).numpy()
        fedavg_dir = out / "premise" / recipe / f"fedavg-alpha0.1-seed{seed}"
        premise[recipe] = recipe_figures(np.asarray(counts_LKE), ws.data.source.label_names, by_strategy.get("fedavg"),
                                         by_strategy.get("centralised"), fedavg_dir, ws.built.build_seconds)
        del ws
        path = write_premise(premise, out)  # after each recipe: an interrupted call keeps what it measured
    return path
