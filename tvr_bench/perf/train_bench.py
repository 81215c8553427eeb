"""`tvr-bench perf` section `train`: steps/s of the Lightning module (Trainer.fit) vs a plain PyTorch loop over the
same model and the same in-memory batches, interleaved step by step (median of the paired step-time ratios)."""

from __future__ import annotations

import copy
import time
from typing import Any, Iterator

import numpy as np
import torch

from tvr_bench.perf.harness import TARGETS, PerfSizes, _mark, median


class _Batches:
    """A sized iterable over a fixed list of batches (Lightning treats a plain list as several loaders)."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.batches)


def _train_batches(n: int, batch_size: int, image_size: int = 64, frames: int = 12, seed: int = 0) -> list[dict[str, Any]]:
    """`n` synthetic training batches in the DataModule's format (normalised frames, captions, keys)."""
    g = torch.Generator().manual_seed(seed)
    words = "a the red blue green square circle moves left right up down then before after slowly quickly".split()
    rng = np.random.default_rng(seed)
    out = []
    for b in range(n):
        out.append({
            "frames": torch.randn(batch_size, frames, 3, image_size, image_size, generator=g),
            "frame_mask": torch.ones(batch_size, frames, dtype=torch.bool),
            "captions": [" ".join(rng.choice(words, size=int(rng.integers(5, 14)))) for _ in range(batch_size)],
            "video_key": [f"b{b}-{i}" for i in range(batch_size)],
        })  # fmt: skip
    return out


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(sizes: PerfSizes, accelerator: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Step time of Trainer.fit vs a plain PyTorch loop, interleaved step by step: two copies of one CLIP4Clip
    (tiny) init see the same batches; after each Lightning step, a callback runs the plain loop's step."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from tvr_bench.functional.losses import clamp_logit_scale_
    from tvr_bench.methods.clip4clip import CLIP4Clip

    torch.manual_seed(seed)
    template = CLIP4Clip(backbone="tiny", freeze="none", lr=5e-4, backbone_lr=5e-4)
    steps = sizes.train_warmup + sizes.train_steps
    batches = _train_batches(steps, sizes.train_batch, seed=seed)

    class PlainLoop:
        """The plain PyTorch training loop, one step per call, on its own copy of the model."""

        def __init__(self, device: torch.device) -> None:
            self.device = device
            self.model = copy.deepcopy(template).to(device).train()
            conf = self.model.configure_optimizers()
            self.opt, self.sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]

        def step(self, batch: dict[str, Any]) -> None:
            model = self.model
            frames, mask = batch["frames"].to(self.device), batch["frame_mask"].to(self.device)
            with torch.enable_grad():
                text = model.encode_text(**model.tokenize(batch["captions"]))
                video = model.encode_video(frames, mask)
                loss, _ = model.training_loss(text, video)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                self.opt.step()
                self.sched.step()
                clamp_logit_scale_(model.backbone.logit_scale, model.hparams.logit_scale_max)

    class PairedClock(Callback):
        """Times every Lightning step (between consecutive step starts, minus the plain step run in between)
        and runs + times the plain loop's step on the same batch right after it."""

        def __init__(self) -> None:
            self.starts: list[float] = []
            self.plain: list[float] = []
            self.loop: PlainLoop | None = None
            self.device = "cpu"

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            _sync(pl_module.device)
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if self.loop is None:
                self.loop = PlainLoop(pl_module.device)
                self.device = str(pl_module.device)
            _sync(pl_module.device)
            t0 = time.perf_counter()
            self.loop.step(batches[batch_idx])
            _sync(pl_module.device)
            self.plain.append(time.perf_counter() - t0)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            _sync(pl_module.device)
            self.starts.append(time.perf_counter())

    clock = PairedClock()
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, max_steps=steps, max_epochs=1, precision="32-true",
        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clock],
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer.fit(copy.deepcopy(template), train_dataloaders=_Batches(batches))
    wall = time.perf_counter() - t0
    s = clock.starts
    lightning = [b - a - p for a, b, p in zip(s, s[1:], clock.plain)][sizes.train_warmup :]
    plain = clock.plain[sizes.train_warmup :]
    ratios = [a / b for a, b in zip(lightning, plain)]
    overhead = median(ratios) - 1.0
    return {
        "model": "CLIP4Clip meanP, tiny CLIP preset (random init), all parameters trained",
        "device": clock.device,
        "batch_size": sizes.train_batch,
        "frames": 12,
        "image_size": 64,
        "timed_steps": sizes.train_steps,
        "warmup_steps": sizes.train_warmup,
        "lightning_steps_per_s": 1.0 / median(lightning),
        "plain_steps_per_s": 1.0 / median(plain),
        "overhead": overhead,
        "overhead_of_medians": median(lightning) / median(plain) - 1.0,
        "pair_ratios": [round(x, 4) for x in ratios],
        "step_seconds_all": {"lightning": [round(x, 4) for x in lightning], "plain": [round(x, 4) for x in plain]},
        "fit_wall_seconds": round(wall, 2),
        "targets_met": {"overhead": overhead <= TARGETS["train_overhead"]},
        "note": "overhead = median over steps of (Lightning step / plain step of the same batch) - 1. One Trainer.fit; "
                "after each of its steps a callback runs the plain loop's step on the same batch with a second "
                "copy of the same initial model, so both see the same phase of a noisy machine. Lightning step = "
                "time between consecutive step starts minus the plain step run in between (data fetch, forward, "
                "backward, clip, AdamW, scheduler, temperature clamp, plus its loop, hooks and 3 self.log calls); "
                "plain step = the same work in a bare loop. Warm-up steps dropped.",
    }  # fmt: skip


def render(t: dict[str, Any]) -> list[str]:
    """Markdown lines of the train section."""
    return [
        f"## Training loop ({t['model']}, batch {t['batch_size']} × 12 frames at 64 px, {t['device']})",
        "",
        f"Lightning {t['lightning_steps_per_s']:.2f} steps/s vs plain PyTorch {t['plain_steps_per_s']:.2f} steps/s "
        f"(median steps, interleaved step by step); overhead (median of the {len(t['pair_ratios'])} paired steps): "
        f"**{100 * t['overhead']:+.1f} %** (target ≤ 5 % {_mark(t['targets_met']['overhead'])}).",
        "",
    ]
