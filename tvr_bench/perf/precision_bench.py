"""`make perf` section `precision`: training steps/s at `32-true` vs `bf16-mixed`, and the GPU feed on paper.

On a CUDA machine the same CLIP4Clip (meanP) model with the CLIP ViT-B/32 architecture (`vit-b32-random`:
random init, built offline) is trained by Lightning for a few steps at each precision, on identical in-memory
batches of 12 frames at 224 px already on the GPU (so the loader is out of the measurement), rounds
alternating between the two precisions; the section reports steps/s and clips/s of each and their ratio. On
a machine without CUDA it reports "no CUDA" and measures nothing (CPU bf16 autocast is not the point).

`gpu_feed` turns a GPU's consumption (clips/s) and the DataModule's per-core rate (the data section's
0-worker clips/s: decoding in the main process = one core) into the number of loader workers that feed it.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch

#: Clips/s of 12 frames one H100 consumes training CLIP B/32 (issue 15's planning figure).
H100_CLIPS_PER_S = 250.0


def gpu_feed(gpu_clips_per_s: float, per_core_clips_per_s: float | None) -> dict[str, Any]:
    """Workers needed to feed `gpu_clips_per_s` at the DataModule's per-core rate (None when the rate is unknown)."""
    out: dict[str, Any] = {"gpu_clips_per_s": gpu_clips_per_s, "per_core_clips_per_s": per_core_clips_per_s}
    if per_core_clips_per_s and per_core_clips_per_s > 0:
        out["workers"] = math.ceil(gpu_clips_per_s / per_core_clips_per_s)
        out["cores_busy"] = gpu_clips_per_s / per_core_clips_per_s
    return out


def _batches(n: int, batch_size: int, frames: int, size: int, device: torch.device, seed: int) -> list[dict[str, Any]]:
    """`n` training batches in the DataModule's format (normalised float frames), already on `device`."""
    g = torch.Generator().manual_seed(seed)
    words = "a the red blue green square circle moves left right up down then before after slowly quickly".split()
    out = []
    for b in range(n):
        idx = torch.randint(len(words), (batch_size, 8), generator=g)
        out.append({
            "frames": torch.randn(batch_size, frames, 3, size, size, generator=g).to(device),
            "frame_mask": torch.ones(batch_size, frames, dtype=torch.bool, device=device),
            "captions": [" ".join(words[int(i)] for i in row) for row in idx],
            "video_key": [f"b{b}-{i}" for i in range(batch_size)],
        })  # fmt: skip
    return out


def _sync() -> None:
    """Wait for queued GPU work (no-op without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _steps_per_s(
    precision: str, backbone: str, batches: list[dict[str, Any]], warmup: int, accelerator: str = "gpu"
) -> float:
    """Median steps/s of Trainer.fit over `batches` at `precision` (first `warmup` steps dropped)."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from tvr_bench.methods.clip4clip import CLIP4Clip

    class Clock(Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            _sync()
            self.starts.append(time.perf_counter())

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            _sync()
            self.starts.append(time.perf_counter())

    class Batches:
        def __len__(self) -> int:
            return len(batches)

        def __iter__(self):  # noqa: ANN204 - a plain iterator
            return iter(batches)

    torch.manual_seed(0)
    model = CLIP4Clip(backbone=backbone, freeze="none", lr=1e-5, backbone_lr=1e-6)
    clock = Clock()
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, precision=precision, max_steps=len(batches), max_epochs=1, gradient_clip_val=1.0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clock],
    )  # fmt: skip
    trainer.fit(model, train_dataloaders=Batches())
    steps = [b - a for a, b in zip(clock.starts, clock.starts[1:])][warmup:]
    return 1.0 / statistics.median(steps)


