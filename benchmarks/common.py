"""What the benchmark scripts share: where results go, and how a result file is written.

Run a benchmark as ``.venv/bin/python benchmarks/NAME.py``; Python puts this folder first on the path,
so a script imports ``from common import ...``. Nothing here imports tests/ or a private name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedalign_moe.files import write_atomic
from fedalign_moe.runlog import dumps

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """A markdown table (what docs/ quote from a benchmark's output)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def write_result(path: Path, obj: Any, indent: int = 1) -> Path:
    """``obj`` as strict JSON (non-finite numbers as null), written whole; the folder is made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, dumps(obj, indent=indent) + "\n")
    return path
