"""Writing files whole, and keeping what is costly to compute on disk.

``replace_atomically``: every file (or folder) this package writes that another process, or a reader
after a kill, may open: it appears whole or not at all. ``load_or_build``: the package's disk caches (the
built models, the frozen prefix's hidden states, dequantised checkpoints), all the same way: a copy that
is missing, unreadable or not what is expected is built again, and a disk that cannot keep the new one
costs the next run the time, never this run its result. Imports nothing of the package.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a file (or a folder) beside ``path``, then rename it over ``path``: a reader sees the old
    one or the new one, never a part. A folder replaces the folder there."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)  # os.replace does not replace a folder that holds files
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def write_atomic(path: Path, text: str) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(text))


def load_or_build(path: Path | None, load: Callable[[Path], T | None], build: Callable[[], T],
                  save: Callable[[T, Path], None], what: str) -> tuple[T, bool]:
    """(the value, whether it came from ``path``). ``load(path)`` returns None for a copy that is not what
    is expected (it is built again, with a warning), and may raise for an unreadable one (the same);
    ``save(value, tmp)`` writes it, atomically replaced over ``path``; a save that fails for want of disk
    keeps nothing and this run goes on. ``path`` None: build, keep nothing."""
    if path is not None and path.exists():
        try:
            value = load(path)
            if value is not None:
                return value, True
            logger.warning("the cached %s in %s is not what this run expects: building it again", what, path)
        except Exception as err:  # noqa: BLE001 - a damaged file raises whatever its reader raises
            logger.warning("the cached %s in %s is unreadable (%s): building it again", what, path, err)
    value = build()
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_atomically(path, lambda tmp: save(value, tmp))
        except (OSError, RuntimeError) as err:  # full or read-only disk (torch.save raises RuntimeError): this run goes on
            logger.warning("the %s is not kept in %s: %s", what, path.parent, err)
    return value, False
