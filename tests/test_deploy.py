"""A real, secure Flower deployment on loopback: one SuperLink and two SuperNodes as separate processes.

Runs ``scripts/deploy_local.sh tiny 2 <tmp>`` (the same commands docs/deploy.md shows) on ports
picked here, so that parallel test runs do not clash: TLS with a throwaway CA, SuperNode
authentication with registered keys, and two probes that must be refused (a SuperNode whose key was
never registered, one that does not trust the CA). Takes about 1-1.5 minutes on 2 CPU cores: every
Flower message starts a fresh ``flwr-clientapp`` process in a deployment.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "deploy_local.sh"
TIMEOUT_S = 600


def _free_ports(n: int) -> list[int]:
    """n distinct loopback ports that are free right now (all held open until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _bin_dir_env() -> dict:
    """The environment for the script, with this interpreter's scripts directory first on PATH."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def test_secure_deploy_local_superlink_and_two_supernodes_of_three(tmp_path):
    env = _bin_dir_env()
    missing = [b for b in ("bash", "flower-superlink", "flower-supernode", "flwr")
               if shutil.which(b, path=env["PATH"]) is None]
    if missing:
        pytest.skip(f"binaries not found: {', '.join(missing)}")

    superlink_port, *node_ports, probe_a, probe_b = _free_ports(5)
    env.update({
        "FEDALIGN_SUPERLINK_PORT": str(superlink_port),
        "FEDALIGN_SUPERNODE_PORTS": ",".join(map(str, node_ports)),
        "FEDALIGN_PROBE_PORTS": f"{probe_a},{probe_b}",
        "FEDALIGN_DEPLOY_PROBES": "1",
        "FEDALIGN_DEPLOY_TIMEOUT": str(TIMEOUT_S - 60),
        "TMPDIR": str(tmp_path),
    })
    out = tmp_path / "out"
    # the run is configured for 3 clients, but only 2 SuperNodes ever connect: the server waits
    # node_wait_seconds for the third, then goes on with the two
    # two rounds of FedAlign-MoE: every Flower message starts a fresh client process here (~15 s a round)
    proc = subprocess.Popen(["bash", str(SCRIPT), "tiny", "2", str(out), "partition.num_clients=3",
                             "federation.node_wait_seconds=5", "federation.rounds=2", "federation.strategy=fedalign"],
                            env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script's EXIT trap stops every process it started
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"deploy_local.sh did not finish in {TIMEOUT_S}s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"deploy_local.sh exited {proc.returncode}:\n{output[-6000:]}"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["preset"] == "tiny" and summary["strategy"] == "fedalign"
    assert summary["num_clients"] == 3 and not summary.get("stopped_early")
    assert summary["rounds"] == 2
    accuracy = summary["accuracy_per_round"]
    assert len(accuracy) == 2 and all(0.0 <= a <= 1.0 for a in accuracy)
    assert "TLS with a throwaway CA" in output and "WARNING" not in output
    assert summary["uplink_bytes_total"] > 0
    # the final evaluation reached every SuperNode, each on its own partition
    assert sorted(summary["global_model_on_client_tests_by_client"]) == ["0", "1"]

    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["uplink_bytes"] > 0
        assert r["failures"] == 0 and r["sent"] == 2 and r["adopted"]
        assert sorted(c["partition_id"] for c in r["clients"]) == [0, 1]

    # the secure deployment refused a SuperNode with an unregistered key and one without the CA, and its
    # SuperLink (Fleet, Control and Runtime APIs on one port) listened on loopback only
    logs = out / "deploy-logs"
    probes = json.loads((logs / "probes.json").read_text())
    assert probes == {"unregistered_key_refused": True, "no_ca_refused": True, "superlink_listen": "127.0.0.1"}
    assert "Failed to activate SuperNode" in (logs / "probe-unregistered.log").read_text()
    assert "CERTIFICATE_VERIFY_FAILED" in (logs / "probe-no-ca.log").read_text()

    # the script copied the processes' logs next to the results, and left no process behind
    assert (logs / "superlink.log").is_file() and len(list(logs.glob("supernode-*.log"))) == 2
    for port in (superlink_port, *node_ports, probe_a, probe_b):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still listening"
