"""Where the shipped model and the shared data live."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path(__file__).resolve().parent / "assets" / "tiny-moe"


def shared_data_dir() -> Path:
    """../shared/data beside the repository (override with EXPERTMESH_SHARED_DATA)."""
    path = Path(os.environ.get("EXPERTMESH_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        raise FileNotFoundError(
            f"shared data not found at {path}: place the project's shared/ folder beside the repository "
            "(or set EXPERTMESH_SHARED_DATA to its data/ folder)"
        )
    return path
