"""What `tvr-bench index` reads: a folder of video files or prepared shards, cut into chunks of videos, each
video decoded to the model's uint8 input frames with the data pipeline's own code.

A video file goes through exactly the steps a prepared shard and the evaluation loader apply to it:
`tvr_bench.data.video.decode_video` with the sampling policy of `tvr_bench.data.frames` (resized to the model's
input size on the short side), JPEG at the prepare quality (`jpeg_bytes`), then `tvr_bench.data.streams.decode_clip`
(centre crop, uniform pick or zero padding to the frame count). So a folder indexes to the same features as the
shards `tvr-bench prepare` makes of it at that short side (`jpeg_quality=None` skips the JPEG round trip).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from tvr_bench.search.model import FrameProtocol, SearchSetupError

#: File name endings never tried as videos (annotations, images, archives, partial downloads, our own files).
NOT_VIDEO = frozenset({
    ".json", ".jsonl", ".txt", ".csv", ".tsv", ".md", ".yaml", ".yml", ".xml", ".html", ".srt", ".vtt", ".sub",
    ".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".npy", ".npz", ".pkl", ".pt", ".ckpt", ".faiss",
    ".tar", ".zip", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".py", ".sh", ".log", ".part", ".tmp", ".crdownload",
})


@dataclass(frozen=True)
class Chunk:
    """A unit of indexing work recorded in the progress file: a list of video files, or one shard file."""

    name: str
    files: tuple[str, ...] = ()
    shard: str | None = None  # relative path of one shard (``split/shard-00000.tar``)
    split: str | None = None


@dataclass
class Source:
    """An indexable source: its kind (``files`` or ``shards``), root, chunks and what was left out."""

    kind: str
    root: Path
    chunks: list[Chunk]
    ignored: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    sampling: str | None = None  # shards: the sampling they were prepared with
    num_frames: int | None = None

    def describe(self) -> dict[str, Any]:
        """Plain form for index.json."""
        out: dict[str, Any] = {"kind": self.kind, "root": str(Path(self.root).resolve())}
        if self.kind == "files":
            out["files"] = sum(len(c.files) for c in self.chunks)
            out["ignored_files"] = len(self.ignored)
            out["ignored_examples"] = self.ignored[:10]
        else:
            out.update(splits=self.splits, shards=len(self.chunks), sampling=self.sampling, num_frames=self.num_frames)
        return out


def _is_hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def list_files(root: Path, chunk_size: int) -> Source:
    """Every regular file under `root` (recursively, hidden ones skipped) in sorted relative-path order, cut into
    chunks; files whose ending says they are not videos are counted as ignored, everything else is tried."""
    tried, ignored = [], []
    for path in sorted(p for p in root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or _is_hidden(rel):
            continue
        (ignored if path.suffix.lower() in NOT_VIDEO else tried).append(rel.as_posix())
    chunks = [Chunk(f"files-{i // chunk_size:05d}", tuple(tried[i : i + chunk_size])) for i in range(0, len(tried), chunk_size)]
    return Source("files", root, chunks, ignored=ignored)


def is_split_dir(path: Path) -> bool:
    """Whether `path` is a prepared split: its index.json lists shards (not, e.g., a search index's index.json)."""
    try:
        index = json.loads((path / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and isinstance(index.get("shards"), list) and "kind" not in index


def list_shards(root: Path, splits: list[str] | None) -> Source:
    """Prepared shards: `root` is a split folder (holding index.json) or a prepared root (its split folders)."""
    from tvr_bench.data.shards import read_index

    if is_split_dir(root):
        found = {root.name: root}
        base = root.parent
    else:
        base = root
        found = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and is_split_dir(p)}
    if splits:
        missing = [s for s in splits if s not in found]
        if missing:
            raise SearchSetupError(f"{root}: no prepared split(s) {missing}; it holds {sorted(found)}")
        found = {s: found[s] for s in splits}
    chunks, samplings, frames = [], set(), set()
    for split, directory in found.items():
        index = read_index(directory)
        samplings.add(index.get("sampling"))
        frames.add(index.get("num_frames"))
        for entry in index["shards"]:
            chunks.append(Chunk(f"{split}-{Path(entry['file']).stem}", shard=f"{split}/{entry['file']}", split=split))
    if len(samplings) > 1:
        raise SearchSetupError(f"{root}: its splits were prepared with different samplings {sorted(map(str, samplings))}")
    source = Source("shards", base, chunks, splits=list(found))
    source.sampling = next(iter(samplings), None)
    source.num_frames = max((f for f in frames if isinstance(f, int)), default=None)
    return source


def open_source(path: str | Path, chunk_size: int = 256, splits: list[str] | None = None) -> Source:
    """A folder of prepared shards (a root of split folders, or one split folder), else a folder of video files."""
    root = Path(path)
    if not root.is_dir():
        raise SearchSetupError(f"{root} is not a folder: give a folder of video files or of prepared shards")
    if is_split_dir(root) or any(is_split_dir(p) for p in root.iterdir() if p.is_dir()):
        return list_shards(root, splits)
    if splits:
        raise SearchSetupError(f"--split applies to prepared shards; {root} holds video files")
    if chunk_size < 1:
        raise SearchSetupError(f"chunk size must be positive, got {chunk_size}")
    source = list_files(root, chunk_size)
    if not source.chunks:
        raise SearchSetupError(f"{root} holds no file that could be a video ({len(source.ignored)} other files)")
    return source


# ----------------------------------------------------------------------------------------------- decoding
@dataclass
class DecodedClip:
    """One video ready to encode: uint8 frames [F, 3, S, S], their mask, and what the index keeps about it."""

    key: str
    frames: np.ndarray
    mask: np.ndarray
    item: dict[str, Any]


@dataclass
class Failure:
    """A video that could not be indexed, and why."""

    file: str
    reason: str


def _clip(jpegs: list[bytes] | None, images: list[Any], protocol: FrameProtocol, key: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 frames and mask of one clip: through the evaluation loader's JPEG decoding, or straight from images."""
    from tvr_bench.data.frames import stored_frame_plan
    from tvr_bench.data.streams import decode_clip
    from tvr_bench.data.transforms import clip_to_uint8

    if jpegs is not None:
        with warnings.catch_warnings():  # a short clip is padded (mask False); the index records its real frames
            warnings.simplefilter("ignore", UserWarning)
            frames, mask = decode_clip(jpegs, protocol.num_frames, protocol.image_size, key)
        return frames.numpy(), mask.numpy()
    picked, _ = stored_frame_plan(len(images), protocol.num_frames)
    frames = np.zeros((protocol.num_frames, 3, protocol.image_size, protocol.image_size), dtype=np.uint8)
    arrays = [np.asarray(images[i].convert("RGB")) for i in picked]
    frames[: len(picked)] = clip_to_uint8(arrays, protocol.image_size).numpy()
    mask = np.zeros(protocol.num_frames, dtype=bool)
    mask[: len(picked)] = True
    return frames, mask


def decode_file(root: Path, rel: str, protocol: FrameProtocol) -> DecodedClip | Failure:
    """Decode one video file with the protocol's sampling (any container PyAV opens); a Failure says why not."""
    from tvr_bench.data.frames import sample_indices
    from tvr_bench.data.shards import jpeg_bytes
    from tvr_bench.data.video import decode_video

    def choose(info: Any) -> list[int]:
        return sample_indices(protocol.sampling, info.num_frames, info.fps, protocol.num_frames)

    try:
        decoded = decode_video(root / rel, choose, protocol.short_side or protocol.image_size)
        q = protocol.jpeg_quality
        jpegs = None if q is None else [jpeg_bytes(image, q) for image in decoded.images]
        frames, mask = _clip(jpegs, decoded.images, protocol, rel)
    except Exception as exn:  # noqa: BLE001 - any decoder failure is listed, never fatal
        text = str(exn).strip().splitlines()[0] if str(exn).strip() else ""
        return Failure(rel, f"decode error: {type(exn).__name__}: {text}"[:300])
    info = decoded.info
    item = {"key": rel, "duration": round(float(info.duration), 3), "frames": int(mask.sum())}  # the key is the file
    return DecodedClip(rel, frames, mask, item)


def iter_shard_clips(root: Path, chunk: Chunk, protocol: FrameProtocol, prefix_split: bool) -> Iterator[DecodedClip | Failure]:
    """The videos of one shard, decoded as the evaluation loader decodes them; a bad sample is a Failure."""
    from tvr_bench.data.shards import iter_shard, parse_sample

    assert chunk.shard is not None
    path = root / chunk.shard
    for raw in iter_shard(path):
        key = str(raw.get("__key__", "?"))
        where = f"{chunk.shard}:{key}"
        try:
            meta, jpegs = parse_sample(raw)
            frames, mask = _clip(jpegs, [], protocol, key)
        except Exception as exn:  # noqa: BLE001 - one broken sample is listed, the rest indexed
            text = str(exn).strip().splitlines()[0] if str(exn).strip() else ""
            yield Failure(where, f"unreadable sample: {type(exn).__name__}: {text}"[:300])
            continue
        original = meta.get("original") or {}
        name = f"{chunk.split}/{key}" if prefix_split else key
        item = {"key": name, "source": chunk.shard, "sample": key, "frames": int(mask.sum()),
                "duration": round(float(original.get("duration") or 0.0), 3)}
        yield DecodedClip(name, frames, mask, item)


def item_line(item: dict[str, Any]) -> str:
    """One items.jsonl line (compact)."""
    return json.dumps(item, ensure_ascii=False, separators=(",", ":"))
