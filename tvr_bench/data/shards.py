"""The shard format (DESIGN contract 3, documented in data_cards/FORMAT.md).

One WebDataset sample per video: ``{key}.000.jpg`` ... ``{key}.NNN.jpg`` (the stored frames, in time
order) and ``{key}.json`` (metadata with all captions). Only JPEG and JSON members, never pickle.
Per split: ``{root}/{split}/shard-00000.tar ...`` and ``{root}/{split}/index.json``; the dataset root
holds ``manifest.json`` (failures). Shards are written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import webdataset as wds

FORMAT_VERSION = 1
SHARD_PATTERN = "shard-{:05d}.tar"
SHARD_GLOB = "shard-*.tar"
INDEX_FILE = "index.json"
MANIFEST_FILE = "manifest.json"
FRAME_RE = re.compile(r"^(\d{3,})\.jpg$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")
# Fixed tar member metadata so identical content gives identical shard bytes (resume, checksums). An int:
# a float mtime makes tarfile write a pax extended header before every member, which doubled the header
# parsing per member when reading (DataModule 0.75 -> 0.88 of the JPEG-decode ceiling without them).
_TAR_MTIME = 0


class ShardError(RuntimeError):
    """A shard or one of its samples is unreadable or incomplete; the message names file and key."""


class MissingShardsError(FileNotFoundError):
    """A split was never prepared (or lost a shard); the message names the path and the data card."""


#: Members WebDataset adds to every sample (not stored in the tar).
_SAMPLE_FIELDS = frozenset({"__key__", "__url__", "__local_path__"})


def sanitize_key(video_id: str) -> str:
    """Stable WebDataset key for a video id: ids with characters other than ``[A-Za-z0-9_-]`` (dots
    cut WebDataset keys) get them replaced by ``_`` plus an 8-hex hash of the original, so distinct
    ids never collide."""
    if not video_id:
        raise ValueError("empty video id")
    clean = _UNSAFE.sub("_", video_id)
    if clean == video_id and not clean.startswith("__"):
        return clean
    digest = hashlib.sha1(video_id.encode("utf-8")).hexdigest()[:8]
    return f"{clean.lstrip('_') or 'v'}_{digest}"


def frame_member(i: int) -> str:
    """Member extension of the i-th stored frame (``000.jpg``)."""
    return f"{i:03d}.jpg"


def encode_sample(key: str, frames: list[bytes], meta: dict[str, Any]) -> dict[str, Any]:
    """Build the dict that :class:`webdataset.TarWriter` writes: JPEG frames plus the JSON member."""
    if "." in key or _UNSAFE.search(key):
        raise ValueError(f"key {key!r} is not sanitised (use sanitize_key)")
    sample: dict[str, Any] = {"__key__": key}
    for i, data in enumerate(frames):
        sample[frame_member(i)] = data
    sample["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return sample


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ShardInfo:
    """What index.json records about one finished shard."""

    file: str
    num_samples: int
    num_captions: int
    sha256: str
    bytes: int

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict form for index.json."""
        return {
            "file": self.file,
            "num_samples": self.num_samples,
            "num_captions": self.num_captions,
            "sha256": self.sha256,
            "bytes": self.bytes,
        }


