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
    while keeping both sides at least ``min_side``."""
    with Image.open(io.BytesIO(data)) as img:
        if min_side is not None and min(img.size) >= 2 * min_side:
            img.draft("RGB", (min_side, min_side))
        return np.asarray(img.convert("RGB"))


def resize_center_crop(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8/float ``[F, 3, H, W]`` so the short side is ``size`` (bicubic, antialiased), then
    center-crop to ``size x size``; returns float32 in the 0-255 range."""
    x = frames.float()
    h, w = x.shape[-2:]
    if min(h, w) != size:
        scale = size / min(h, w)
        new_h = max(size, round(h * scale))
        new_w = max(size, round(w * scale))
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp_(0.0, 255.0)
        h, w = new_h, new_w
    top = (h - size) // 2
    left = (w - size) // 2
    return x[..., top : top + size, left : left + size]


def normalize(frames: torch.Tensor) -> torch.Tensor:
    """Map 0-255 float frames ``[..., 3, H, W]`` to CLIP-normalised values."""
    mean = torch.tensor(CLIP_MEAN, dtype=frames.dtype).view(3, 1, 1) * 255.0
    std = torch.tensor(CLIP_STD, dtype=frames.dtype).view(3, 1, 1) * 255.0
    return (frames - mean) / std


def frames_to_tensor(frames: list[np.ndarray], size: int) -> torch.Tensor:
    """Stack decoded ``[H, W, 3]`` uint8 frames of one clip into a normalised float ``[F, 3, size, size]``."""
    stacked = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)
    return normalize(resize_center_crop(stacked, size)).contiguous()
