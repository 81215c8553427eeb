"""Frames leave the loaders as uint8: a model trained on loaders passed without their DataModule still sees
CLIP-normalised float frames (RetrievalModule.on_after_batch_transfer)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

from tests.data_fixtures import tiny_raw, tiny_root  # noqa: F401 - pytest fixtures
from tvr_bench.data.benchmarks.synthetic import SyntheticDataModule
from tvr_bench.data.transforms import normalize_batch
from tvr_bench.methods.clip4clip import CLIP4Clip


class FrameDtypes(L.Callback):
    """Record the dtype of the frames every training step receives."""

    def __init__(self) -> None:
        self.dtypes: list[torch.dtype] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.dtypes.append(batch["frames"].dtype)


def test_model_hook_normalises_like_the_datamodule(tiny_root: Path) -> None:  # noqa: F811
    dm = SyntheticDataModule(size="tiny", root=str(tiny_root), batch_size=4, num_workers=0, num_frames=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["frames"].dtype == torch.uint8
    model = CLIP4Clip(backbone="tiny")
    by_model = model.on_after_batch_transfer(batch, 0)
    by_datamodule = dm.on_after_batch_transfer(batch, 0)
    assert by_model["frames"].dtype == torch.float32
    assert torch.equal(by_model["frames"], by_datamodule["frames"])
    assert torch.equal(by_model["frames"], normalize_batch(batch)["frames"])
    again = model.on_after_batch_transfer(by_model, 0)  # already float: left as it is
    assert again["frames"] is by_model["frames"]


def test_fit_on_bare_loaders_gets_float_frames(tiny_root: Path, tmp_path: Path) -> None:  # noqa: F811
    dm = SyntheticDataModule(size="tiny", root=str(tiny_root), batch_size=4, num_workers=0, num_frames=4)
    dm.setup("fit")
    record = FrameDtypes()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[record], limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(CLIP4Clip(backbone="tiny"), train_dataloaders=dm.train_dataloader())
    assert record.dtypes == [torch.float32, torch.float32]