class ShardFile:
    """Writes one shard to ``<final>.tmp`` and renames it to ``<final>`` on :meth:`finish`.

    Refuses to start when the final name already exists unless ``replace=True`` (used by resume for
    shards that were not recorded as finished).
    """

    def __init__(self, final: Path, replace: bool = False) -> None:
        self.final = Path(final)
        if self.final.exists() and not replace:
            raise FileExistsError(f"{self.final} exists; refusing to overwrite a finished shard")
        self.tmp = self.final.with_name(self.final.name + ".tmp")
        self._stream = open(self.tmp, "wb")
        self._writer = wds.TarWriter(self._stream, encoder=False, mtime=_TAR_MTIME)
        self.num_samples = 0
        self.num_captions = 0

    def write(self, sample: dict[str, Any], num_captions: int) -> None:
        """Append one encoded sample."""
        self._writer.write(sample)
        self.num_samples += 1
        self.num_captions += num_captions

    def finish(self) -> ShardInfo:
        """Close, fsync and rename to the final name; return its index entry."""
        self._writer.close()
        if not self._stream.closed:
            self._stream.flush()
            os.fsync(self._stream.fileno())
            self._stream.close()
        os.replace(self.tmp, self.final)
        return ShardInfo(
            file=self.final.name,
            num_samples=self.num_samples,
            num_captions=self.num_captions,
            sha256=sha256_file(self.final),
            bytes=self.final.stat().st_size,
        )

    def abort(self) -> None:
        """Drop the temporary file."""
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - best effort cleanup of a half-written file
            pass
        if not self._stream.closed:
            self._stream.close()
        self.tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` via a temporary file and rename (no half-written files)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_tagged_json(path: Path, kind: str, version: int, error: type[Exception], what: str) -> dict[str, Any]:
    """A JSON record written by tvr-bench (`kind`, `format_version`), checked; each problem raises ``error``
    naming ``path`` (unreadable, not a ``what``, another format version)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exn:
        raise error(f"{path}: unreadable JSON ({exn})") from exn
    if not isinstance(record, dict) or record.get("kind") != kind:
        found = record.get("kind") if isinstance(record, dict) else None
        raise error(f"{path}: not a {what} (kind {found!r})")
    if record.get("format_version") != version:
        raise error(f"{path}: format_version {record.get('format_version')} (this code reads {version})")
    return record


def missing_data_message(path: Path, dataset: str) -> str:
    """Error text for a missing shard directory or index, pointing to the dataset's data card."""
    return (
        f"no prepared shards at {path}: prepare the {dataset!r} dataset first "
        f"(see data_cards/{dataset}.md for the download and `tvr-bench prepare` commands)"
    )


def read_index(split_dir: Path, dataset: str = "<dataset>") -> dict[str, Any]:
    """Load ``{split_dir}/index.json``; a clear FileNotFoundError when the split was never prepared."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise MissingShardsError(missing_data_message(split_dir, dataset))
    index_path = split_dir / INDEX_FILE
    if not index_path.is_file():
        raise MissingShardsError(missing_data_message(index_path, dataset))
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        entries = [(str(e["file"]), int(e["num_samples"])) for e in index["shards"]]
        int(index["num_samples"]), int(index["num_captions"])
    except (ValueError, KeyError, TypeError) as exn:
        raise ShardError(
            f"{index_path}: unreadable index ({type(exn).__name__}: {exn}); "
            f"re-run `tvr-bench prepare --overwrite` (see data_cards/{dataset}.md)"
        ) from exn
    for name, _ in entries:
        if Path(name).name != name or not name.endswith(".tar"):
            raise ShardError(f"{index_path}: shard entry {name!r} is not a tar file name inside {split_dir}")
    for entry in index["shards"]:
        if not (split_dir / entry["file"]).is_file():
            raise MissingShardsError(
                f"{split_dir / entry['file']} is listed in {index_path} but missing; "
                f"re-run `tvr-bench prepare` (see data_cards/{dataset}.md)"
            )
    return index


def parse_sample(sample: dict[str, Any]) -> tuple[dict[str, Any], list[bytes]]:
    """Validate a raw WebDataset sample and return (metadata, frame JPEG bytes in order).

    Raises :class:`ShardError` naming the shard file, the key and the problem.
    """
    key = sample.get("__key__", "?")
    where = f"{sample.get('__url__', '?')}: sample {key!r}"
    foreign = sorted(name for name in sample if name not in _SAMPLE_FIELDS and name != "json" and not FRAME_RE.match(name))
    if foreign:
        raise ShardError(
            f"{where}: unexpected member(s) {', '.join(foreign)}: shards hold only NNN.jpg frames and one json "
            f"(no other member, e.g. a pickle, is ever read)"
        )
    if "json" not in sample:
        raise ShardError(f"{where}: no json member (metadata and captions missing)")
    try:
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError) as exn:
        raise ShardError(f"{where}: unreadable json member: {exn}") from exn
    if not isinstance(meta, dict):
        raise ShardError(f"{where}: json member is not an object: {meta!r:.80}")
    captions = meta.get("captions")
    if not isinstance(captions, list) or not captions:
        raise ShardError(f"{where}: no captions ('captions' must be a non-empty list of strings, got {captions!r})")
    blank = [i for i, c in enumerate(captions) if not (isinstance(c, str) and c.strip())]
    if blank:
        raise ShardError(f"{where}: empty caption(s) at position {blank} of {captions!r}")
    frames = sorted((int(m.group(1)), name) for name in sample if (m := FRAME_RE.match(name)))
    expected = meta.get("num_frames")
    if not frames:
        raise ShardError(f"{where}: no frame members (expected {expected} x NNN.jpg)")
    if [i for i, _ in frames] != list(range(len(frames))) or (expected is not None and len(frames) != expected):
        raise ShardError(
            f"{where}: frames missing: has {[n for _, n in frames]}, json says num_frames={expected}"
        )
    return meta, [sample[name] for _, name in frames]


def iter_shard(path: Path) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard file, in stored order (for inspection and tests)."""
    dataset = wds.WebDataset(str(path), shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
    yield from dataset


def verify_split(split_dir: Path) -> list[str]:
    """Re-hash and re-count every shard of a split against index.json; returns the problems found."""
    split_dir = Path(split_dir)
    index = read_index(split_dir)
    problems = []
    for entry in index["shards"]:
        path = split_dir / entry["file"]
        if sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from index.json")
        try:
            count = sum(1 for sample in iter_shard(path) if parse_sample(sample))
        except Exception as exn:  # noqa: BLE001 - reported, not raised
            problems.append(f"{path}: unreadable: {exn}")
            continue
        if count != entry["num_samples"]:
            problems.append(f"{path}: {count} samples, index.json says {entry['num_samples']}")
    return problems


def jpeg_bytes(image: Any, quality: int) -> bytes:
    """Encode a PIL image as baseline JPEG bytes."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
