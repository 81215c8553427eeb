"""Model selection as the reference code does it: a moving window of evaluations and tie-breaking.

The shared recipes select the checkpoint with ``ModelCheckpoint`` on ``val/t2v/R@1`` (strictly better
replaces, so on a tie the earlier evaluation is kept). The references differ in two ways, reproduced by
the two callbacks here (recipes/selection/reference_<method>.yaml stacks them):

* X-Pool and T-MASS evaluate 10 times per epoch and keep the model whose *window* average is best: the
  mean t2v R@1 of the last ``eval_window_size`` = 5 evaluations, the current one included, with the
  window running across epoch boundaries and holding fewer values at the start (a ``deque(maxlen=5)``
  created once per run; layer6ai-labs/xpool ``trainer/trainer.py`` L27, L162-168, L86-88). The kept
  checkpoint is the model at the end of the best window, and the number reported is that model's own
  test R@1 (``test.py`` with ``--load_epoch -1``), not the window mean.
* CLIP4Clip and DRL evaluate once per epoch and replace the best on ``best_score <= R1``: on a tie the
  *later* epoch wins (ArrowLuo/CLIP4Clip ``main_task_retrieval.py`` L566-567; foolwood/DRL ``main.py`` L517-525).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only


def window_mean(history: list[float], window: int) -> float:
    """Mean of the last ``window`` values of ``history`` (all of them while fewer exist)."""
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    if not history:
        raise ValueError("window_mean of an empty history")
    tail = history[-window:]
    return float(sum(tail) / len(tail))


class WindowedMetric(Callback):
    """After each validation, publish the mean of ``monitor`` over the last ``window`` validations.

    The value is written to ``trainer.callback_metrics[name]`` (default ``<monitor>_window<window>``) before
    any ``ModelCheckpoint`` runs (Lightning orders checkpoint callbacks last), so a checkpoint callback can
    monitor it; it is also sent to the loggers. The history is part of the checkpoint, so a resumed fit
    continues the same window. Sanity-check validations are ignored.
    """

    def __init__(self, monitor: str = "val/t2v/R@1", window: int = 5, name: str | None = None) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"WindowedMetric: window must be at least 1, got {window}")
        self.monitor = monitor
        self.window = window
        self.name = name or f"{monitor}_window{window}"
        self.history: deque[float] = deque(maxlen=window)

    @property
    def state_key(self) -> str:
        """One state entry per (monitor, window) pair."""
        return self._generate_state_key(monitor=self.monitor, window=self.window)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Append this validation's value and publish the window mean."""
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise KeyError(
                f"WindowedMetric: the metric {self.monitor!r} was not logged by this validation "
                f"(logged: {', '.join(sorted(trainer.callback_metrics)) or 'none'})"
            )
        self.history.append(float(value))
        mean = window_mean(list(self.history), self.window)
        trainer.callback_metrics[self.name] = torch.tensor(mean, dtype=torch.float64)
        self._log(trainer, mean)

    @rank_zero_only
    def _log(self, trainer: L.Trainer, mean: float) -> None:
        for logger in trainer.loggers:
            logger.log_metrics({self.name: mean}, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        """The values currently in the window (plain floats: loads with ``weights_only=True``)."""
        return {"history": [float(v) for v in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the window of a resumed fit."""
        self.history = deque((float(v) for v in state_dict.get("history", [])), maxlen=self.window)


class SelectionCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``ties`` argument chooses which of two equal scores is kept.

    ``ties="first"`` is Lightning's behaviour (a new score must be strictly better); ``ties="last"``
    replaces the kept checkpoint on an equal score too, as CLIP4Clip and DRL do (``best_score <= R1``).
    """

    def __init__(self, *args: Any, ties: Literal["first", "last"] = "first", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if ties not in ("first", "last"):
            raise ValueError(f"SelectionCheckpoint: ties must be 'first' or 'last', got {ties!r}")
        self.ties = ties

    def check_monitor_top_k(self, trainer: L.Trainer, current: torch.Tensor | None = None) -> bool:
        """As ModelCheckpoint, but an equal score also replaces the kept one with ``ties='last'``."""
        if self.ties == "first" or current is None or self.save_top_k == -1:
            return super().check_monitor_top_k(trainer, current)
        if len(self.best_k_models) < self.save_top_k:
            return True
        op = {"min": torch.le, "max": torch.ge}[self.mode]
        decision = bool(op(current, self.best_k_models[self.kth_best_model_path]))
        return trainer.strategy.reduce_boolean_decision(decision)
