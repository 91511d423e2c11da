"""The Flower ServerApp, and the in-process simulation that runs it with the ClientApp.

Two ways in, one loop (``server.run_federation``):
- ``fedalign-moe run`` builds the config and calls ``simulate(cfg)``: Flower's simulation engine,
  in this process, one virtual SuperNode per client.
- ``flwr run .`` or a SuperLink deployment load ``app`` below; its run config (pyproject
  ``[tool.flwr.app.config]`` or ``--run-config``) names a preset and overrides.
"""

from __future__ import annotations

import _thread
import logging
import math
import os
import signal
import tempfile
import threading
from collections.abc import Callable
from contextlib import contextmanager
from logging import INFO
from pathlib import Path

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.common.logger import console_handler, log
from flwr.serverapp import Grid, ServerApp

from ..config import Config, UserError, load_config, parse_overrides
from ..models.build import supports_meta
from ..records import RoundRecord
from ..training.plan import Plan, check_fits, plan_model
from ..training.setup import Workspace, open_log, open_workspace, prepare_data
from .checkpoint import Checkpoint
from .node_policy import TRUST_ENV
from .server import RunInterrupted, run_federation

logger = logging.getLogger(__name__)


def config_from_run_config(run_config: dict) -> Config:
    """``preset`` plus ``overrides`` ("train.lr=1e-4 federation.rounds=3", space or comma separated)."""
    raw = str(run_config.get("overrides", "")).replace(",", " ").split()
    return load_config(str(run_config.get("preset", "quick")), overrides=parse_overrides(raw))


def serve(grid: Grid, cfg: Config, on_round: Callable[[RoundRecord], None] | None = None,
          resume: Checkpoint | None = None, ws: Workspace | None = None,
          on_reply: Callable[[int, int, int], None] | None = None, interrupted: threading.Event | None = None) -> dict:
    """The server's whole run over ``grid``: its workspace (unless given), its log, the rounds; the summary."""
    ws = ws if ws is not None else open_workspace(cfg, server=True)
    log = open_log(ws, resume.round if resume else None, resume.wall_seconds if resume else 0.0)
    try:
        return run_federation(grid, ws, log, on_round, resume, on_reply, interrupted)
    finally:
        log.close()  # an interrupted run's TensorBoard events up to its last finished round reach the disk


app = ServerApp()


