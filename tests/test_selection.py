"""Reference model selection (tvr_bench/callbacks/selection.py) against the references' own selection rules."""

from __future__ import annotations

from collections import deque

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tvr_bench.callbacks.selection import SelectionCheckpoint, WindowedMetric, window_mean


def reference_window_choice(values: list[float], window: int = 5) -> int:
    """Index of the evaluation X-Pool / T-MASS keep: `deque(maxlen=window)`, save when the mean is `>` the best."""
    history: deque[float] = deque(maxlen=window)
    best, chosen = -1.0, -1
    for i, v in enumerate(values):
        history.append(v)
        mean = float(np.mean(history))
        if mean > best:
            best, chosen = mean, i
    return chosen


def reference_epoch_choice(values: list[float]) -> int:
    """Index of the epoch CLIP4Clip / DRL keep: `if best_score <= R1` with best_score starting at 1e-5."""
    best, chosen = 0.00001, -1
    for i, v in enumerate(values):
        if best <= v:
            best, chosen = v, i
    return chosen


class ScriptedModule(L.LightningModule):
    """Trains nothing useful; each validation logs the next value of a scripted `val/t2v/R@1` sequence."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.values = list(values)
        self.val_steps: list[int] = []

    def training_step(self, batch, batch_idx):
        return (self.w * batch[0]).sum() * 0.0 + self.w.sum() * 0.0

    def validation_step(self, batch, batch_idx):
        return None

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_steps.append(self.global_step)
        self.log("val/t2v/R@1", self.values[len(self.val_steps) - 1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _loader(n: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.ones(n, 1)), batch_size=1)


def _fit(tmp_path, module, callbacks, n_train: int, epochs: int, val_check_interval: float = 1.0) -> L.Trainer:
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=epochs,
        val_check_interval=val_check_interval,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
    )
    trainer.fit(module, train_dataloaders=_loader(n_train), val_dataloaders=_loader(1))
    return trainer


def test_window_mean_is_the_reference_deque_mean():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    history: deque[float] = deque(maxlen=5)
    for i, v in enumerate(values):
        history.append(v)
        assert window_mean(values[: i + 1], 5) == pytest.approx(float(np.mean(history)))
    with pytest.raises(ValueError, match="window must be at least 1"):
        window_mean(values, 0)


def test_window_selection_keeps_the_reference_checkpoint(tmp_path):
    # 2 epochs x 10 evaluations: the best single value (9.9 at eval 3) is not where the best window ends.
    values = [1.0, 2.0, 9.9, 1.0, 1.0, 5.0, 5.5, 6.0, 6.0, 5.8] + [6.1, 6.2, 0.5, 6.3, 6.4, 6.5, 6.0, 1.0, 1.0, 1.0]
    module = ScriptedModule(values)
    ckpt = SelectionCheckpoint(monitor="val/t2v/R@1_window5", mode="max", save_top_k=1, filename="best-{epoch}-{step}")
    trainer = _fit(tmp_path, module, [WindowedMetric(window=5), ckpt], n_train=20, epochs=2, val_check_interval=0.1)
    assert len(module.val_steps) == 20  # 10 evaluations per epoch, as `--evals_per_epoch 10`
    chosen = reference_window_choice(values)
    assert chosen != int(np.argmax(values))
    assert f"step={module.val_steps[chosen]}" in ckpt.best_model_path
    assert float(ckpt.best_model_score) == pytest.approx(window_mean(values[: chosen + 1], 5))
    assert float(trainer.callback_metrics["val/t2v/R@1_window5"]) == pytest.approx(window_mean(values, 5))


def test_lightning_evaluates_ten_times_per_epoch_like_the_reference():
    # The reference evaluates at np.linspace(0, n - 1, 11, dtype=int)[1:]; Lightning with val_check_interval 0.1
    # every int(0.1 n) batches. Same count for every epoch length of a real benchmark (n >= 100), and each
    # evaluation at most 10 batches earlier than the reference's.
    for n in (100, 137, 281, 1004, 5625, 37_000):
        ref = np.linspace(0, n - 1, 11, dtype=int)[1:]
        every = int(n * 0.1)
        ours = np.array([b for b in range(n) if (b + 1) % every == 0])
        assert len(ours) == len(ref) == 10, n
        assert ((ref - ours) >= 0).all() and ((ref - ours) <= 10).all(), n


def test_ties_last_keeps_the_later_epoch_as_clip4clip(tmp_path):
    values = [2.0, 4.0, 4.0, 3.0]
    module = ScriptedModule(values)
    ckpt = SelectionCheckpoint(monitor="val/t2v/R@1", mode="max", save_top_k=1, ties="last", filename="best-{epoch}")
    _fit(tmp_path / "last", module, [ckpt], n_train=2, epochs=4)
    assert reference_epoch_choice(values) == 2
    assert "epoch=2" in ckpt.best_model_path
    # Lightning's own rule (ties="first") keeps epoch 1: the difference the option exists for
    module = ScriptedModule(values)
    first = SelectionCheckpoint(monitor="val/t2v/R@1", mode="max", save_top_k=1, filename="best-{epoch}")
    _fit(tmp_path / "first", module, [first], n_train=2, epochs=4)
    assert "epoch=1" in first.best_model_path


def test_window_state_survives_a_checkpoint():
    cb = WindowedMetric(window=3)
    cb.history.extend([1.0, 2.0, 3.0, 4.0])
    state = cb.state_dict()
    assert state == {"history": [2.0, 3.0, 4.0]}
    fresh = WindowedMetric(window=3)
    fresh.load_state_dict(state)
    fresh.history.append(8.0)
    assert window_mean(list(fresh.history), 3) == pytest.approx(5.0)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="window must be at least 1"):
        WindowedMetric(window=0)
    with pytest.raises(ValueError, match="ties must be 'first' or 'last'"):
        SelectionCheckpoint(monitor="val/t2v/R@1", ties="middle")  # type: ignore[arg-type]


def test_missing_metric_names_what_was_logged(tmp_path):
    class Silent(ScriptedModule):
        def on_validation_epoch_end(self) -> None:
            self.log("val/other", 1.0)

    with pytest.raises(KeyError, match="val/t2v/R@1.*val/other"):
        _fit(tmp_path, Silent([]), [WindowedMetric(window=5)], n_train=2, epochs=1)
