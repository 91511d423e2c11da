"""Command-line interface: ``fedalign-moe run | compare | report | presets``.

Bad input ends with one ``error:`` line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from .config import (
    Config,
    ConfigError,
    UserError,
    load_config,
    parse_overrides,
    preset_names,
)
from .records import RoundRecord
from .registry import FEDERATED, STRATEGIES

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Federated fine-tuning of MoE language models (FedAlign-MoE).")
console = Console(stderr=False, highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False)


def _check_out_dir(path: Path) -> None:
    """The output folder exists or can be made, and is writable: otherwise one error line now, not later."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} is an existing file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"cannot write to the output folder {path}: {err.strerror or err}") from None


def _fail(message: str, code: int = 2) -> None:
    """One ``error:`` line; exit 2 for bad input, 1 for a run that did not complete."""
    err_console.print(f"error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def _format_bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _print_round(record: RoundRecord) -> None:
    local, ex = record.local_accuracy, record.exchange
    replies = f"  replies {ex.replied}/{ex.sent}" if ex is not None else ""
    line = (f"round {record.round:>3}  acc {_num(record.accuracy)}  loss {_num(record.loss)}"
            + (f"  clients' own-test acc {local:.4f}" if local is not None else "")
            + replies
            + f"  up {_format_bytes(record.uplink_bytes)}  down {_format_bytes(record.downlink_bytes)}"
            + f"  {record.seconds:.1f}s")
    console.print(line, markup=False)
    if record.failures:
        reasons_given = ex.failure_reasons if ex is not None else ()
        reasons = "; ".join((f"partition {f['partition_id']} (node {f['node_id']})" if f["partition_id"] is not None
                             else f"node {f['node_id']}") + f": {f['reason']}" for f in reasons_given[:3])
        more = record.failures - min(3, len(reasons_given))
        console.print(f"          dropped {record.failures}: {reasons}" + (f"; {more} more" if more > 0 else ""),
                      markup=False, style="yellow")
    if not record.adopted:
        console.print(f"          kept the previous global model: {ex.not_adopted_reason}", markup=False, style="yellow")
    clients = record.clients or ()
    if clients and console.is_terminal:  # a pipe or a file gets one line a round
        losses = "  ".join(f"c{c.partition_id}:{c.train_loss:.3f}" for c in clients)
        console.print(f"          train loss per client  {losses}", markup=False, style="dim")


class _Display:
    """On a terminal, a live bar over the rounds (or a comparison's runs) with elapsed time, ETA and a
    status (the round's replies as they arrive, the latest accuracy), the round lines printing above
    it; elsewhere (a pipe, a file, CI) the lines alone, without control characters."""

    def __init__(self, total: int, done: int = 0, unit: str = "rounds"):
        self.progress = Progress(TextColumn(f"[bold]{unit}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                                 console=console, transient=True, disable=not console.is_terminal,
                                 refresh_per_second=2)  # the clients share the cores: redraw sparingly
        self.task = self.progress.add_task(unit, total=total, completed=done, status="")

    def __enter__(self) -> _Display:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def reply(self, server_round: int, replies: int, sent: int) -> None:
        self.progress.update(self.task, status=f"round {server_round}: {replies}/{sent} replies")

    def round(self, record: RoundRecord) -> None:
        _print_round(record)
        failed = f", {record.failures} failed" if record.failures else ""
        self.progress.update(self.task, advance=1, status=f"acc {_num(record.accuracy)} loss {_num(record.loss)}{failed}")

    def status(self, text: str, advance: int = 0) -> None:
        self.progress.update(self.task, advance=advance, status=text)


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _overrides(strategy, alpha, num_clients, rounds, seed, out, sets) -> dict:
    over = parse_overrides(sets or [])
    for section, key, value in (("federation", "strategy", strategy), ("partition", "alpha", alpha),
                                ("partition", "num_clients", num_clients), ("federation", "rounds", rounds)):
        if value is not None:
            over.setdefault(section, {})[key] = value
    if seed is not None:
        over["seed"] = seed
    if out is not None:
        over["out_dir"] = str(out)
    return over


def _with_checkpoint(cfg: Config) -> Config:
    """A checkpoint backbone decides the expert count and top-k (``models.build.agree_with_checkpoint``)."""
    if not cfg.model.is_checkpoint:
        return cfg  # no torch import for the built-in backbones: an error line stays instant
    from .models.build import agree_with_checkpoint

    return agree_with_checkpoint(cfg)


PresetOpt = Annotated[str, typer.Option("--preset", "-p", help="preset name (see `fedalign-moe presets`)")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML or JSON file merged over the preset")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override any field: section.key=value")]
VerboseOpt = Annotated[bool, typer.Option(
    help="show Flower's and the client processes' own output as it comes (otherwise in DIR/run.log)")]
StrategyOpt = Annotated[str | None, typer.Option(help=f"one of {', '.join(STRATEGIES)}")]
AlphaOpt = Annotated[float | None, typer.Option(help="Dirichlet concentration (smaller = more non-IID)")]
ClientsOpt = Annotated[int | None, typer.Option(help="number of clients")]
RoundsOpt = Annotated[int | None, typer.Option(help="federated rounds")]
SeedOpt = Annotated[int | None, typer.Option(help="random seed")]


@app.command()
def run(
    preset: PresetOpt = "quick",
    config: ConfigOpt = None,
    strategy: StrategyOpt = None,
    alpha: AlphaOpt = None,
    num_clients: ClientsOpt = None,
    rounds: RoundsOpt = None,
    seed: SeedOpt = None,
    out: Annotated[Path | None, typer.Option(help="output directory")] = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run one experiment: writes metrics.jsonl, summary.json and plots to the output directory."""
    try:
        cfg = _with_checkpoint(load_config(preset, config, _overrides(strategy, alpha, num_clients, rounds, seed, out, set_)))
        _check_out_dir(Path(cfg.out_dir))
        console.print(f"[bold]{cfg.federation.strategy}[/bold] on {cfg.data.source} with {cfg.model.backbone} "
                      f"({cfg.model.num_experts} experts, top-{cfg.model.top_k}), {cfg.partition.num_clients} clients, "
                      f"{cfg.partition.scheme} alpha={cfg.partition.alpha:g}, {cfg.federation.rounds} rounds -> {cfg.out_dir}")
        from .experiment import run_experiment

        with _Display(cfg.federation.rounds) as display:
            summary = run_experiment(cfg, display.round, verbose=verbose, on_reply=display.reply, on_plan=_print_plan)
    except UserError as err:
        _fail(str(err))
    _finish(summary, cfg)


def _print_plan(plan) -> None:
    console.print(plan.summary_line(), markup=False, style="dim")


@app.command()
def plan(
    preset: PresetOpt = "quick",
    config: ConfigOpt = None,
    strategy: StrategyOpt = None,
    alpha: AlphaOpt = None,
    num_clients: ClientsOpt = None,
    rounds: RoundsOpt = None,
    seed: SeedOpt = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
    free_gb: Annotated[float | None, typer.Option(help="plan for devices with this much free memory (GB each) instead "
                                                       "of this machine's: e.g. --set model.device=cuda --free-gb 79 "
                                                       "for one H100")] = None,
    devices: Annotated[int, typer.Option(min=1, help="with --free-gb: how many such devices")] = 1,
) -> None:
    """What a run would hold, before anything heavy is loaded: parameters, bytes per reply, and per worker
    the memory of the base, the trainable state, the activations and their sum (peak_bytes); how many
    workers fit and whether the run fits. Takes the options of `run`; exit 1 when it does not fit."""
    try:
        cfg = _with_checkpoint(load_config(preset, config, _overrides(strategy, alpha, num_clients, rounds, seed, None, set_)))
        from .training.plan import ModelFacts, estimate_compute, make_plan, plan_model, what_would_fit
        from .training.setup import prepare_data

        available = None if free_gb is None else (int(free_gb * 1e9), devices)
        if available is None and cfg.model.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("model.device = 'cuda' but this machine has no CUDA device: plan for one with "
                                  "--free-gb (e.g. 79 for an H100)")
        data = prepare_data(cfg)
        built = plan_model(cfg, data)
        the_plan = make_plan(cfg, built, available)
        compute = estimate_compute(cfg, ModelFacts.of(built), data)
        advice = None if the_plan.fits else what_would_fit(cfg, built, available)
    except UserError as err:
        _fail(str(err))
    if as_json:
        fast, slow = compute.gpu_hours()
        console.print_json(json.dumps({**json.loads(the_plan.to_json()), "train_tokens_at_most": compute.train_tokens,
                                       "eval_tokens_at_most": compute.eval_tokens, "flops_at_most": compute.flops,
                                       "h100_hours_at_most": [round(fast, 2), round(slow, 2)]}))
    else:
        _plan_table(the_plan, compute)
    if not the_plan.fits:
        from .training.plan import refusal

        _fail(refusal(the_plan, advice), code=1)


def _plan_table(p, compute) -> None:
    f, w = p.facts, p.worker
    table = Table(title=p.summary_line().split(";")[0], title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    rows = [("parameters (total / active per token / trainable)",
             f"{f.parameters / 1e9:.3f}B / {f.active_parameters / 1e9:.3f}B / {f.trainable_parameters / 1e6:.2f}M"),
            ("bytes per reply (down / up)", f"{p.reply_bytes_down / 1e6:.1f} MB / {p.reply_bytes_up / 1e6:.1f} MB"),
            ("worker: frozen base", gb(w.base_bytes)),
            ("worker: trainable state (params, grads, AdamW, copies)", gb(w.trainable_bytes)),
            ("worker: activations (batch x length)", gb(w.activation_bytes)),
            ("worker: runtime (Python, torch, data)", gb(w.runtime_bytes)),
            ("worker: peak_bytes", gb(w.peak_bytes)),
            ("server process" + ("" if p.global_eval == "node" else " (holds a base: evaluates the global model)"),
             gb(p.server_bytes)),
            ("simulation engine (Ray)", gb(p.engine_bytes)),
            ("workers" + (" (federation.workers)" if p.workers_fixed else " (from cores and memory)"), str(p.workers)),
            (f"needed / free on {p.device}", f"{gb(p.total_bytes)} / {gb(p.available_bytes)}"),
            ("fits", "yes" if p.fits else "no"),
            ("run: tokens trained / evaluated (at most)", f"{compute.train_tokens / 1e6:,.1f}M / {compute.eval_tokens / 1e6:,.1f}M"),
            ("run: arithmetic (at most)", f"{compute.flops / 1e15:,.1f} PFLOP"),
            ("run: hours on one H100 (at 400 / 83 TFLOP/s)", "{:.2f} / {:.2f}".format(*compute.gpu_hours()))]
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _finish(summary: dict, cfg: Config) -> None:
    if console.is_terminal:
        table = Table(title=f"{summary['strategy']}, alpha={summary['alpha']:g}, seed={summary['seed']}", title_justify="left")
        for column in ("final acc", "best", "last-5", "clients' own-test", "failures", "up MB/round", "wall"):
            table.add_column(column, justify="right")
        rounds = max(len(summary["accuracy_per_round"]), 1)
        table.add_row(_num(summary["final_accuracy"]), _num(summary["best_accuracy"]), _num(summary["last5_accuracy"]),
                      _num(summary.get("final_local_accuracy")), str(summary.get("failures_total", 0)),
                      f"{summary['uplink_bytes_total'] / 1e6 / rounds:.1f}", f"{summary['wall_seconds']:.0f}s")
        console.print(table)
        plots = sorted(p.name for p in Path(cfg.out_dir).glob("*.png"))
        console.print(f"plots in {cfg.out_dir}/: {', '.join(plots)}", markup=False)
    console.print(f"final accuracy {_num(summary['final_accuracy'])} (best {_num(summary['best_accuracy'])}) "
                  f"in {summary['wall_seconds']:.0f}s; results in {cfg.out_dir}/", markup=False)
    if summary.get("stopped_early"):
        _fail(f"the run {summary['stopped_early']}", code=1)


@app.command()
def resume(
    run_dir: Annotated[Path, typer.Argument(help="the folder of an interrupted federated run")],
    verbose: VerboseOpt = False,
) -> None:
    """Continue an interrupted federated run from its last checkpoint: the same rounds, the same numbers
    (personalised experts excepted: the clients' kept copies do not survive, and it says so)."""
    try:
        from .experiment import run_experiment
        from .federation import checkpoint

        cfg = _run_config(run_dir)
        if cfg.federation.strategy not in FEDERATED:
            raise ConfigError(f"{run_dir} is a {cfg.federation.strategy} run: only federated runs resume; "
                              "start it again with `fedalign-moe run`")
        ckpt = checkpoint.load(run_dir)
        if not ckpt.belongs_to(cfg):
            raise ConfigError(f"the checkpoint in {run_dir} belongs to another config than {run_dir / 'config.json'}")
        console.print(f"[bold]resuming {cfg.federation.strategy}[/bold] in {run_dir} after round {ckpt.round} "
                      f"of {cfg.federation.rounds}")
        with _Display(cfg.federation.rounds, done=ckpt.round) as display:
            summary = run_experiment(cfg, display.round, ckpt, verbose, display.reply, on_plan=_print_plan)
    except UserError as err:
        _fail(str(err))
    _finish(summary, cfg)


def _run_config(run_dir: Path) -> Config:
    """The config a run folder was started with, pointed at the folder where it now is."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir} holds no run (no config.json)")
    try:
        cfg = Config.from_json(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    return cfg.model_copy(update={"out_dir": str(run_dir)})


def _csv(text: str, cast, what: str) -> list:
    try:
        items = [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"cannot read {what} from {text!r}") from None
    if not items:
        raise ConfigError(f"no {what} given")
    return items


@app.command()
def compare(
    preset: PresetOpt = "quick",
    config: ConfigOpt = None,
    strategies: Annotated[str, typer.Option(help="comma-separated strategies")] = "local,centralised,fedavg,fedprox",
    alphas: Annotated[str, typer.Option(help="comma-separated Dirichlet alphas")] = "1.0,0.1",
    seeds: Annotated[str, typer.Option(help="comma-separated seeds")] = "0,1,2",
    num_clients: Annotated[int | None, typer.Option()] = None,
    rounds: Annotated[int | None, typer.Option()] = None,
    out: Annotated[Path, typer.Option(help="output directory")] = Path("runs/compare"),
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run a grid of strategies x alphas x seeds; write results.json, results.md and plots."""
    try:
        names = _csv(strategies, str, "strategies")
        unknown = [s for s in names if s not in STRATEGIES]
        if unknown:
            raise ConfigError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)}")
        alpha_list, seed_list = _csv(alphas, float, "alphas"), _csv(seeds, int, "seeds")
        base = _with_checkpoint(load_config(preset, config, _overrides(None, alpha_list[0], num_clients, rounds, None, None,
                                                                       set_)))
        _check_out_dir(out)
        from .experiment import grid_configs, run_comparison

        configs = grid_configs(base, names, alpha_list, seed_list, out)
        for c in configs:  # validate every cell before spending time on the first
            Config.model_validate(c.model_dump())
        with _Display(len(configs), unit="runs") as display:
            started = []

            def on_run(c: Config) -> None:
                display.status(f"{c.federation.strategy}, alpha={c.partition.alpha:g}, seed={c.seed}", advance=len(started) > 0)
                started.append(c)
                console.print(f"[bold]== {c.federation.strategy}, alpha={c.partition.alpha:g}, seed={c.seed}[/bold]")

            summaries = run_comparison(configs, out, on_run=on_run, on_round=_print_round, verbose=verbose)
    except UserError as err:
        _fail(str(err))
    console.print((out / "results.md").read_text(), markup=False)
    from .report.evidence import failed_replies

    for line in failed_replies(summaries):  # e.g. clients killed for memory: the tables count these runs
        err_console.print(f"warning: {line}: its numbers are in the tables; to run it again, delete its folder "
                          "and compare again", markup=False, soft_wrap=True, style="yellow")


@app.command()
def premise(
    preset: PresetOpt = "specialised",
    config: ConfigOpt = None,
    recipes: Annotated[str, typer.Option(help="comma-separated model recipes: upcycle, drop-upcycle, btx")] = "upcycle,drop-upcycle,btx",
    seed: Annotated[int, typer.Option(help="seed of the runs and of the model built for each recipe")] = 0,
    out: Annotated[Path, typer.Option(help="output directory (premise.json, and the runs under premise/)")] = Path("runs/premise"),
    set_: SetOpt = None,
    verbose: Annotated[bool, typer.Option(help="show Flower's and the client processes' own output as it comes")] = False,
) -> None:
    """Measure whether the method's premise holds, per model recipe: expert-label information, client routing
    divergence under FedAvg at alpha 0.1, and the non-IID drop (centralised minus FedAvg). Writes premise.json."""
    try:
        names = _csv(recipes, str, "recipes")
        known = ("upcycle", "drop-upcycle", "btx")
        if any(r not in known for r in names):
            raise ConfigError(f"unknown recipe {next(r for r in names if r not in known)!r}; choose from {', '.join(known)}")
        base = load_config(preset, config, _overrides(None, 0.1, None, None, seed, None, set_))
        _check_out_dir(out)
        from .experiment import measure_premise

        with _Display(2 * len(names), unit="runs") as display:
            started = []

            def on_run(c: Config) -> None:
                display.status(f"{c.model.recipe}: {c.federation.strategy}", advance=len(started) > 0)
                started.append(c)
                console.print(f"[bold]== {c.model.recipe}: {c.federation.strategy}, alpha=0.1, seed={c.seed}[/bold]")

            path = measure_premise(base, names, seed, out, on_run=on_run, on_round=_print_round, verbose=verbose)
    except UserError as err:
        _fail(str(err))
    from .report.premise import premise_table

    console.print(premise_table(json.loads(path.read_text())), markup=False)
    console.print(f"premise figures in {path} and {path.with_name('premise_routing.png')}")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run directory, or a comparison directory")]) -> None:
    """Redraw the plots of a finished run, or the tables and figures of a comparison (finished runs so far)."""
    from .report.evidence import write_comparison
    from .report.plots import draw_run
    from .report.tables import MixedCellError
    from .runlog import stored

    if stored(run_dir / "metrics.jsonl").exists():  # metrics.jsonl, or a stored run's metrics.jsonl.gz
        for path in draw_run(run_dir):
            console.print(str(path), markup=False)
        return
    try:
        path = write_comparison(run_dir)
    except MixedCellError as err:
        _fail(str(err))
    if path is None:
        _fail(f"{run_dir} is neither a run directory (no metrics.jsonl) nor a comparison (no */summary.json)")
    console.print(path.read_text(), markup=False)


@app.command()
def presets() -> None:
    """List the shipped presets, each with its model, data, clients and rounds."""
    for name in preset_names():
        cfg = load_config(name)
        m, d, part = cfg.model, cfg.data, cfg.partition
        recipe = f", {m.recipe}" if m.recipe != "upcycle" else ""
        data = d.source + (f" ({d.hf_config})" if d.hf_config else "")
        console.print(f"{name}: {m.backbone} ({m.num_experts} experts, top-{m.top_k}{recipe}) on {data}, "
                      f"{part.num_clients} clients (alpha {part.alpha:g}), {cfg.federation.rounds} rounds",
                      markup=False, soft_wrap=True)


class _WarningLine(logging.Handler):
    """This package's warnings as one ``warning:`` line each on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "in_round_record", False):
            return  # the round's own line says it (``_print_round``)
        err_console.print(f"warning: {record.getMessage()}", markup=False, soft_wrap=True, style="yellow")


def _unexpected(err: BaseException) -> None:
    """One ``error:`` line for a failure nobody foresaw; the traceback goes to a file, never to the terminal."""
    fd, path = tempfile.mkstemp(prefix="fedalign-moe-error-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        traceback.print_exception(err, file=f)
    first = (str(err).strip().splitlines() or [""])[0][:300]
    print(f"error: unexpected {type(err).__name__}: {first} (full traceback in {path})", file=sys.stderr)
    sys.exit(1)


def _exit_interrupted() -> None:
    """Say how to resume, then leave at once with status 130. Not ``sys.exit``: when Flower's simulation
    engine is interrupted before it has stopped (a second Ctrl-C, or one it did not answer within its grace
    period: ``server_app.interrupt_sets``), a worker thread can stay blocked for good in ``ray.get`` on a
    client that Ray has already shut down, and the interpreter's exit would join that thread forever (seen
    with py-spy, about one interrupt in six, before the first Ctrl-C let the engine stop in order). What
    matters is on disk already: the server thread has finished (``simulate`` joins it) and the checkpoint is
    written atomically."""
    print("interrupted (a federated run continues with `fedalign-moe resume <its folder>`)", file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def main() -> None:
    package_log = logging.getLogger("fedalign_moe")
    if not package_log.handlers:
        package_log.addHandler(_WarningLine(logging.WARNING))
        package_log.propagate = False
    try:
        app()
    except SystemExit as done:
        if done.code == 130:  # typer turns Ctrl-C (KeyboardInterrupt) into exit status 130 without a word
            _exit_interrupted()
        raise
    except KeyboardInterrupt:
        _exit_interrupted()
    except Exception as err:  # noqa: BLE001 - the last line of defence: no traceback reaches the user
        _unexpected(err)
