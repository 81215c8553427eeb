"""Video decoding with PyAV: probe a file and decode chosen frames, resized to a short side.

A video is a file path or a :class:`TarMember` (a video stored uncompressed inside a tar, e.g. a
video2dataset shard), which PyAV reads in place through a bounded, seekable view of the tar file.
"""

from __future__ import annotations

import io
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Callable, Iterator, Sequence, Union

import av
from PIL import Image


@dataclass(frozen=True)
class TarMember:
    """A file stored uncompressed inside a tar: ``size`` bytes at ``offset`` of ``tar`` (named ``name``)."""

    tar: Path
    name: str
    offset: int
    size: int

    def is_file(self) -> bool:
        """Whether the tar still holds the member's bytes (the tar exists and is long enough)."""
        try:
            return Path(self.tar).is_file() and Path(self.tar).stat().st_size >= self.offset + self.size
        except OSError:
            return False

    def open(self) -> IO[bytes]:
        """A read-only, seekable file object over the member's bytes (nothing is copied out)."""
        return io.BufferedReader(_MemberReader(Path(self.tar), self.offset, self.size), buffer_size=1 << 16)

    def __str__(self) -> str:
        """``<tar>:<member>``, as recorded in the shard metadata."""
        return f"{self.tar}:{self.name}"


class _MemberReader(io.RawIOBase):
    """Raw reader over the byte range ``[offset, offset + size)`` of a file."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        super().__init__()
        self._file = open(path, "rb")  # noqa: SIM115 - closed in close()
        self._start, self._size, self._pos = offset, size, 0

    def readable(self) -> bool:
        """Always readable."""
        return True

    def seekable(self) -> bool:
        """Always seekable."""
        return True

    def tell(self) -> int:
        """Position within the member."""
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Move within the member (positions clamp at 0; reads past the end return nothing)."""
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        """Read up to ``len(buffer)`` bytes of the member from the current position."""
        n = max(0, min(len(buffer), self._size - self._pos))
        if n == 0:
            return 0
        self._file.seek(self._start + self._pos)
        got = self._file.readinto(memoryview(buffer)[:n])
        self._pos += got or 0
        return got or 0

    def close(self) -> None:
        """Close the underlying file."""
        if not self.closed:
            self._file.close()
        super().close()


#: What the decoder accepts as a video.
VideoSource = Union[str, Path, TarMember]


@contextmanager
def _open(source: VideoSource) -> Iterator[av.container.InputContainer]:
    """Open a video file or tar member with PyAV (the member's file object is closed afterwards)."""
    if not isinstance(source, TarMember):
        with av.open(str(source)) as container:
            yield container
        return
    with source.open() as handle, av.open(handle, mode="r") as container:
        yield container


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


def probe_video(path: VideoSource) -> VideoInfo:
    """Open a video (file or tar member) and return its :class:`VideoInfo` without decoding frames."""
    with _open(path) as container:
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


def _decode_pass(path: VideoSource, wanted: Sequence[int], short_side: int | None) -> tuple[dict[int, Image.Image], int, bool]:
    """Decode sequentially and keep the wanted indices; returns (frames, frames seen, reached end)."""
    want = set(wanted)
    last = max(want) if want else -1
    kept: dict[int, Image.Image] = {}
    seen = 0
    with _open(path) as container:
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
    path: VideoSource,
    choose: Callable[[VideoInfo], list[int]],
    short_side: int | None = None,
) -> DecodedVideo:
    """Probe ``path``, let ``choose`` pick native indices from the info, decode them and resize.

    When the container over-states its frame count (estimated counts, broken headers), indices are
    chosen again from the number of frames actually decoded and the file is decoded once more.
    """
    path = path if isinstance(path, TarMember) else Path(path)
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
