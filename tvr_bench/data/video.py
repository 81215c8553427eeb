"""Video decoding with PyAV: probe a file and decode chosen frames, resized to a short side."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import av
from PIL import Image


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about the first video stream (num_frames may be an estimate)."""

    width: int
    height: int
    fps: float
    num_frames: int
    duration: float
    codec: str
    frames_estimated: bool = False

    def as_dict(self) -> dict:
        """Plain-dict form for JSON metadata."""
        return asdict(self)


@dataclass(frozen=True)
class DecodedVideo:
    """Frames decoded at native ``indices`` (presentation order) plus the probed info."""

    info: VideoInfo
    indices: list[int]
    images: list[Image.Image]


def _stream_info(container: av.container.InputContainer) -> VideoInfo:
    """Read size, fps, frame count and duration from an open container."""
    if not container.streams.video:
        raise ValueError("no video stream")
    stream = container.streams.video[0]
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    duration = 0.0
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
    num_frames = int(stream.frames or 0)
    estimated = False
    if num_frames <= 0:
        num_frames = max(1, round(duration * fps)) if fps > 0 else 0
        estimated = True
    if fps <= 0 and duration > 0 and num_frames > 0:
        fps = num_frames / duration
    if duration <= 0 and fps > 0:
        duration = num_frames / fps
    return VideoInfo(
        width=stream.codec_context.width,
        height=stream.codec_context.height,
        fps=fps,
        num_frames=num_frames,
        duration=duration,
        codec=stream.codec_context.name,
        frames_estimated=estimated,
    )


def probe_video(path: str | Path) -> VideoInfo:
    """Open a video file and return its :class:`VideoInfo` without decoding frames."""
    with av.open(str(path)) as container:
        return _stream_info(container)


def resize_short_side(image: Image.Image, short_side: int | None) -> Image.Image:
    """Downscale (never upscale) so the short side equals ``short_side``, bicubic as in CLIP."""
    if short_side is None:
        return image
    w, h = image.size
    if min(w, h) <= short_side:
        return image
    if w <= h:
        size = (short_side, max(1, round(h * short_side / w)))
    else:
        size = (max(1, round(w * short_side / h)), short_side)
    return image.resize(size, Image.BICUBIC)


def _decode_pass(path: Path, wanted: Sequence[int], short_side: int | None) -> tuple[dict[int, Image.Image], int, bool]:
    """Decode sequentially and keep the wanted indices; returns (frames, frames seen, reached end)."""
    want = set(wanted)
    last = max(want) if want else -1
    kept: dict[int, Image.Image] = {}
    seen = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if seen in want:
                kept[seen] = resize_short_side(frame.to_image(), short_side)
            seen += 1
            if seen > last:
                return kept, seen, False
    return kept, seen, True


def decode_video(
    path: str | Path,
    choose: Callable[[VideoInfo], list[int]],
    short_side: int | None = None,
) -> DecodedVideo:
    """Probe ``path``, let ``choose`` pick native indices from the info, decode them and resize.

    When the container over-states its frame count (estimated counts, broken headers), indices are
    chosen again from the number of frames actually decoded and the file is decoded once more.
    """
    path = Path(path)
    info = probe_video(path)
    indices = sorted(set(choose(info)))
    kept, seen, at_end = _decode_pass(path, indices, short_side)
    if at_end and seen == 0:
        raise ValueError("no frames could be decoded")
    if len(kept) < len(indices):
        info = VideoInfo(**{**info.as_dict(), "num_frames": seen, "frames_estimated": False})
        indices = sorted(set(choose(info)))
        kept, seen, _ = _decode_pass(path, indices, short_side)
        if len(kept) < len(indices):
            raise ValueError(f"decoded {len(kept)} of {len(indices)} chosen frames")
    return DecodedVideo(info=info, indices=indices, images=[kept[i] for i in indices])
