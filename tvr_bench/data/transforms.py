"""Pixels: decode stored JPEG frames, resize/center-crop with torch ops; CLIP's normalisation comes from the
backbone (:mod:`tvr_bench.backbones.normalization`) and is re-exported here for the data pipeline."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tvr_bench.backbones.normalization import (  # noqa: F401  (re-exported: the data pipeline's names)
    CLIP_MEAN,
    CLIP_STD,
    normalize,
    normalize_batch,
    normalize_clips,
    normalize_frames,
)


def decode_jpeg(data: bytes, min_side: int | None = None) -> np.ndarray:
    """Decode JPEG bytes to uint8 ``[H, W, 3]``; with ``min_side`` PIL's draft mode downscales cheaply
    while keeping both sides at least ``min_side``. Only the JPEG decoder is tried: bytes in any other
    format (PNG, EPS, ...) are refused, never handed to another PIL plugin."""
    with Image.open(io.BytesIO(data), formats=("JPEG",)) as img:
        if min_side is not None and min(img.size) >= 2 * min_side:
            img.draft("RGB", (min_side, min_side))
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))  # convert() to the same mode copies


def decode_center_crop_into(data: bytes, size: int, out: np.ndarray) -> bool:
    """Write the centre ``size x size`` crop of a JPEG whose short side (after :func:`decode_jpeg`'s draft) is
    ``size`` into ``out`` (uint8 ``[3, size, size]``, channel-planar); False (``out`` untouched) when the short
    side is another size.

    PIL crops before any pixel leaves it and hands out one colour plane at a time, so the pixels are
    copied twice (plane bytes, then ``out``) instead of an RGB copy plus a strided HWC -> CHW transpose
    (measured 33 vs 68 µs per 224 px frame)."""
    with Image.open(io.BytesIO(data), formats=("JPEG",)) as img:
        if min(img.size) >= 2 * size:
            img.draft("RGB", (size, size))
        w, h = img.size
        if min(w, h) != size:
            return False
        top, left = (h - size) // 2, (w - size) // 2
        crop = img.crop((left, top, left + size, top + size))
        if crop.mode != "RGB":
            crop = crop.convert("RGB")
        for channel, band in enumerate("RGB"):
            out[channel] = np.frombuffer(crop.tobytes("raw", band), dtype=np.uint8).reshape(size, size)
        return True


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


# ------------------------------------------------------------------ decoding into a batch buffer
def decode_clip_into(out: np.ndarray, jpegs: list[bytes], picked: list[int], size: int, augment_seed: int | None = None) -> None:
    """Decode the ``picked`` JPEG frames of one clip into ``out`` (uint8 ``[>=len(picked), 3, size, size]``).

    Eval (``augment_seed`` None): short side resized to ``size`` (only when the stored frames are not
    already at it) and centre-cropped; frames stored at the target short side (the usual case) are cropped
    by PIL and written plane by plane (:func:`decode_center_crop_into`). Train augmentation (``clip_train``): one
    :func:`random_resized_crop_box` drawn from ``random.Random(augment_seed)`` for the stored frame size,
    the same crop, resize and flip for every frame of the clip.
    """
    if augment_seed is None:
        for n, i in enumerate(picked):
            if not decode_center_crop_into(jpegs[i], size, out[n]):
                break  # not stored at the target short side: the resize path below for the whole clip
        else:
            return
    frames = [decode_jpeg(jpegs[i], size) for i in picked]
    h, w = frames[0].shape[:2]
    same = all(f.shape == frames[0].shape for f in frames)
    if augment_seed is None:
        out[: len(frames)] = clip_to_uint8(frames, size).numpy()
        return
    if not same:
        frames = [_resize_hw(f, h, w) for f in frames]
    box = random_resized_crop_box(random.Random(augment_seed), h, w)
    stacked = np.stack([f[box.top : box.top + box.height, box.left : box.left + box.width] for f in frames])
    out[: len(frames)] = resized_crop(torch.from_numpy(np.ascontiguousarray(stacked.transpose(0, 3, 1, 2))), size, box.flip).numpy()


def _resize_hw(frame: np.ndarray, h: int, w: int) -> np.ndarray:
    """A frame of another size brought to ``h x w`` (bilinear), so one crop box fits every frame of a clip."""
    x = torch.from_numpy(np.ascontiguousarray(frame.transpose(2, 0, 1)))[None].float()
    y = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return y.round_().clamp_(0.0, 255.0).to(torch.uint8)[0].permute(1, 2, 0).numpy()


# ------------------------------------------------------------------ train augmentation (clip_train)
#: X-Pool / T-MASS ``clip_train``: torchvision RandomResizedCrop(input_res, scale=(0.5, 1.0)) with its default
#: ratio (3/4, 4/3) and bilinear interpolation, then RandomHorizontalFlip(p=0.5) (xpool datasets/model_transforms.py
#: L11-13; the ColorJitter of L14 has all strengths 0, a no-op). Applied to the stacked frames of a clip,
#: so every frame of a clip gets the same crop and flip.
CLIP_TRAIN_SCALE: tuple[float, float] = (0.5, 1.0)
CLIP_TRAIN_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
CLIP_TRAIN_FLIP_P: float = 0.5
AUGMENTS: tuple[str, ...] = ("none", "clip_train")


class CropBox:
    """One clip's augmentation: crop ``[top, top+height) x [left, left+width)`` of the stored frame, then flip or not."""

    __slots__ = ("top", "left", "height", "width", "flip")

    def __init__(self, top: int, left: int, height: int, width: int, flip: bool) -> None:
        self.top, self.left, self.height, self.width, self.flip = top, left, height, width, flip

    def __repr__(self) -> str:
        return f"CropBox(top={self.top}, left={self.left}, height={self.height}, width={self.width}, flip={self.flip})"


def random_resized_crop_box(
    rng: "random.Random",
    height: int,
    width: int,
    scale: tuple[float, float] = CLIP_TRAIN_SCALE,
    ratio: tuple[float, float] = CLIP_TRAIN_RATIO,
    flip_p: float = CLIP_TRAIN_FLIP_P,
) -> CropBox:
    """Draw a RandomResizedCrop box (area fraction in ``scale``, aspect ratio log-uniform in ``ratio``, up to
    10 tries, else the largest centred box within ``ratio``) and a horizontal flip, from ``rng``."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    flip = rng.random() < flip_p
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return CropBox(rng.randint(0, height - h), rng.randint(0, width - w), h, w, flip)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return CropBox((height - h) // 2, (width - w) // 2, h, w, flip)


def resized_crop(frames: torch.Tensor, size: int, flip: bool = False) -> torch.Tensor:
    """Resize cropped uint8 frames ``[F, 3, h, w]`` to ``size x size`` (bilinear, antialiased, rounded back to
    uint8) and flip them horizontally when asked."""
    if frames.shape[-2:] != (size, size):
        x = F.interpolate(frames.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        frames = x.round_().clamp_(0.0, 255.0).to(torch.uint8)
    if flip:
        frames = frames.flip(-1)
    return frames
