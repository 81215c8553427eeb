"""A callback for the DDP training smoke test: records what each rank's `training_loss` receives.

Loaded by the `tvr-bench fit` subprocesses of tests/test_ddp.py through a config file
(`class_path: tests.ddp_probe.GlobalBatchProbe`, with the repository root on PYTHONPATH). It wraps the
module's `training_loss` so every call records the number of rows of each feature tensor, whether
they carry gradients, the local batch size and the loss value; each rank writes `rank<k>.json`.

Run as a script (`python -m tests.ddp_probe --out DIR --methods clip4clip,xpool`), it is the gradient
probe of tests/test_ddp.py: every process builds each method from its recipe (tiny backbone), takes its
contiguous slice of one fixed global batch, runs one training step (plain Lightning, 1 process or DDP
processes started by the test with RANK / LOCAL_RANK / WORLD_SIZE set) and saves the parameter
gradients right before the optimiser step (after DDP's averaging, before any clipping) to
`<out>/<name>_rank<k>.pt`. `--reference-gather` adds `<method>_refgather` runs whose gather backward
returns only the local slice of the gradient, as the references' AllGather does.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml


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


class TrainRecorder(L.Callback):
    """Records every training batch this rank trains on (video keys and captions, per step) and saves the final
    parameters: `<out_dir>/batches_rank<k>.json` and `<out_dir>/weights_rank<k>.pt` (tests/test_ddp.py compares a
    2-process fit with a 1-process fit at the same global batch)."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        """Remember the batch's keys and captions."""
        self.steps.append({"epoch": trainer.current_epoch, "batch_idx": batch_idx, "keys": list(batch["video_key"]),
                           "captions": list(batch["captions"])})  # fmt: skip

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Write this rank's batches and parameters."""
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rank = trainer.global_rank
        (out / f"batches_rank{rank}.json").write_text(json.dumps({"world_size": trainer.world_size, "steps": self.steps}))
        torch.save({k: v.detach().cpu() for k, v in pl_module.state_dict().items()}, out / f"weights_rank{rank}.pt")


# ---------------------------------------------------------------------- gradient probe (script)
REPO = Path(__file__).resolve().parents[1]
#: Global batch of the gradient probe: 8 pairs of 4 frames at the tiny backbone's 64 px.
GLOBAL_BATCH, FRAMES, SIZE = 8, 4, 64
WORDS = ["a", "dog", "runs", "on", "red", "grass", "cat", "sleeps", "blue", "car", "man", "sings"]


class GradientDump(L.Callback):
    """Saves every trainable parameter's gradient right before the first optimiser step."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Same random state in every run before the step (DDP's setup reseeds, a single process does not)."""
        torch.manual_seed(0)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        """Write {name: grad} (DDP has averaged them; clipping comes after this hook)."""
        if trainer.global_step == 0:
            grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
            torch.save(grads, self.path)


class _LocalSliceGather(torch.autograd.Function):
    """The references' AllGather: forward gathers every rank's rows, backward returns only this rank's rows."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        out = [torch.empty_like(tensor) for _ in range(world)]
        torch.distributed.all_gather(out, tensor.contiguous())
        ctx.rows = (rank * tensor.shape[0], (rank + 1) * tensor.shape[0])
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad[ctx.rows[0] : ctx.rows[1]]


def reference_gather(feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`gather_features` with the references' local-slice backward (masks and other non-float tensors without gradients)."""
    out = {}
    for key, value in feats.items():
        if value.is_floating_point():
            out[key] = _LocalSliceGather.apply(value)
        else:
            parts = [torch.empty_like(value) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(parts, value.contiguous())
            out[key] = torch.cat(parts, dim=0)
    return out


def build_method(recipe: str) -> L.LightningModule:
    """The model of `recipes/methods/<recipe>.yaml` on the tiny backbone, sized for the probe batch."""
    conf = yaml.safe_load((REPO / "recipes" / "methods" / f"{recipe}.yaml").read_text())["model"]
    module, _, name = conf["class_path"].rpartition(".")
    args = dict(conf.get("init_args") or {})
    args.update(backbone="tiny", max_words=16)
    if "num_frames" in args:  # a model sized by the frame count (T-MASS radius head, X-CLIP frame matrices)
        args["num_frames"] = FRAMES
    return getattr(importlib.import_module(module), name)(**args)


def global_batch() -> dict[str, Any]:
    """One fixed batch of GLOBAL_BATCH (caption, frames) pairs, identical in every process."""
    g = torch.Generator().manual_seed(1234)
    captions = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (6,), generator=g)) for _ in range(GLOBAL_BATCH)]
    frames = torch.randn(GLOBAL_BATCH, FRAMES, 3, SIZE, SIZE, generator=g)
    mask = torch.ones(GLOBAL_BATCH, FRAMES, dtype=torch.bool)
    mask[1, -1] = False  # one padded frame
    return {"captions": captions, "frames": frames, "frame_mask": mask, "video_key": [f"v{i}" for i in range(GLOBAL_BATCH)]}


def local_slice(batch: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """Rows rank*B/W .. (rank+1)*B/W of the global batch, so the gathered batch is the global batch in order."""
    size = GLOBAL_BATCH // world
    rows = slice(rank * size, (rank + 1) * size)
    return {k: v[rows] for k, v in batch.items()}


def probe_gradients(recipe: str, out: Path, world: int, rank: int, reference: bool = False) -> None:
    """One training step of `recipe` on this process's slice; gradients to `<out>/<recipe>[_refgather]_rank<k>.pt`."""
    L.seed_everything(0, verbose=False)
    model = build_method(recipe)
    if reference:
        model.gather_features = reference_gather  # type: ignore[method-assign]
    name = f"{recipe}_refgather" if reference else recipe
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", max_steps=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(out),
        callbacks=[GradientDump(out / f"{name}_rank{rank}.pt")],
    )  # fmt: skip
    loader = torch.utils.data.DataLoader([local_slice(global_batch(), rank, world)], batch_size=None)
    trainer.fit(model, train_dataloaders=loader)


def main(argv: list[str] | None = None) -> None:
    """Gradient probe entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--methods", required=True, help="comma-separated recipe stems of recipes/methods/")
    parser.add_argument("--reference-gather", default="", help="comma-separated recipes to rerun with the local-slice gather")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    # read once: Lightning's environment deletes WORLD_SIZE from os.environ when a fit ends
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    for recipe in filter(None, args.methods.split(",")):
        probe_gradients(recipe, args.out, world, rank)
    for recipe in filter(None, args.reference_gather.split(",")):
        probe_gradients(recipe, args.out, world, rank, reference=True)


if __name__ == "__main__":
    main()
