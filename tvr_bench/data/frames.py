"""Frame sampling policies: which native frames of a video become the stored frames of a sample.

Two policies reproduce the reference codebases:

- ``fps1_uniform`` (CLIP4Clip, DRL): one frame per second over the segment, then ``linspace`` down
  to K when there are more than K; fewer than K are kept as they are (the loader masks the rest).
- ``segment_middle`` (X-Pool, T-MASS ``uniform``): split the native frame range into K equal
  intervals and take the middle frame of each; a video with fewer than K frames keeps all of them.

Indices are 0-based positions in presentation order. All functions here are pure.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

POLICIES: tuple[str, ...] = ("fps1_uniform", "segment_middle")


def _frame_range(num_native: int, fps: float, start: float | None, end: float | None) -> tuple[int, int]:
    """Native frame range [lo, hi) covered by the segment [start, end) seconds (whole video if None)."""
    lo = 0 if start is None else max(0, int(math.floor(start * fps + 1e-6)))
    hi = num_native if end is None else min(num_native, int(math.ceil(end * fps - 1e-6)))
    lo = min(lo, max(num_native - 1, 0))
    return lo, max(hi, lo + 1)


def uniform_pick(n: int, k: int) -> list[int]:
    """Positions of ``k`` of ``n`` items by ``np.linspace(0, n-1, k)`` truncated to int (all if n <= k)."""
    if n <= k:
        return list(range(n))
    return [int(i) for i in np.linspace(0, n - 1, num=k).astype(int)]


def fps1_uniform(
    num_native: int,
    fps: float,
    num_frames: int,
    start: float | None = None,
    end: float | None = None,
    rate: float = 1.0,
) -> list[int]:
    """CLIP4Clip/DRL: native indices at ``rate`` frames per second over [start, end), thinned to K."""
    if num_native <= 0:
        return []
    lo, hi = _frame_range(num_native, fps, start, end)
    t0 = lo / fps
    candidates: list[int] = []
    k = 0
    while True:
        index = int(math.floor((t0 + k / rate) * fps + 1e-6))
        if index >= hi:
            break
        if not candidates or index > candidates[-1]:
            candidates.append(index)
        k += 1
    if not candidates:
        candidates = [lo]
    return [candidates[i] for i in uniform_pick(len(candidates), num_frames)]


def segment_middle(
    num_native: int,
    fps: float,
    num_frames: int,
    start: float | None = None,
    end: float | None = None,
) -> list[int]:
    """X-Pool/T-MASS ``uniform``: the middle frame of each of K equal intervals of the native range."""
    if num_native <= 0:
        return []
    lo, hi = _frame_range(num_native, fps, start, end)
    length = hi - lo
    k = min(num_frames, length)
    edges = np.linspace(0, length, num=k + 1).astype(int)
    return [lo + int((edges[i] + edges[i + 1] - 1) // 2) for i in range(k)]


SAMPLERS: dict[str, Callable[..., list[int]]] = {
    "fps1_uniform": fps1_uniform,
    "segment_middle": segment_middle,
}


def sample_indices(
    policy: str,
    num_native: int,
    fps: float,
    num_frames: int,
    start: float | None = None,
    end: float | None = None,
) -> list[int]:
    """Dispatch to a sampling policy by name (``fps1_uniform`` or ``segment_middle``)."""
    if policy not in SAMPLERS:
        raise ValueError(f"unknown sampling policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return SAMPLERS[policy](num_native, fps, num_frames, start=start, end=end)


def stored_frame_plan(num_stored: int, num_frames: int) -> tuple[list[int], int]:
    """Which stored frames a loader asking for ``num_frames`` uses, and how many padded slots follow."""
    picked = uniform_pick(num_stored, num_frames)
    return picked, num_frames - len(picked)
