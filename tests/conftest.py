import pytest


@pytest.fixture
def server_identity(monkeypatch):
    """What Flower sets in a ServerApp process, so that strategies can build messages in a test."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


@pytest.fixture
def fast_flower_arrays(monkeypatch):
    """Flower's ``ArrayRecord.to_numpy_ndarrays(keep_input=False)`` (Bulyan, Krum) runs ``gc.collect()`` per
    record, 0.2 s each in a test process's large heap and nothing to do with what is tested: skip it."""
    import gc

    monkeypatch.setattr(gc, "collect", lambda *args, **kwargs: 0)


GRID = ["--preset", "tiny", "--alphas", "0.5", "--seeds", "0", "--rounds", "3", "--set", "federation.fedmoe_coverage=0.5",
        "--set", "output.tensorboard=true"]


@pytest.fixture(scope="session")
def tiny_grid(tmp_path_factory):
    """One real comparison through the CLI, shared by the tests that read its runs (a Flower simulation
    costs ~30 s here): FedAvg, FedAlign-MoE and FedMoE on the tiny preset, 3 rounds. The folder of
    strategy S is ``out / f"{S}-alpha0.5-seed0"``."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("grid") / "cmp"
    res = subprocess.run([sys.executable, "-m", "fedalign_moe", "compare", *GRID, "--strategies", "fedavg,fedalign,fedmoe",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


# The fast tier (`pytest -m "not slow"`): the unit and math tests. Slow: whatever starts Flower's engine or
# other processes, builds or loads real models, or reads the shared comparison grid.
SLOW_FILES = {"test_cli.py", "test_resume.py", "test_failing_clients.py", "test_deploy.py", "test_llm_scale.py",
              "test_families.py", "test_recipes.py", "test_flwr_run.py", "test_upcycle_llama.py", "test_airgap.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES or "tiny_grid" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
