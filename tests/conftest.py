"""Shared pytest fixtures."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ``shared/`` directory (conformance data, samples, docs).

    The repository is checked out next to it (``/somewhere/main`` and
    ``/somewhere/shared``); tests that need it are skipped where it is absent.
    """
    path = Path(__file__).resolve().parents[2] / "shared"
    if not path.is_dir():
        pytest.skip(f"shared data directory not found at {path}")
    return path
