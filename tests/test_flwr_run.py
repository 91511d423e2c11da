"""The apps run the Flower way too: ``flwr run . local-simulation`` from the project's own pyproject (its
``[tool.flwr.app]`` components and the ``local-simulation`` federation), in this environment (no runtime
dependency installation), writing the same run folder as ``fedalign-moe run``."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _stop_local_superlink(flwr_home: Path) -> None:
    """``flwr run`` leaves the local SuperLink it started running: stop the processes of this FLWR_HOME."""
    import psutil

    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("FLWR_HOME") == str(flwr_home) and proc.pid != os.getpid():
                for child in proc.children(recursive=True):
                    child.kill()
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def test_flwr_run_local_simulation_from_the_projects_pyproject(tmp_path):
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if shutil.which("flwr", path=env["PATH"]) is None:
        pytest.skip("flwr not found")
    app = tmp_path / "app"  # a copy: the first `flwr run` moves the federations table out of pyproject.toml
    shutil.copytree(ROOT / "src", app / "src", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", app / "pyproject.toml")
    flwr_home, out = tmp_path / "flwr-home", tmp_path / "out"
    env.update({"FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"})
    try:
        res = subprocess.run(["flwr", "run", str(app), "local-simulation", "--stream",
                              "--run-config", f"preset='tiny' overrides='out_dir={out}'",
                              "--federation-config", "num-supernodes=3"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=420)
        deadline = time.monotonic() + 120  # the stream can end before the ServerApp writes its summary
        while res.returncode == 0 and not (out / "summary.json").is_file() and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        _stop_local_superlink(flwr_home)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "round 2: accuracy" in res.stdout + res.stderr  # the ServerApp's round lines, streamed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["failures_total"] == 0 and summary["rounds_not_adopted"] == []
