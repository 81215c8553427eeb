"""Temporal probes: the test set scored again with the frames of every video reordered or frozen.

A method that uses the order of the frames loses recall when they are reversed or shuffled; one that reads a
single frame loses little when every frame is replaced by the middle one (the single-frame bias measured by
Lei et al., "Revealing Single Frame Bias for Video-and-Language Learning", 2022). Each probe costs one extra
encoding of every test video (the texts are encoded once) and one extra scoring of the matrix.

The transforms are pure functions of a batch's frames and mask; only the valid frames (mask True) move, padded
slots stay where they are. The shuffle of a video is drawn from its key, so it does not depend on the batch,
the worker or the number of processes.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
from torch import Tensor

#: The probes, in report order: name -> what it does to the valid frames of a video.
PROBES: dict[str, str] = {
    "reversed": "frames in reverse order",
    "shuffled": "frames in a random order drawn from the video key (never the original order)",
    "middle": "every frame replaced by the middle one (a still video)",
}

__all__ = ["PROBES", "check_probes", "frame_order", "probe_frames"]


def check_probes(probes: Sequence[str] | str | None) -> tuple[str, ...]:
    """The probe names asked for (`all` = every probe), in report order; ValueError naming an unknown one."""
    if probes is None:
        return ()
    names = [probes] if isinstance(probes, str) else list(probes)
    names = [n.strip() for name in names for n in str(name).split(",") if n.strip()]
    if "all" in names:
        return tuple(PROBES)
    unknown = [n for n in names if n not in PROBES]
    if unknown:
        raise ValueError(f"unknown temporal probe(s) {', '.join(map(repr, unknown))}; choose from {', '.join(PROBES)} or all")
    return tuple(p for p in PROBES if p in names)


def frame_order(probe: str, valid: int, key: str = "") -> list[int]:
    """Which valid frame fills each of the first `valid` slots under `probe` (a list of `valid` indices)."""
    if valid <= 0:
        return []
    if probe == "reversed":
        return list(range(valid - 1, -1, -1))
    if probe == "middle":
        return [valid // 2] * valid
    if probe == "shuffled":
        if valid == 1:
            return [0]
        generator = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
        while True:
            order = torch.randperm(valid, generator=generator).tolist()
            if order != list(range(valid)):
                return order
    raise ValueError(f"unknown temporal probe {probe!r}; choose from {', '.join(PROBES)}")


def probe_frames(frames: Tensor, frame_mask: Tensor, probe: str, keys: Sequence[str]) -> Tensor:
    """`frames` `[B, F, ...]` with each video's valid frames rearranged by `probe` (the mask is unchanged).

    Valid frames are the leading True entries of `frame_mask` `[B, F]` (the loaders pad at the end); a mask
    with holes is refused."""
    if frames.shape[:2] != frame_mask.shape:
        raise ValueError(f"frames {tuple(frames.shape)} and frame_mask {tuple(frame_mask.shape)} disagree")
    counts = frame_mask.sum(dim=1)
    leading = torch.arange(frame_mask.shape[1], device=frame_mask.device)[None, :] < counts[:, None]
    if not bool((leading == frame_mask.bool()).all()):
        raise ValueError("temporal probes need the valid frames first (frame_mask True, then False)")
    index = torch.arange(frame_mask.shape[1]).repeat(frames.shape[0], 1)
    for b, (n, key) in enumerate(zip(counts.tolist(), keys)):
        index[b, :n] = torch.tensor(frame_order(probe, int(n), str(key)), dtype=torch.long)
    index = index.to(frames.device)
    gather = index.view(*index.shape, *([1] * (frames.ndim - 2))).expand_as(frames)
    return torch.gather(frames, 1, gather)
