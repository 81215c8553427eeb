"""Shared fixtures: parity vectors, offline W&B, small threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def parity_dir() -> Path:
    """Directory of the reference-code vectors: $TVR_PARITY_DIR or ../shared/parity."""
    return Path(os.environ.get("TVR_PARITY_DIR", REPO_ROOT.parent / "shared" / "parity"))


#: Float tolerance of the parity README ("compare floats with atol=1e-5") unless a file sets `atol`.
DEFAULT_PARITY_ATOL = 1e-5
#: The reference repos' metric names -> ours (X-Pool / T-MASS `t2v_metrics`, CLIP4Clip `compute_metrics`).
REFERENCE_METRIC_KEYS = {"R1": "R@1", "R5": "R@5", "R10": "R@10", "MedR": "MdR", "MeanR": "MnR"}


def parity_atol(blob: dict) -> float:
    """The tolerance a parity case asks for, or the README's default."""
    return float(blob.get("atol", DEFAULT_PARITY_ATOL))


def load_parity(name: str) -> dict:
    """Load one parity file with weights_only=True, or skip the test with the reason."""
    path = parity_dir() / name
    if not path.exists():
        pytest.skip(f"parity file {path} not found (set TVR_PARITY_DIR)")
    return torch.load(path, weights_only=True)


@pytest.fixture(autouse=True)
def _isolated_wandb(tmp_path, monkeypatch):
    """Keep W&B off the network and out of the home directory in every test."""
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_MODE", os.environ.get("WANDB_MODE", "disabled"))
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _fresh_short_video_warnings(monkeypatch):
    """Give every test the full quota of 'fewer frames than asked' warnings (a per-process counter)."""
    from tvr_bench.data import streams

    monkeypatch.setattr(streams, "_short_warned", 0)
