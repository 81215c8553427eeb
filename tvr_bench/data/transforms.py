"""Pixels: decode stored JPEG frames, resize/center-crop with torch ops, CLIP normalisation."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def decode_jpeg(data: bytes, min_side: int | None = None) -> np.ndarray:
    """Decode JPEG bytes to uint8 ``[H, W, 3]``; with ``min_side`` PIL's draft mode downscales cheaply
    while keeping both sides at least ``min_side``. Only the JPEG decoder is tried: bytes in any other
    format (PNG, EPS, ...) are refused, never handed to another PIL plugin."""
    with Image.open(io.BytesIO(data), formats=("JPEG",)) as img:
        if min_side is not None and min(img.size) >= 2 * min_side:
            img.draft("RGB", (min_side, min_side))
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))  # convert() to the same mode copies


def resize_center_crop(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 ``[F, 3, H, W]`` so the short side is ``size`` (torch bicubic, antialiased,
    rounded back to uint8), then center-crop to ``size x size``."""
    h, w = frames.shape[-2:]
    if min(h, w) != size:
        scale = size / min(h, w)
        new_h = max(size, round(h * scale))
        new_w = max(size, round(w * scale))
        x = F.interpolate(frames.float(), size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        frames = x.round_().clamp_(0.0, 255.0).to(torch.uint8)
        h, w = new_h, new_w
    top = (h - size) // 2
    left = (w - size) // 2
    return frames[..., top : top + size, left : left + size]


_SCALE = np.array([1.0 / (255.0 * s) for s in CLIP_STD], dtype=np.float32).reshape(3, 1, 1)
_SHIFT = np.array([m / s for m, s in zip(CLIP_MEAN, CLIP_STD)], dtype=np.float32).reshape(3, 1, 1)


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


def clip_to_uint8(frames: list[np.ndarray], size: int) -> torch.Tensor:
    """Stack decoded ``[H, W, 3]`` uint8 frames of one clip into resized, cropped uint8 ``[F, 3, size, size]``."""
    h, w = frames[0].shape[:2]
    if min(h, w) == size and all(f.shape == frames[0].shape for f in frames):
        # stored at the target short side (the usual case): crop while transposing, one copy per frame
        top, left = (h - size) // 2, (w - size) // 2
        out = np.empty((len(frames), 3, size, size), dtype=np.uint8)
        for i, frame in enumerate(frames):
            out[i] = frame[top : top + size, left : left + size].transpose(2, 0, 1)
        return torch.from_numpy(out)
    stacked = np.ascontiguousarray(np.stack(frames).transpose(0, 3, 1, 2))
    return torch.from_numpy(np.ascontiguousarray(resize_center_crop(torch.from_numpy(stacked), size).numpy()))


def frames_to_tensor(frames: list[np.ndarray], size: int) -> torch.Tensor:
    """Stack decoded ``[H, W, 3]`` uint8 frames of one clip into a normalised float ``[F, 3, size, size]``."""
    return normalize(clip_to_uint8(frames, size))
