"""Session-wide tiny synthetic data for the data tests (built once per session, shared by modules).

Import the fixtures into a test module with ``from tests.data_fixtures import tiny_raw, tiny_root``.
The build is cached per pytest base temp directory, so several modules importing the fixtures do not
generate the data twice.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest

from tvr_bench.data.benchmarks.synthetic import build_synthetic


@lru_cache(maxsize=None)
def _build(base: str) -> Path:
    """Generate the tiny synthetic videos and prepare its shards under ``base`` (once)."""
    root = Path(base) / "synthetic-tiny"
    build_synthetic(root, size="tiny", synth_seed=0, workers=2, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared tiny synthetic shards (train 48 in 3 shards, val 16, test 16); treat as read-only."""
    return _build(str(tmp_path_factory.getbasetemp() / "tvr-data"))


@pytest.fixture(scope="session")
def tiny_raw(tiny_root: Path) -> Path:
    """The generated raw tiny set: ``videos/*.mp4`` and ``annotations.json``; treat as read-only."""
    return tiny_root / "raw"
