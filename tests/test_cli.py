"""The CLI contract: bad input gives one error line and a non-zero exit; good input writes the files."""

import contextlib
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import GRID
from fedalign_moe.config import ConfigError, load_config, parse_overrides, preset_names


def _process(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """The CLI as a user starts it: its own interpreter, its real entry point."""
    return subprocess.run([sys.executable, "-m", "fedalign_moe", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def _cli(*args: str, cwd=None) -> SimpleNamespace:
    """The same commands in this process (no interpreter start-up: 7 s of imports a call saved)."""
    from typer.testing import CliRunner

    from fedalign_moe.cli import app

    with contextlib.chdir(cwd or os.getcwd()):
        res = CliRunner().invoke(app, list(args))
    return SimpleNamespace(returncode=res.exit_code, stdout=res.stdout, stderr=res.stderr, exception=res.exception)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "--preset", "nope"], "unknown preset 'nope'"),
        (["run", "--preset", "tiny", "--strategy", "fedfoo"], "unknown strategy 'fedfoo'"),
        (["run", "--preset", "tiny", "--alpha", "0"], "partition.alpha"),
        (["run", "--preset", "tiny", "--alpha", "-1"], "partition.alpha"),
        (["run", "--preset", "tiny", "--num-clients", "100000"], "100000 clients but only"),
        (["run", "--preset", "tiny", "--set", "data.source=file", "--set", "data.path=/no/such.csv"], "/no/such.csv"),
        (["run", "--preset", "tiny", "--config", "/no/such.toml"], "config file not found"),
        (["run", "--preset", "tiny", "--set", "model.backbone=/no/such/checkpoint"], "/no/such/checkpoint"),
        (["run", "--preset", "tiny", "--set", "model.top_k=9"], "top_k (9) cannot exceed num_experts"),
        (["compare", "--preset", "tiny", "--strategies", "fedavg,bogus"], "unknown strategy 'bogus'"),
        (["compare", "--preset", "tiny", "--alphas", "x"], "cannot read alphas"),
        (["run", "--preset", "tiny", "--seed", str(2**64)], "invalid config value at seed"),
        (["run", "--preset", "tiny", "--set", "federation.rounds=true"], "federation.rounds"),
        (["run", "--preset", "tiny", "--set", "data.max_length=16.5"], "data.max_length"),
        (["run", "--preset", "tiny", "--set", "federation.min_available_nodes=4"], "cannot exceed partition.num_clients (3)"),
    ],
)
def test_bad_input_is_one_clear_line(args, needle, tmp_path):
    res = (_process if args[:3] == ["run", "--preset", "nope"] else _cli)(*args, "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("error: ") and needle in lines[-1], res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def _one_error_line(res, needle):
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert res.returncode == 2 and lines and lines[-1].startswith("error: ") and needle in lines[-1], res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def test_bad_files_and_folders_are_one_clear_line(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    _one_error_line(_cli("run", "--preset", "tiny", "--config", str(listed)), "must hold a table of sections, not a list")
    latin = tmp_path / "latin.toml"
    latin.write_bytes("[train]\nlr = 0.1 # caf\xe9\n".encode("latin-1"))
    _one_error_line(_cli("run", "--preset", "tiny", "--config", str(latin)), "is not UTF-8 text")
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    _one_error_line(_cli("run", "--preset", "tiny", "--out", str(a_file)), "is an existing file, not a folder")
    _one_error_line(_cli("run", "--preset", "tiny", "--out", str(a_file / "below")), "cannot write to the output folder")
    _one_error_line(_cli("compare", "--preset", "tiny", "--out", str(a_file)), "is an existing file, not a folder")
    csv = tmp_path / "d.csv"
    csv.write_bytes("text,label\ncaf\xe9 au lait,a\n".encode("latin-1"))
    _one_error_line(_cli("run", "--preset", "tiny", "--set", "data.source=file", "--set", f"data.path={csv}",
                         "--out", str(tmp_path / "o")), "is not UTF-8 text (byte 14")
    _one_error_line(_cli("resume", str(tmp_path / "nothing")), "holds no run")


def test_an_unexpected_error_is_one_line_and_a_traceback_file(capsys):
    from fedalign_moe.cli import _unexpected

    try:
        raise RuntimeError("something nobody foresaw\nsecond line")
    except RuntimeError as err:
        with pytest.raises(SystemExit) as stop:
            _unexpected(err)
    assert stop.value.code == 1
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: unexpected RuntimeError: something nobody foresaw (full traceback in ")
    path = line.rsplit("in ", 1)[1].rstrip(")")
    assert "Traceback" in open(path).read() and "\n" not in line


def test_a_run_whose_model_diverges_stops_with_strict_json(tmp_path):
    """lr = 1e10: every update is NaN, none is averaged in, the run says so and exits 1."""
    res = _process("run", "--preset", "tiny", "--set", "train.lr=1e10", "--out", str(tmp_path))
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "no new global model in the last 2 rounds" in res.stderr.strip().splitlines()[-1]
    # the terminal gets our lines only (a pipe: one per round, plus what went wrong); Flower's go to run.log
    assert res.stderr.strip().count("\n") == 0, res.stderr  # the error line alone
    lines = res.stdout.splitlines()
    assert [l.split()[:2] for l in lines if l.startswith("round")] == [["round", "1"], ["round", "2"]]
    assert not any(word in res.stdout for word in ("INFO", "WARNING", "DEPRECATED", "ClientAppActor", "\x1b["))
    run_log = (tmp_path / "run.log").read_text()
    assert "configure_train" in run_log and "client process output" in run_log

    def no_constants(name):
        raise ValueError(f"not JSON: {name}")

    rows = [json.loads(line, parse_constant=no_constants) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    json.loads((tmp_path / "summary.json").read_text(), parse_constant=no_constants)
    assert [r["adopted"] for r in rows] == [False, False] and all(r["replied"] == 0 for r in rows)
    assert all("NaN or Inf" in f["reason"] or "is nan" in f["reason"] for r in rows for f in r["failure_reasons"])


def test_unreadable_checkpoint_directory(tmp_path):
    bad = tmp_path / "ckpt"
    bad.mkdir()
    (bad / "config.json").write_text("{ not json")
    res = _cli("run", "--preset", "tiny", "--set", f"model.backbone={bad}", "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "error: cannot read a model checkpoint" in res.stderr
    assert "Traceback" not in res.stderr


def test_presets_are_listed_and_valid():
    assert {"quick", "bench", "gpu", "tiny"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        assert cfg.preset == name
    assert load_config("bench").model.top_k == 1 and load_config("bench").model.num_experts >= 8


def test_presets_says_what_each_runs():
    res = _cli("presets")
    assert res.returncode == 0
    lines = dict(line.split(": ", 1) for line in res.stdout.strip().splitlines())
    assert sorted(lines) == preset_names()
    assert lines["tiny"] == "tiny-mixtral (4 experts, top-2) on mmlu-topic, 3 clients (alpha 1), 2 rounds"
    assert lines["paper-switch"].startswith("google/switch-base-16 (16 experts, top-1) on hf:fancyzhx/ag_news")
    assert "btx" in lines["specialised"]


def test_overrides_and_files_merge_in_order(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[train]\nlr = 0.002\n[federation]\nrounds = 7\n")
    cfg = load_config("tiny", f, parse_overrides(["federation.rounds=3", "data.max_length=12"]))
    assert cfg.train.lr == 0.002 and cfg.federation.rounds == 3 and cfg.data.max_length == 12
    with pytest.raises(ConfigError, match="unknown_field"):
        load_config("tiny", overrides={"train": {"unknown_field": 1}})


def test_local_and_centralised_runs_write_the_contract(tmp_path):
    tokens = {}
    for strategy in ("local", "centralised"):
        out = tmp_path / strategy
        res = _cli("run", "--preset", "tiny", "--strategy", strategy, "--rounds", "2", "--out", str(out))
        assert res.returncode == 0, res.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["strategy"] == strategy and len(summary["accuracy_per_round"]) == 2
        assert summary["uplink_bytes_total"] == 0
        assert (out / "accuracy.png").exists() and (out / "partition.png").exists()
        tokens[strategy] = summary["train_tokens_total"]
    assert tokens["local"] == tokens["centralised"] > 0  # both pass over every client's split once a round


def test_compare_writes_a_mean_std_table(tmp_path):
    out = tmp_path / "cmp"
    res = _cli("compare", "--preset", "tiny", "--strategies", "local,centralised", "--alphas", "1.0",
               "--seeds", "0,1", "--rounds", "1", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 4 and {r["seed"] for r in results} == {0, 1}
    table = (out / "results.md").read_text()
    assert "| 1 | centralised | 2 |" in table and "±" in table
    assert (out / "accuracy_by_strategy.png").stat().st_size > 1000
    assert "## Accuracy" in (out / "evidence.md").read_text()
    moved = tmp_path / "moved"
    out.rename(moved)
    before = {p: p.stat().st_mtime_ns for p in moved.glob("*/summary.json")}
    res = _cli("compare", "--preset", "tiny", "--strategies", "local,centralised", "--alphas", "1.0",
               "--seeds", "0,1", "--rounds", "1", "--out", str(moved))
    assert res.returncode == 0, res.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in moved.glob("*/summary.json")} == before  # finished cells are kept
    assert not any("run_dir" in r for r in json.loads((moved / "results.json").read_text()))  # no machine's paths


def test_compare_federated_grid_writes_the_evidence_report(tiny_grid, tmp_path):
    """The issue-4 machinery end to end on a tiny grid: FedAvg vs FedAlign-MoE and FedMoE, then `report`."""
    import shutil

    out = tmp_path / "cmp"
    shutil.copytree(tiny_grid, out)
    up = {s["strategy"]: s["uplink_bytes_total"] for s in json.loads((out / "results.json").read_text())}
    assert up["fedmoe"] < up["fedavg"] < up["fedalign"]  # FedMoE's clients send their sub-MoE only
    text = (out / "evidence.md").read_text()
    assert "| 0.5 | fedalign | 1 |" in text and "| 0.5 | fedavg | 1 |" in text
    comm = [l for l in text.splitlines() if l.startswith("| 0.5 | fedalign |") and "%" in l]
    assert comm and not comm[0].endswith("| 0.000% |")  # FedAlign-MoE's statistics travel and are counted
    for name in ("routing_spread.png", "aligned_fraction.png", "routing_heatmap_alpha0.5.png"):
        assert (out / name).stat().st_size > 1000, name
    moved = tmp_path / "moved"
    out.rename(moved)  # the report reads the run folders where they are now
    res = _cli("report", str(moved))
    assert res.returncode == 0 and "## Convergence" in res.stdout, res.stderr[-3000:]
    assert len(json.loads((moved / "results.json").read_text())) == 3
    # a finished run whose clients failed (say, killed for memory) is kept, and compare says so in one line
    metrics = moved / "fedavg-alpha0.5-seed0" / "metrics.jsonl"
    records = [json.loads(l) for l in metrics.read_text().splitlines()]
    records[1]["failures"] = 3
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    res = _cli("compare", *GRID, "--strategies", "fedavg", "--out", str(moved))
    assert res.returncode == 0, res.stderr[-3000:]
    # the tables of a later call still describe every finished run of the folder, as evidence.md does
    assert len(json.loads((moved / "results.json").read_text())) == 3
    assert "| 0.5 | fedalign | 1 |" in (moved / "results.md").read_text()
    assert ("warning: fedavg, alpha 0.5, seed 0: failed replies (round 2: 3): its numbers are in the tables; "
            "to run it again, delete its folder and compare again") in " ".join(res.stderr.split())


def test_compare_stops_before_running_when_a_cell_would_mix_two_setups(tiny_grid, tmp_path):
    """FedAlign-MoE with the other expert weighting beside the folder's FedAlign-MoE run would share its
    table cell: compare says so in one line before it spends time on any run."""
    import shutil

    out = tmp_path / "cmp"
    shutil.copytree(tiny_grid, out)
    res = _cli("compare", *GRID[:5], "1", *GRID[6:], "--strategies", "fedavg,fedalign", "--set",
               "fedalign.expert_weights=tokens", "--out", str(out))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: runs of fedalign at alpha 0.5 differ in fedalign.expert_weights: a table cell would average "
        "different setups; keep each setup in its own folder"]
    assert not (out / "fedavg-alpha0.5-seed1").exists()


def test_a_run_of_an_older_strategy_revision_is_run_again():
    from fedalign_moe.experiment import _same_result

    fedmoe = load_config("tiny", overrides={"federation": {"strategy": "fedmoe"}})
    assert _same_result({"config_json": fedmoe.to_json(), "strategy_revision": 2}, fedmoe)
    assert not _same_result({"config_json": fedmoe.to_json()}, fedmoe)  # FedMoE before sub-MoE uploads
    fedavg = load_config("tiny")
    assert _same_result({"config_json": fedavg.to_json()}, fedavg)  # unchanged strategies keep their runs


def test_a_stored_config_without_expert_weights_ran_with_token_weights():
    """Runs stored before `fedalign.expert_weights` existed weighted by tokens; since the default became
    `examples` they must not count as runs of it (compare reruns them; resume keeps their rule)."""
    from fedalign_moe.config import Config
    from fedalign_moe.experiment import _same_result

    cfg = load_config("tiny", overrides={"federation": {"strategy": "fedalign"}})
    raw = json.loads(cfg.to_json())
    del raw["fedalign"]["expert_weights"]
    old = json.dumps(raw)
    assert Config.from_json(old).fedalign.expert_weights == "tokens"
    assert not _same_result({"config_json": old}, cfg)
    tokens = load_config("tiny", overrides={"federation": {"strategy": "fedalign"}, "fedalign": {"expert_weights": "tokens"}})
    assert _same_result({"config_json": old}, tokens)


def test_report_reads_an_unreadable_old_config_without_expert_weights_as_a_tokens_run():
    """`report` compares configs this version cannot validate over the defaults; a FedAlign-MoE run stored
    before `expert_weights` existed must read as a `tokens` run there too, not as one of today's default."""
    from fedalign_moe.report.tables import group_cells

    raws = []
    for weights in (None, "tokens"):
        raw = json.loads(load_config("tiny", overrides={"federation": {"strategy": "fedalign"}}).to_json())
        raw["train"]["knob_since_removed"] = 1  # makes the config unreadable by this version
        if weights is None:
            del raw["fedalign"]["expert_weights"]
        else:
            raw["fedalign"]["expert_weights"] = weights
        raws.append(raw)
    group_cells([{"alpha": 0.1, "strategy": "fedalign", "config_json": json.dumps(r)} for r in raws])


@pytest.mark.parametrize("strategy, option, kept", [
    ("fedavg", {"fedalign": {"expert_weights": "tokens"}}, True),  # FedAvg never reads fedalign.*
    ("fedavg", {"train": {"proximal_mu": 0.1}}, True),
    ("fedavg", {"federation": {"fedmoe_coverage": 0.5}}, True),
    ("fedavg", {"train": {"lr": 0.0123}}, False),
    ("fedprox", {"train": {"proximal_mu": 0.1}}, False),
    ("fedmoe", {"federation": {"fedmoe_coverage": 0.5}}, False),
    ("fedalign", {"fedalign": {"expert_weights": "tokens"}}, False),
    ("fedalign-adaptive", {"fedalign": {"expert_weights": "tokens"}}, True),  # no semantic expert aggregation
    ("fedalign-adaptive", {"fedalign": {"reg_lambda": 0.5}}, False),
    ("fedalign", {"fedalign": {"proximal_mu": 0.1}}, False),
    ("fedprox", {"fedalign": {"proximal_mu": 0.1}}, True),  # FedProx's mu is train.proximal_mu
])
def test_a_finished_run_is_kept_when_only_an_option_its_strategy_never_reads_changed(strategy, option, kept):
    """A new default of one strategy's option (expert_weights became `examples`, issue 9) must not make
    `compare` rerun every other strategy's runs, nor make `report` call their cells mixed."""
    from fedalign_moe.experiment import _same_result
    from fedalign_moe.report.tables import MixedCellError, group_cells

    before = load_config("tiny", overrides={"federation": {"strategy": strategy}})
    after = load_config("tiny", overrides={**option, "federation": {**option.get("federation", {}), "strategy": strategy}})
    assert _same_result({"config_json": before.to_json()}, after) is kept
    runs = [{"alpha": 0.1, "strategy": strategy, "config_json": c.to_json()} for c in (before, after)]
    if kept:
        group_cells(runs)
    else:
        with pytest.raises(MixedCellError):
            group_cells(runs)


def test_a_terminal_sees_our_lines_and_no_third_party_output(tmp_path):
    """Under a pseudo-terminal: a live bar over the rounds, the round lines (with the per-client line a
    terminal gets), a closing table, and nothing from Flower, Ray or transformers (that goes to DIR/run.log).
    The run is FedAlign-MoE on a saved Switch Transformers checkpoint (issue 10: the paper's family runs
    through the CLI end to end), so one simulation covers both."""
    import pty

    from test_families import save_switch

    save_switch(tmp_path / "switch")
    main, side = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "fedalign_moe", "run", "--preset", "tiny", "--strategy", "fedalign",
                             "--set", f"model.backbone={tmp_path / 'switch'}", "--out", str(tmp_path / "out")],
                            stdin=side, stdout=side, stderr=side, env={**os.environ, "TERM": "xterm", "COLUMNS": "200"})
    os.close(side)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the terminal closed: the process is done
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert proc.wait(timeout=600) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "round   1" in text and "train loss per client" in text and "final accuracy" in text, text[-3000:]
    assert re.search(r"round 1: \d/3 replies", text) and "eta" in text  # the live bar, counting replies as they come
    assert "plots in" in text and "clients' own-test" in text  # and the closing table
    for noise in ("DEPRECATED", "FutureWarning", "ClientAppActor", "Loading weights", "INFO", "LOAD REPORT", "UNEXPECTED"):
        assert noise not in text, (noise, text[-3000:])
    assert "DEPRECATED FEATURE" in (tmp_path / "out" / "run.log").read_text()
    assert "(4 experts, top-1)" in text  # the Switch checkpoint's own routing
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["strategy"] == "fedalign"
    diagnostics = (tmp_path / "out" / "diagnostics.jsonl").read_text().splitlines()
    assert len(diagnostics) == 2 and all(len(json.loads(d)["aligned"]) == 2 for d in diagnostics)


@pytest.mark.parametrize("how", ["KeyboardInterrupt", "SystemExit(130)"])  # as raised, and as typer turns it
def test_ctrl_c_exits_even_when_a_thread_of_the_engine_never_ends(how):
    """After a Ctrl-C, Flower's simulation engine can leave a worker thread blocked for good in ``ray.get`` on
    a client Ray has already shut down; ``sys.exit`` then joined that thread forever (the CLI printed its
    resume line and never exited: one interrupt in about six, and once in CI). Here such a thread is made on
    purpose, and the CLI must still exit 130 with its line."""
    code = ("import threading\n"
            "from fedalign_moe import cli\n"
            "threading.Thread(target=threading.Event().wait).start()  # never ends, not a daemon\n"
            "def app():\n"
            f"    raise {how}\n"
            "cli.app = app\n"
            "cli.main()\n")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the CLI did not exit after the interrupt")
    assert done.returncode == 130
    assert done.stderr.strip() == "interrupted (a federated run continues with `fedalign-moe resume <its folder>`)"
