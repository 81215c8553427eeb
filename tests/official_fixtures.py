"""Raw-release fixtures for the real benchmarks, built from ``$TVR_FIXTURES_DIR`` (official formats).

The fixture directory (default ``<repo>/../shared/fixtures/official``) holds each benchmark's
annotations under their official names plus ``expected.json`` (counts, texts, the missing and corrupt
videos). Videos are never stored there; :func:`build_raw` makes tiny ones with PyAV under the exact
file names ``expected.json`` lists, in the container ``make_videos.sh`` uses for that file (read from
its embedded manifest), leaves the ``absent`` ones out and truncates the ``corrupt`` ones until they no
longer decode.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Frames per second of the generated videos (low: few frames to encode and decode).
FPS = 4
#: Generated frame size (width, height); H.263 only accepts its standard sizes.
SIZE = (64, 48)
H263_SIZE = (128, 96)
#: DiDeMo videos are made longer than its 31 s window so the clipping is observable.
LONG_SECONDS = {"didemo": 36.0}
LONG_FPS = 2

#: Container by file extension, used when make_videos.sh's manifest cannot be read.
FALLBACK_FORMATS = {
    "mp4": ("mp4", "libx264"), "avi": ("avi", "mpeg4"), "mkv": ("matroska", "libx264"),
    "webm": ("webm", "libvpx"), "mov": ("mov", "libx264"), "qt": ("mov", "libx264"),
    "m4v": ("mp4", "libx264"), "3gp": ("3gp", "h263"), "3g2": ("3g2", "h263"),
    "wmv": ("asf", "wmv2"), "m2ts": ("mpegts", "libx264"), "null": ("mp4", "libx264"), "": ("mov", "libx264"),
}


def fixtures_dir() -> Path:
    """``$TVR_FIXTURES_DIR`` or ``<repo>/../shared/fixtures/official``."""
    return Path(os.environ.get("TVR_FIXTURES_DIR", REPO_ROOT.parent / "shared" / "fixtures" / "official"))


def require_fixtures() -> Path:
    """The fixture directory, or skip the calling test with the reason."""
    root = fixtures_dir()
    if not (root / "expected.json").is_file():
        pytest.skip(f"official-format fixtures not found at {root} (set TVR_FIXTURES_DIR)")
    return root


@lru_cache(maxsize=None)
def expected() -> dict[str, Any]:
    """``expected.json``'s per-dataset entries."""
    return json.loads((require_fixtures() / "expected.json").read_text(encoding="utf-8"))["datasets"]


@lru_cache(maxsize=None)
def video_manifest() -> dict[str, dict[str, Any]]:
    """make_videos.sh's embedded manifest, by relative path (empty when it cannot be read)."""
    script = fixtures_dir() / "make_videos.sh"
    if not script.is_file():
        return {}
    match = re.search(r"<<'JSON'\n(.*?)\nJSON\n", script.read_text(encoding="utf-8"), re.S)
    if not match:
        return {}
    try:
        data = json.loads(match.group(1))
    except ValueError:
        return {}
    return {entry["path"]: entry for entries in data.values() for entry in entries}


def _format_for(rel: str) -> tuple[str, str, float]:
    """(container format, video codec, seconds) for a fixture video path."""
    entry = video_manifest().get(rel)
    seconds = 4.0
    if entry and entry.get("kind") == "encode":
        seconds = max(1.0, float(entry["t1"]) - float(entry["t0"]))
        return entry["fmt"], entry["vcodec"], seconds
    name = rel.rsplit("/", 1)[-1]
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    fmt, codec = FALLBACK_FORMATS.get(ext, ("mp4", "libx264"))
    return fmt, codec, seconds


def write_video(path: Path, fmt: str, codec: str, seconds: float, fps: int, seed: int) -> None:
    """Encode a small moving-gradient clip (``seconds`` at ``fps``) into ``path`` with PyAV."""
    width, height = H263_SIZE if codec == "h263" else SIZE
    frames = max(2, int(round(seconds * fps)))
    yy, xx = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "threads": "1"}
        else:
            stream.bit_rate = 200_000
        for i in range(frames):
            shift = (i * 7) % width
            rgb = np.stack([(xx + shift + base[c] + 40 * c + yy) % 256 for c in range(3)], axis=-1).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decoded_frames(path: Path) -> int | None:
    """Frames PyAV decodes from ``path`` (None when it cannot even be opened)."""
    try:
        with av.open(str(path)) as container:
            return sum(1 for _ in container.decode(container.streams.video[0]))
    except Exception:  # noqa: BLE001 - any failure means "does not decode"
        return None


def corrupt(path: Path, how: str) -> None:
    """Truncate ``path`` the way ``how`` describes, then further until no frame decodes.

    Matroska is cut just inside its first Cluster so that, like the fixture's ``.mkv``, it still opens
    and claims a duration but has no frame.
    """
    data = path.read_bytes()
    size = len(data)
    if m := re.search(r"(\d+) bytes", how):
        size = int(m.group(1))
    elif m := re.search(r"(\d+)%", how):
        size = len(data) * int(m.group(1)) // 100
    cluster = data.find(b"\x1f\x43\xb6\x75")
    if path.suffix == ".mkv" and cluster > 0:
        size = min(size, cluster + 64)
    size = min(size, len(data) - 1)
    while True:
        path.write_bytes(data[:size])
        if not decoded_frames(path) or size <= 16:
            return
        size //= 2


def build_raw(dataset: str, out: Path) -> Path:
    """``out/<dataset>/annotations*`` (copied) and ``out/<dataset>/videos*`` (generated); returns out."""
    fixtures = require_fixtures()
    info = expected()[dataset]
    for folder in sorted((fixtures / dataset).glob("annotations*")):
        target = out / dataset / folder.name
        if not target.exists():
            shutil.copytree(folder, target)
            for path in target.rglob("*"):
                path.chmod(0o755 if path.is_dir() else 0o644)
            target.chmod(0o755)
    corrupt_how = {c["file"]: c.get("how", "") for c in info.get("corrupt", [])}
    for entry in info["video_files"]:
        rel, role = entry["path"], entry["role"]
        path = out / rel
        if role == "absent" or path.exists():
            continue
        fmt, codec, seconds = _format_for(rel)
        fps = FPS
        if dataset in LONG_SECONDS:
            seconds, fps = LONG_SECONDS[dataset], LONG_FPS
        seed = zlib.crc32(rel.encode("utf-8"))
        write_video(path, fmt, codec, seconds, fps, seed)
        if role == "corrupt":
            how = corrupt_how.get(rel) or corrupt_how.get(rel.replace("videos_aws", "videos").removesuffix(".mp4"), "40%")
            corrupt(path, how)
        elif role == "ignored":
            corrupt(path, "30%")
    return out