def bench_precision(
    quick: bool = False, per_core_clips_per_s: float | None = None, per_core_source: str = "1 worker"
) -> dict[str, Any]:
    """Train steps/s at 32-true vs bf16-mixed on CUDA (CLIP B/32 architecture, 12 frames at 224 px); 'no CUDA' on CPU."""
    feed = gpu_feed(H100_CLIPS_PER_S, per_core_clips_per_s)
    feed["per_core_source"] = per_core_source
    feed["note"] = "on paper: one H100 consumes about 250 clips/s of 12 frames training CLIP B/32 (issue 15)"
    if not torch.cuda.is_available():
        return {"cuda": False, "note": "no CUDA: train steps/s at 32-true vs bf16-mixed not measured", "h100_feed": feed}
    batch, steps, warmup, rounds = (8, 6, 2, 1) if quick else (32, 12, 3, 2)
    device = torch.device("cuda")
    batches = _batches(steps, batch, 12, 224, device, seed=0)
    runs: dict[str, list[float]] = {"32-true": [], "bf16-mixed": []}
    for _ in range(rounds):
        for precision in runs:
            runs[precision].append(_steps_per_s(precision, "vit-b32-random", batches, warmup))
    fp32, bf16 = statistics.median(runs["32-true"]), statistics.median(runs["bf16-mixed"])
    measured = gpu_feed(bf16 * batch, per_core_clips_per_s)
    return {
        "cuda": True,
        "gpu": torch.cuda.get_device_name(0),
        "model": "CLIP4Clip meanP, CLIP ViT-B/32 architecture (random init), all parameters trained",
        "batch_size": batch, "frames": 12, "image_size": 224, "timed_steps": steps - warmup, "rounds": rounds,
        "steps_per_s": {"32-true": fp32, "bf16-mixed": bf16},
        "steps_per_s_all": runs,
        "clips_per_s": {"32-true": fp32 * batch, "bf16-mixed": bf16 * batch},
        "bf16_speedup": bf16 / fp32,
        "measured_feed": measured,
        "h100_feed": feed,
        "note": "identical in-memory batches already on the GPU (the loader is not measured); median step time "
                "after warm-up; rounds alternate the two precisions",
    }  # fmt: skip


def render(sec: dict[str, Any]) -> list[str]:
    """Markdown lines of the precision section (and the GPU feed on paper)."""
    lines = ["## Precision and GPU feed", ""]
    if not sec.get("cuda"):
        lines.append("Train steps/s at `32-true` vs `bf16-mixed`: **no CUDA** on this machine, not measured "
                     "(`recipes/precision/bf16-mixed.yaml` for GPU runs, `32.yaml` on CPU).")  # fmt: skip
    else:
        s, c = sec["steps_per_s"], sec["clips_per_s"]
        lines.append(
            f"{sec['gpu']}, {sec['model']}, batch {sec['batch_size']} × 12 frames at 224 px: `32-true` "
            f"{s['32-true']:.2f} steps/s ({c['32-true']:.0f} clips/s), `bf16-mixed` {s['bf16-mixed']:.2f} steps/s "
            f"({c['bf16-mixed']:.0f} clips/s): **{sec['bf16_speedup']:.2f}×**."
        )
        m = sec["measured_feed"]
        if "workers" in m:
            lines.append(f"Feeding that GPU at bf16-mixed takes {m['workers']} loader workers at the measured "
                         f"{m['per_core_clips_per_s']:.0f} clips/s per core.")  # fmt: skip
    f = sec["h100_feed"]
    lines.append("")
    if "workers" in f:
        lines.append(
            f"On paper: one H100 needs ≈ {f['gpu_clips_per_s']:.0f} clips/s of 12 frames for CLIP B/32 (issue 15); "
            f"the shard DataModule decodes {f['per_core_clips_per_s']:.1f} clips/s on one core (data section, "
            f"{f.get('per_core_source', '1 worker')}), "
            f"so **{f['workers']} workers** ({f['cores_busy']:.1f} cores busy decoding) deliver it; n GPUs need n times "
            "that, plus a core per GPU for the training process."
        )
    else:
        lines.append(f"On paper: one H100 needs ≈ {f['gpu_clips_per_s']:.0f} clips/s of 12 frames for CLIP B/32; "
                     "run the data section in the same run for the per-core rate and the workers it takes.")  # fmt: skip
    lines.append("")
    return lines
