"""Every name a benchmark script imports from the package exists (the scripts run only by hand)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))
OLD_VERSIONS = {("gpu_tier_ab.py", "_select_trainable")}  # imported from older snapshots of the package by design


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_the_package_names_a_benchmark_imports_exist(script):
    missing = []
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fedalign_moe"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                if hasattr(module, alias.name) or (script.name, alias.name) in OLD_VERSIONS:
                    continue
                try:  # a submodule
                    importlib.import_module(f"{node.module}.{alias.name}")
                except ModuleNotFoundError:
                    missing.append(f"{node.module}.{alias.name}")
    assert not missing, f"{script.name} imports {missing}"
