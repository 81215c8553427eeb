"""Frames leave the loaders as uint8: a model trained or tested on loaders passed without their DataModule
still encodes CLIP-normalised float frames (RetrievalModule.training_step / _eval_step normalise uint8 input)."""

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


class RecordingCLIP4Clip(CLIP4Clip):
    """CLIP4Clip that records the frames its encoder receives."""

    def encode_video(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        self.seen = [*getattr(self, "seen", []), frames.detach().clone()]
        return super().encode_video(frames, frame_mask)


def _datamodule(root: Path) -> SyntheticDataModule:
    dm = SyntheticDataModule(size="tiny", root=str(root), batch_size=4, eval_batch_size=4, num_workers=0, num_frames=4)
    dm.setup("fit")
    return dm


def test_steps_normalise_uint8_frames_like_the_datamodule(tiny_root: Path) -> None:  # noqa: F811
    dm = _datamodule(tiny_root)
    batch = next(iter(dm.train_dataloader()))
    assert batch["frames"].dtype == torch.uint8
    expected = dm.on_after_batch_transfer(batch, 0)["frames"]
    assert torch.equal(expected, normalize_batch(batch)["frames"])
    model = RecordingCLIP4Clip(backbone="tiny")
    model.training_step(batch, 0)
    eval_batch = next(iter(dm.val_dataloader()))
    model._eval_step(eval_batch)
    assert model.seen[0].dtype == torch.float32 and torch.equal(model.seen[0], expected)
    assert torch.equal(model.seen[1], normalize_batch(eval_batch)["frames"])


def test_fit_on_bare_loaders_encodes_float_frames(tiny_root: Path, tmp_path: Path) -> None:  # noqa: F811
    dm = _datamodule(tiny_root)
    model = RecordingCLIP4Clip(backbone="tiny")
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, train_dataloaders=dm.train_dataloader())
    assert [f.dtype for f in model.seen] == [torch.float32, torch.float32]
