"""Tiny stand-ins for a retrieval method, a datamodule and the evaluator (leaderboard and W&B tests)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

TOY_METRICS = {
    "t2v/R@1": 40.0, "t2v/R@5": 70.0, "t2v/R@10": 80.0, "t2v/MdR": 2.0, "t2v/MnR": 10.0,
    "v2t/R@1": 38.0, "v2t/R@5": 68.0, "v2t/R@10": 79.0, "v2t/MdR": 2.0, "v2t/MnR": 11.0,
}


class ToyMethod(L.LightningModule):
    """A linear 'method' with the attributes the leaderboard reads (method_name, backbone, max_words)."""

    def __init__(self, backbone: str = "tiny", max_words: int = 8, lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(4, 3)

    @property
    def method_name(self) -> str:
        """Name used in the leaderboard."""
        return "toymethod"

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Mean output as the loss."""
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Nothing to collect."""

    def on_validation_epoch_end(self) -> None:
        """A validation recall that gets worse: 50, 30, ... (the W&B summary must keep the best)."""
        self.log("val/t2v/R@1", 50.0 - 20.0 * self.current_epoch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Nothing to collect."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Plain SGD."""
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class ToyDataModule(L.LightningDataModule):
    """Random tensors; `dataset` and `num_frames` like RetrievalDataModule."""

    def __init__(self, dataset: str = "toyset", num_frames: int = 4, n: int = 24, batch_size: int = 8):
        super().__init__()
        self.save_hyperparameters()
        self.dataset = dataset
        self.num_frames = num_frames
        self.n = n
        self.batch_size = batch_size

    def _loader(self) -> DataLoader:
        data = torch.randn(self.n, 4, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(data), batch_size=self.batch_size)

    def train_dataloader(self) -> DataLoader:
        """Training batches."""
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        """Validation batches."""
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        """Test batches."""
        return self._loader()


class FakeEvaluator(L.Callback):
    """Sets `last_metrics` / `last_counts` / `last_eval_seconds` at the end of each test, like RetrievalEvaluator."""

    def __init__(self, metrics: dict[str, float] | None = None, dsl: bool = False, shift: float = 0.0):
        super().__init__()
        self.metrics = dict(metrics or TOY_METRICS)
        self.dsl = dsl
        self.shift = shift
        self.last_metrics: dict[str, float] = {}
        self.last_counts: dict[str, int] = {}
        self.last_eval_seconds = 0.0

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Publish the toy metrics."""
        metrics = {k: v + self.shift for k, v in self.metrics.items()}
        if self.dsl:
            metrics.update({f"dsl/{k}": v + 1.0 for k, v in self.metrics.items()})
        self.last_metrics = metrics
        self.last_counts = {"texts": 24, "videos": 12}
        self.last_eval_seconds = 0.01


def fake_result(method: str, dataset: str, backbone: str, seed: int, t2v_r1: float, **extra: Any) -> dict[str, Any]:
    """A minimal valid result JSON as LeaderboardWriter writes it."""
    metrics = dict(TOY_METRICS, **{"t2v/R@1": t2v_r1, "v2t/R@1": t2v_r1 - 1.0})
    result = {
        "schema": "tvr-bench/result/v1",
        "method": method, "dataset": dataset, "backbone": backbone, "backbone_source": backbone,
        "frames": 12, "words": 32, "seed": seed,
        "metrics": metrics, "dsl_metrics": None,
        "params": {"total": 1_500_000, "trainable": 1_000_000},
        "train": {"seconds": 10.0 + seed, "pairs_per_s": 100.0 + seed},
        "eval": {"seconds": 2.0, "ms_per_query": 4.0, "texts": 500, "videos": 100},
        "git": {"commit": "0123456789abcdef0123456789abcdef01234567", "dirty": False},
        "timestamp": f"2026-01-0{seed + 1}T00:00:00+00:00",
        "device": {"name": "cpu"},
    }
    result.update(extra)
    return result


def write_results(runs: Path, results: list[dict[str, Any]]) -> None:
    """Write result dicts as runs/results/*.json."""
    folder = runs / "results"
    folder.mkdir(parents=True, exist_ok=True)
    for r in results:
        (folder / f"{r['method']}__{r['dataset']}__{r['backbone'].replace('/', '-')}__seed{r['seed']}.json").write_text(
            json.dumps(r)
        )
