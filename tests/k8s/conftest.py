"""The CRDs live beside the repository (`../shared/crds`, or `$LUMOS_CRDS_DIR`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def crds_dir() -> Path:
    path = Path(os.environ.get("LUMOS_CRDS_DIR") or REPO_ROOT.parent / "shared" / "crds")
    if not path.is_dir():
        pytest.skip(f"CRD directory {path} not found (set LUMOS_CRDS_DIR)")
    return path
