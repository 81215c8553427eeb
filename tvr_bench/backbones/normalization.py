"""CLIP's pixel normalisation: OpenAI's mean and std, and the uint8 -> float32 mapping every CLIP input goes
through. It belongs to the backbone (the weights were trained on pixels normalised this way); the data
pipeline imports it from here to normalise frames on the device, and the methods for batches of a bare loader.
Only numpy and torch: importing it loads no model code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

#: OpenAI's CLIP image normalisation (per RGB channel, on pixels scaled to [0, 1]).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

_SCALE = np.array([1.0 / (255.0 * s) for s in CLIP_STD], dtype=np.float32).reshape(3, 1, 1)
_SHIFT = np.array([m / s for m, s in zip(CLIP_MEAN, CLIP_STD)], dtype=np.float32).reshape(3, 1, 1)

__all__ = ["CLIP_MEAN", "CLIP_STD", "normalize", "normalize_batch", "normalize_clips", "normalize_frames"]


def normalize(frames: torch.Tensor) -> torch.Tensor:
    """Map uint8 (or 0-255 float) frames ``[..., 3, H, W]`` to CLIP-normalised float32.

    Computed with numpy: elementwise work in data workers and in-process loading then never wakes
    torch's intra-op thread pool, which is very slow on a busy machine with few cores.
    """
    array = frames.numpy().astype(np.float32)
    array *= _SCALE
    array -= _SHIFT
    return torch.from_numpy(array)


def normalize_clips(clips: list[np.ndarray]) -> torch.Tensor:
    """Stack uint8 clips ``[F, 3, H, W]`` into CLIP-normalised float32 ``[B, F, 3, H, W]``: the values of
    :func:`normalize` on the stacked batch, written frame by frame into one buffer (no uint8 batch copy,
    each frame's two passes stay in cache)."""
    out = np.empty((len(clips), *clips[0].shape), dtype=np.float32)
    for i, clip in enumerate(clips):
        for j in range(clip.shape[0]):
            np.multiply(clip[j], _SCALE, out=out[i, j])
            out[i, j] -= _SHIFT
    return torch.from_numpy(out)


def normalize_frames(frames: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 frames ``[B, F, 3, H, W]`` -> CLIP-normalised float32 on the same device, padded frames
    (``frame_mask`` False) zero. Float input is returned unchanged (already normalised).

    Bitwise equal to the worker-side normalisation this replaced: ``x * (1 / (255 std)) - mean / std``
    in float32, two separate roundings (numpy on CPU, two torch kernels elsewhere: never a fused multiply-add).
    """
    if frames.dtype != torch.uint8:
        return frames
    if frames.device.type == "cpu":
        array = frames.numpy().astype(np.float32)  # numpy: no wake-up of torch's intra-op pool on a busy CPU
        array *= _SCALE
        array -= _SHIFT
        out = torch.from_numpy(array)
    else:
        scale = torch.from_numpy(_SCALE).to(frames.device)
        shift = torch.from_numpy(_SHIFT).to(frames.device)
        out = frames.to(torch.float32)
        out.mul_(scale)
        out.sub_(shift)
    if frame_mask is not None and not bool(frame_mask.all()):
        out[~frame_mask.to(out.device)] = 0.0
    return out


def normalize_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """A loader batch with its uint8 ``frames`` CLIP-normalised (what ``RetrievalDataModule.on_after_batch_transfer``
    does on the device); for code that iterates loaders without a Trainer. Other keys are kept as they are."""
    frames = batch.get("frames")
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8:
        return batch
    return {**batch, "frames": normalize_frames(frames, batch.get("frame_mask"))}
