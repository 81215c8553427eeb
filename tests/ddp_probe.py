"""A callback for the DDP training smoke test: records what each rank's `training_loss` receives.

Loaded by the `tvr-bench fit` subprocesses of tests/test_ddp.py through a config file
(`class_path: tests.ddp_probe.GlobalBatchProbe`, with the repository root on PYTHONPATH). It wraps the
module's `training_loss` so every call records the number of rows of each feature tensor, whether
they carry gradients, the local batch size and the loss value; each rank writes `rank<k>.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L


class GlobalBatchProbe(L.Callback):
    """Wraps `training_loss` to log the gathered batch each rank's loss is computed on."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.records: list[dict[str, Any]] = []
        self._local = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Install the wrapper around the module's `training_loss`."""
        inner = pl_module.training_loss

        def wrapped(text: dict, video: dict) -> Any:
            loss, extra = inner(text, video)
            self.records.append(
                {
                    "local_batch": self._local,
                    "text_rows": {k: int(v.shape[0]) for k, v in text.items()},
                    "video_rows": {k: int(v.shape[0]) for k, v in video.items()},
                    "requires_grad": all(v.requires_grad for v in (*text.values(), *video.values()) if v.is_floating_point()),
                    "loss": float(loss.detach()),
                }
            )
            return loss, extra

        pl_module.training_loss = wrapped  # type: ignore[method-assign]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        """Remember the size of this rank's local batch."""
        self._local = len(batch["captions"])

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write this rank's records to `<out_dir>/rank<k>.json`."""
        path = Path(self.out_dir) / f"rank{trainer.global_rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"world_size": trainer.world_size, "records": self.records}
        path.write_text(json.dumps(payload, indent=1), encoding="utf-8")