def log_round(record: RoundRecord) -> None:
    """One line a round in the ServerApp's log (what ``flwr log`` streams)."""
    ex = record.exchange
    log(INFO, "round %d: accuracy %.4f, loss %.4f, %d of %d replies used, %d failures%s, %.1fs", record.round,
        math.nan if record.accuracy is None else record.accuracy, math.nan if record.loss is None else record.loss,
        ex.replied, ex.sent, record.failures, "" if ex.adopted else f", previous model kept ({ex.not_adopted_reason})",
        record.seconds)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run`` and deployments."""
    serve(grid, config_from_run_config(dict(context.run_config)), log_round)


def _signal_main_thread() -> None:
    """SIGINT to the main thread itself: a real signal breaks the wait of a main thread blocked in a join,
    which ``_thread.interrupt_main`` (a flag checked between bytecodes) does not."""
    if hasattr(signal, "pthread_kill"):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    else:  # no POSIX threads (Windows)
        _thread.interrupt_main(signal.SIGINT)


@contextmanager
def interrupt_sets(event: threading.Event, grace_s: float = 30.0):
    """While it lasts, the first SIGINT (Ctrl-C) only sets ``event``: the server loop discards the round in
    flight and ends the run (``server.run_federation`` raises ``RunInterrupted``), and Flower's engine then
    stops its worker threads, the client actors and Ray, in that order. Interrupting the main thread at once
    (Python's default) unwinds the engine while its worker threads are still inside Ray: Flower shuts Ray
    down under them and Ray's core worker ends the process with status 1 ("The core worker has already been
    shutdown", seen in CI). A second Ctrl-C, or an engine still running ``grace_s`` seconds after the first,
    interrupts the main thread as before. Only the main thread can install a handler, and a process that
    ignores SIGINT keeps ignoring it."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous == signal.SIG_IGN:
        yield
        return
    grace = threading.Timer(grace_s, _signal_main_thread)
    grace.daemon = True

    def handler(signum, frame):
        if not event.is_set():
            event.set()
            grace.start()
        elif callable(previous):
            previous(signum, frame)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        grace.cancel()
        signal.signal(signal.SIGINT, previous)


@contextmanager
def third_party_output(log_path: Path, verbose: bool):
    """While it lasts, Flower's log (and this package's) is written to ``log_path``; the terminal shows it
    only when ``verbose``. Ray's accelerator FutureWarning is answered by opting in to Ray's future default
    (clients that ask for no GPU see none), and the client processes' own output stays in Ray's session
    logs, copied to ``log_path`` at the end, unless ``verbose`` (their failures reach the server as error
    replies, named in each round)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger("flwr"), logging.getLogger("fedalign_moe")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    console_level = console_handler.level
    if not verbose:
        console_handler.setLevel(logging.CRITICAL + 1)
    try:
        with environment(**{_RAY_ACCEL: os.environ.get(_RAY_ACCEL, "0")}):
            yield
    finally:
        console_handler.setLevel(console_level)
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
        handler.close()


_RAY_ACCEL = "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"


@contextmanager
def environment(**variables: str):
    """While it lasts, these environment variables have these values; then each is as it was (unset if it was)."""
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def append_client_output(run_log: Path) -> None:
    """Append what the client processes printed (Ray keeps it in the latest session's logs, moved to
    ``old/`` when the actors end) to ``run_log``."""
    logs = Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "ray" / "session_latest" / "logs"
    files = sorted(p for pattern in ("worker-*.out", "worker-*.err") for p in [*logs.glob(pattern), *logs.glob(f"old/{pattern}")])
    with run_log.open("a", encoding="utf-8") as out:
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                out.write(f"--- client process output ({path.name}) ---\n{text}\n")


def planned_workspace(cfg: Config) -> tuple[Plan, Workspace]:
    """The run's memory plan (``ConfigError`` when it cannot fit), then the server's workspace. The plan
    reads the model's structure on the meta device, before anything heavy is loaded; minilm and smollm2,
    which build only from their weights, are small enough to build first."""
    data = prepare_data(cfg)
    if supports_meta(cfg.model):
        meta_built = plan_model(cfg, data)
        plan = check_fits(cfg, meta_built)
        return plan, open_workspace(cfg, server=True, data=data, meta_built=meta_built)
    ws = open_workspace(cfg, server=True, data=data)
    return check_fits(cfg, ws.built), ws


def backend_config(cfg: Config, plan: Plan, verbose: bool) -> dict:
    """Flower's Ray backend: as many client processes (workers) as the plan says (Ray's CPUs divided by
    ``client_cpus``), each sharing its GPU with the plan's other workers there unless ``client_gpus`` is set."""
    fed, gpus = cfg.federation, cfg.federation.client_gpus
    if plan.device == "cuda" and gpus == 0:  # Ray counts resources in 1e-4: round each share down
        import torch

        gpus = math.floor(1e4 / -(-plan.workers // max(torch.cuda.device_count(), 1))) / 1e4
    cpus = max(1, math.ceil(plan.workers * fed.client_cpus))  # Ray takes whole CPUs
    per_client = math.floor(1e4 * cpus / plan.workers) / 1e4  # so that cpus / per_client >= workers
    return {"client_resources": {"num_cpus": per_client, "num_gpus": gpus},
            "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": verbose}}


class Simulation:
    """One run in Flower's in-process simulation engine (``simulate``). The ServerApp it hands Flower runs
    ``serve`` in Flower's server thread; the summary, or the one-line error of a bad run, comes back here."""

    def __init__(self, cfg: Config, ws: Workspace, on_round: Callable[[RoundRecord], None] | None = None,
                 resume: Checkpoint | None = None, on_reply: Callable[[int, int, int], None] | None = None):
        self.cfg, self.ws, self.on_round, self.resume, self.on_reply = cfg, ws, on_round, resume, on_reply
        self.interrupted = threading.Event()  # set by Ctrl-C (interrupt_sets)
        self.summary: dict | None = None
        self.error: UserError | None = None
        self.server_thread: threading.Thread | None = None

    def server_app(self) -> ServerApp:
        server = ServerApp()

        @server.main()
        def _main(grid: Grid, context: Context) -> None:
            self.server_thread = threading.current_thread()
            try:
                self.summary = serve(grid, self.cfg, self.on_round, self.resume, self.ws, self.on_reply, self.interrupted)
            except UserError as err:  # e.g. no node answered for the initial model: one line for the caller
                self.error = err
                raise

        return server

    def run(self, client_app: ClientApp, plan: Plan, verbose: bool) -> dict:
        from flwr.simulation import run_simulation

        run_log = Path(self.cfg.out_dir) / "run.log"
        # the client processes Ray starts are this user's own (node_policy)
        with environment(**{TRUST_ENV: "run-config"}), third_party_output(run_log, verbose), interrupt_sets(self.interrupted):
            try:
                run_simulation(self.server_app(), client_app, self.cfg.partition.num_clients,
                               backend_config=backend_config(self.cfg, plan, verbose))
            except RunInterrupted:  # a Ctrl-C, re-raised by Flower once its engine has stopped in order
                raise KeyboardInterrupt from None
            except KeyboardInterrupt:
                # a second Ctrl-C, or an engine that did not stop in time: Flower does not wait for its
                # server thread, so wait here until it has seen the event and discarded the round in
                # flight; whoever handles the interrupt then finds the run's folder as the last finished
                # round left it (a third Ctrl-C stops waiting)
                self.interrupted.set()
                if self.server_thread is not None:
                    self.server_thread.join()
                raise
            if self.interrupted.is_set():  # Ctrl-C came as the run ended: it is complete, the caller stops all the same
                raise KeyboardInterrupt
            if not verbose:  # on the terminal already otherwise
                append_client_output(run_log)
        if self.error is not None:
            raise self.error
        if self.summary is None:
            raise RuntimeError(f"the simulation ended without a summary; see {run_log}")
        return self.summary


def simulate(cfg: Config, on_round: Callable[[RoundRecord], None] | None = None, resume: Checkpoint | None = None,
             client_app: ClientApp | None = None, verbose: bool = False,
             on_reply: Callable[[int, int, int], None] | None = None,
             on_plan: Callable[[Plan], None] | None = None) -> dict:
    """Run the federation in Flower's in-process simulation engine; return the run summary.

    The run's memory plan comes first (``training.plan``): a run that cannot fit stops with one error line,
    and the plan says how many client processes (workers) to start; ``on_plan(plan)`` sees it.
    ``resume``: continue from this checkpoint of the run in ``cfg.out_dir``. ``client_app``: another
    ClientApp than this package's (tests use one whose clients fail on purpose). Flower's and the client
    processes' own output goes to ``cfg.out_dir/run.log`` (``verbose``: to the terminal instead, as it comes).
    """
    if client_app is None:
        from .client_app import app as client_app

    # the server's data, plan and model first (in this process): bad data, a bad checkpoint or a run that
    # cannot fit is one error line now, before Ray and the client processes start
    plan, ws = planned_workspace(cfg)
    if on_plan is not None:
        on_plan(plan)
    logger.info(plan.summary_line())
    return Simulation(cfg, ws, on_round, resume, on_reply).run(client_app, plan, verbose)
