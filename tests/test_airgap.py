"""The air-gapped install script reassembles split files and refuses damaged ones (docs/gpu.md)."""

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bundle(tmp_path: Path) -> Path:
    bundle = tmp_path / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    (bundle / "parts").mkdir()
    payload = bytes(range(256)) * 40  # 10,240 bytes, split in three parts as airgap_bundle.sh does
    (bundle / "SHA256SUMS").write_text(f"{hashlib.sha256(payload).hexdigest()}  wheels/big-1.0-py3-none-any.whl\n")
    for i, start in enumerate(range(0, len(payload), 4096)):
        (bundle / "parts" / f"big-1.0-py3-none-any.whl.part{i:03d}").write_bytes(payload[start:start + 4096])
    (bundle / "parts" / "SPLIT").write_text("wheels/big-1.0-py3-none-any.whl\n")
    sums = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  ./{p.name}\n" for p in sorted((bundle / "parts").glob("*.part*")))
    (bundle / "parts" / "PARTSUMS").write_text(sums)
    shutil.copy(ROOT / "scripts" / "airgap_install.sh", bundle / "install.sh")
    return bundle


def _install(bundle: Path, python: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(bundle / "install.sh"), str(bundle.parent / "venv"), str(bundle.parent / "src")],
                          env={"PATH": "/usr/bin:/bin", "PYTHON": python, "HOME": str(bundle.parent)},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils' sha256sum")
def test_split_files_are_reassembled_and_checked(tmp_path):
    bundle = _bundle(tmp_path)
    no_torch = tmp_path / "python-without-torch"
    no_torch.write_text("#!/bin/sh\nexec /usr/bin/env python3 -I -S \"$@\"\n")  # -S: no site-packages, no torch
    no_torch.chmod(0o755)
    res = _install(bundle, str(no_torch))
    assert (bundle / "wheels" / "big-1.0-py3-none-any.whl").stat().st_size == 10_240  # put back together
    assert res.returncode == 2 and "has no torch/transformers" in res.stderr, res.stderr

    part = bundle / "parts" / "big-1.0-py3-none-any.whl.part001"
    part.write_bytes(b"x" + part.read_bytes()[1:])  # one damaged byte in transit
    res = _install(bundle, sys.executable)
    assert res.returncode == 1 and "copy them again" in res.stderr and "part001: FAILED" in res.stdout, res.stderr
    (bundle / "parts" / "PARTSUMS").unlink()  # an older bundle: the whole-file checksum still catches it
    res = _install(bundle, sys.executable)
    assert res.returncode == 1 and "checksum mismatch" in res.stderr, res.stderr
