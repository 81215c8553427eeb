"""Frame sampling policies, stored-frame subsampling/padding and the pixel transforms."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tvr_bench.data.frames import fps1_uniform, sample_indices, segment_middle, stored_frame_plan, uniform_pick
from tvr_bench.data.streams import decode_clip
from tvr_bench.data.transforms import CLIP_MEAN, CLIP_STD, decode_jpeg, frames_to_tensor, resize_center_crop


def test_segment_middle_matches_xpool_uniform() -> None:
    # X-Pool: intervals = linspace(0, vlen, K+1).astype(int); idx = (lo + hi - 1) // 2 per interval
    assert segment_middle(100, 30.0, 12) == [3, 11, 20, 28, 36, 45, 53, 61, 70, 78, 86, 95]
    assert segment_middle(24, 2.0, 12) == list(range(0, 24, 2))
    assert segment_middle(28, 2.0, 12) == [0, 2, 5, 7, 9, 12, 14, 16, 19, 21, 23, 26]


def test_segment_middle_short_video_keeps_every_frame() -> None:
    assert segment_middle(5, 25.0, 12) == [0, 1, 2, 3, 4]


def test_segment_middle_respects_segment() -> None:
    # [2 s, 4 s) at 10 fps is native frames 20..39
    assert segment_middle(100, 10.0, 4, start=2.0, end=4.0) == [22, 27, 32, 37]


def test_fps1_uniform_thins_with_linspace() -> None:
    # 20 s at 30 fps: candidates 0, 30, ..., 570; linspace(0, 19, 12) -> 0 1 3 5 6 8 10 12 13 15 17 19
    expected = [30 * s for s in (0, 1, 3, 5, 6, 8, 10, 12, 13, 15, 17, 19)]
    assert fps1_uniform(600, 30.0, 12) == expected


def test_fps1_uniform_short_video_keeps_fewer() -> None:
    assert fps1_uniform(300, 30.0, 12) == [30 * s for s in range(10)]  # exactly 10 s -> 10 frames
    assert fps1_uniform(301, 30.0, 12) == [30 * s for s in range(11)]  # one frame more -> 11 (like CLIP4Clip)
    assert fps1_uniform(28, 2.0, 12) == [0, 2, 4, 6, 8, 10, 14, 16, 18, 20, 22, 26]


def test_fps1_uniform_segment_and_non_integer_fps() -> None:
    assert fps1_uniform(300, 30.0, 12, start=2.0, end=5.0) == [60, 90, 120]
    assert fps1_uniform(90, 29.97, 12) == [0, 29, 59, 89]  # 3.003 s -> 4 frames
    assert fps1_uniform(10, 30.0, 12) == [0]  # shorter than a second: one frame


def test_sample_indices_dispatch_and_unknown_policy() -> None:
    assert sample_indices("segment_middle", 24, 2.0, 12) == segment_middle(24, 2.0, 12)
    with pytest.raises(ValueError, match="unknown sampling policy"):
        sample_indices("random", 24, 2.0, 12)


def test_stored_frame_plan_subsamples_and_pads() -> None:
    assert stored_frame_plan(12, 12) == (list(range(12)), 0)
    assert stored_frame_plan(12, 16) == (list(range(12)), 4)
    assert stored_frame_plan(64, 12) == ([0, 5, 11, 17, 22, 28, 34, 40, 45, 51, 57, 63], 0)
    assert uniform_pick(3, 12) == [0, 1, 2]


def _jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_decode_jpeg_draft_keeps_min_side() -> None:
    data = _jpeg(np.full((512, 384, 3), 128, dtype=np.uint8))
    small = decode_jpeg(data, 64)
    assert small.shape[2] == 3 and 64 <= min(small.shape[:2]) < 384 // 2
    assert decode_jpeg(data).shape == (512, 384, 3)


def test_resize_center_crop_and_normalisation() -> None:
    frames = torch.zeros(2, 3, 48, 80, dtype=torch.uint8)
    assert resize_center_crop(frames, 32).shape == (2, 3, 32, 32)
    mean_pixel = np.array([[[round(m * 255) for m in CLIP_MEAN]]], dtype=np.uint8).repeat(40, 0).repeat(40, 1)
    out = frames_to_tensor([mean_pixel, mean_pixel], 32)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    assert out.abs().max() < 0.5 / 255 / min(CLIP_STD) + 1e-4
    white = frames_to_tensor([np.full((32, 32, 3), 255, dtype=np.uint8)], 32)
    expected = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)])
    assert torch.allclose(white[0, :, 5, 5], expected, atol=1e-5)


def test_decode_clip_pads_with_mask_and_warns_with_key() -> None:
    jpegs = [_jpeg(np.full((64, 64, 3), 10 * i, dtype=np.uint8)) for i in range(5)]
    with pytest.warns(UserWarning, match="short-video-key"):
        frames, mask = decode_clip(jpegs, 8, 32, key="short-video-key")
    assert frames.shape == (8, 3, 32, 32) and frames.dtype == torch.uint8 and mask.tolist() == [True] * 5 + [False] * 3
    assert torch.count_nonzero(frames[5:]) == 0
    frames, mask = decode_clip(jpegs, 3, 32, key="k")
    assert mask.all() and frames.shape[0] == 3
    # uniform subsample 0, 2, 4 of the stored frames: brightness increases
    assert frames[0].float().mean() < frames[1].float().mean() < frames[2].float().mean()
