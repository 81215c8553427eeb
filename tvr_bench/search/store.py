"""The search index on disk (docs/search.md): one folder, complete or absent.

    INDEX/index.json        what was indexed, with what model (fingerprint) and frame protocol; written last
    INDEX/vectors.npy       float32 [N, D]: the two-tower video vectors, or the first-stage vectors (rerank)
    INDEX/features/*.npy    rerank methods: every video feature `encode_video` returns, [N, ...] (memory-mapped)
    INDEX/items.jsonl       one line per row: key, source file (or shard), duration, real frames
    INDEX/failures.json     the videos that could not be indexed, with the reason
    INDEX/approx.faiss      optional approximate vector index (IVF) over vectors.npy

While it is built everything goes to ``INDEX.partial/``: each finished chunk of videos is a folder
``chunks/<name>/`` recorded in ``progress.json`` (written atomically after the chunk), so an interrupted build
resumes from its last finished chunk and gives the same arrays as an uninterrupted one. At the end the chunks
are copied into the final arrays and the folder is renamed to ``INDEX`` in one step.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from tvr_bench.data.shards import read_tagged_json, write_json_atomic
from tvr_bench.search.model import SearchSetupError

KIND = "tvr-bench-search-index"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
VECTORS_FILE = "vectors.npy"
ITEMS_FILE = "items.jsonl"
FAILURES_FILE = "failures.json"
APPROX_FILE = "approx.faiss"
FEATURES_DIR = "features"
PROGRESS_FILE = "progress.json"
PARTIAL_SUFFIX = ".partial"


class IndexFolderError(SearchSetupError):
    """An index folder that is missing, unfinished, damaged or built for something else."""


def partial_dir(out: Path) -> Path:
    """The folder an index is built in before it is renamed to `out`."""
    return out.with_name(out.name + PARTIAL_SUFFIX)


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
    os.replace(tmp, path)


class IndexWriter:
    """Builds an index in ``<out>.partial`` chunk by chunk (resumable), then finishes it into ``out``."""

    def __init__(self, out: str | Path, config: dict[str, Any], resume: bool = False, overwrite: bool = False) -> None:
        self.out = Path(out)
        self.work = partial_dir(self.out)
        self.config = json.loads(json.dumps(config, default=str))
        if self.out.exists():
            if not overwrite:
                raise IndexFolderError(f"{self.out} exists: pass --overwrite to rebuild it, or choose another --out")
            if not (self.out / INDEX_FILE).is_file() and any(self.out.iterdir()):
                raise IndexFolderError(f"{self.out} exists and is not a search index: refusing to delete it")
        if self.work.exists() and (overwrite or not resume):
            if not (self.work / PROGRESS_FILE).is_file() and any(self.work.iterdir()):
                raise IndexFolderError(f"{self.work} exists and is not an unfinished search index: remove it yourself")
            if not overwrite:
                raise IndexFolderError(
                    f"an interrupted build of {self.out} is in {self.work}: pass --resume to continue it "
                    f"or --overwrite to start again"
                )
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        progress = self.work / PROGRESS_FILE
        if progress.is_file():
            state = json.loads(progress.read_text(encoding="utf-8"))
            if state.get("config") != self.config:
                changed = sorted(k for k in set(state.get("config", {})) | set(self.config)
                                 if state.get("config", {}).get(k) != self.config.get(k))
                raise IndexFolderError(
                    f"cannot resume {self.work}: it was started with other settings ({', '.join(changed)} differ); "
                    f"use the same checkpoint, source and options, or --overwrite"
                )
            self.state = state
        else:
            self.state = {"kind": KIND, "config": self.config, "chunks": {}}
            write_json_atomic(progress, self.state)
        self._clean_unrecorded()

    def _clean_unrecorded(self) -> None:
        """Drop chunk folders that were being written when the build stopped (not in progress.json)."""
        chunks = self.work / "chunks"
        for path in sorted(chunks.glob("*")) if chunks.is_dir() else []:
            if path.name not in self.state["chunks"]:
                shutil.rmtree(path)
        for name in self.state["chunks"]:
            if not (chunks / name).is_dir():
                raise IndexFolderError(f"{chunks / name} is recorded as finished but missing: rebuild with --overwrite")

    def done(self, name: str) -> bool:
        """Whether chunk `name` was finished (by this or an interrupted earlier run)."""
        return name in self.state["chunks"]

    def write_chunk(self, name: str, vectors: np.ndarray, features: dict[str, np.ndarray], items: list[dict[str, Any]],
                    failures: list[dict[str, str]]) -> None:
        """Store one finished chunk and record it (the record is the commit point)."""
        folder = self.work / "chunks" / name
        tmp = folder.with_name(name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / FEATURES_DIR).mkdir(parents=True)
        if len(items) != len(vectors) or any(len(a) != len(items) for a in features.values()):
            raise ValueError(f"chunk {name}: {len(items)} items, {len(vectors)} vectors, features {[len(a) for a in features.values()]}")
        _save_npy(tmp / VECTORS_FILE, vectors.astype(np.float32, copy=False))
        for key, array in features.items():
            _save_npy(tmp / FEATURES_DIR / f"{key}.npy", array)
        (tmp / ITEMS_FILE).write_text("".join(json.dumps(i, ensure_ascii=False, separators=(",", ":")) + "\n" for i in items),
                                      encoding="utf-8")
        os.replace(tmp, folder)
        self.state["chunks"][name] = {"videos": len(items), "failures": failures}
        write_json_atomic(self.work / PROGRESS_FILE, self.state)

    def finish(self, order: list[str], meta: dict[str, Any]) -> dict[str, Any]:
        """Concatenate the chunks in `order` into the final arrays, write index.json and rename into place."""
        chunks = [self.work / "chunks" / name for name in order if self.state["chunks"].get(name, {}).get("videos")]
        failures = [f for name in order for f in self.state["chunks"].get(name, {}).get("failures", [])]
        total = sum(self.state["chunks"][p.name]["videos"] for p in chunks)
        if total == 0:
            shown = "; ".join(f"{f['file']}: {f['reason']}" for f in failures[:3])
            raise IndexFolderError(f"no video could be indexed ({len(failures)} failed{': ' + shown if shown else ''})")
        names = sorted(p.stem for p in (chunks[0] / FEATURES_DIR).glob("*.npy"))
        _concat([p / VECTORS_FILE for p in chunks], self.work / VECTORS_FILE)
        (self.work / FEATURES_DIR).mkdir(exist_ok=True)
        for key in names:
            _concat([p / FEATURES_DIR / f"{key}.npy" for p in chunks], self.work / FEATURES_DIR / f"{key}.npy")
        keys: set[str] = set()
        with open(self.work / ITEMS_FILE, "w", encoding="utf-8") as fh:
            for p in chunks:
                for line in (p / ITEMS_FILE).read_text(encoding="utf-8").splitlines():
                    key = json.loads(line)["key"]
                    if key in keys:
                        raise IndexFolderError(f"two videos share the key {key!r}: index their splits separately (--split)")
                    keys.add(key)
                    fh.write(line + "\n")
        write_json_atomic(self.work / FAILURES_FILE, failures)
        vectors = np.load(self.work / VECTORS_FILE, mmap_mode="r")
        index = {**meta, "kind": KIND, "format_version": FORMAT_VERSION, "config": self.config, "num_videos": total,
                 "num_failures": len(failures), "dim": int(vectors.shape[1]), "features": names}
        del vectors
        write_json_atomic(self.work / INDEX_FILE, index)
        shutil.rmtree(self.work / "chunks")
        (self.work / PROGRESS_FILE).unlink()
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.work, self.out)
        return index


def _concat(parts: Iterable[Path], out: Path) -> None:
    """Concatenate .npy arrays along rows into `out` without holding them all in memory."""
    parts = list(parts)
    arrays = [np.load(p, mmap_mode="r") for p in parts]
    shape = (sum(a.shape[0] for a in arrays), *arrays[0].shape[1:])
    for p, a in zip(parts, arrays):
        if a.shape[1:] != shape[1:] or a.dtype != arrays[0].dtype:
            raise IndexFolderError(f"{p}: shape {a.shape} / {a.dtype} does not match {arrays[0].shape} / {arrays[0].dtype}")
    tmp = out.with_name(out.name + ".tmp")
    target = np.lib.format.open_memmap(tmp, mode="w+", dtype=arrays[0].dtype, shape=shape)
    row = 0
    for a in arrays:
        target[row : row + len(a)] = a
        row += len(a)
    target.flush()
    del target
    os.replace(tmp, out)


# ----------------------------------------------------------------------------------------------- reading
class Items:
    """The rows of items.jsonl, parsed on access: the file is memory-mapped and only line offsets are kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        self._data = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        ends = np.flatnonzero(self._data == 10) + 1
        self._starts = np.concatenate([[0], ends[:-1]]).astype(np.int64) if len(ends) else np.zeros(0, np.int64)
        self._ends = ends.astype(np.int64)

    def __len__(self) -> int:
        return int(len(self._ends))

    def __getitem__(self, row: int) -> dict[str, Any]:
        if not -len(self) <= row < len(self):
            raise IndexError(f"row {row} of {len(self)} items")
        row = row % len(self)
        return json.loads(bytes(self._data[self._starts[row] : self._ends[row]]))

    def __iter__(self):  # noqa: ANN204 - an iterator of dicts
        return (self[i] for i in range(len(self)))


@dataclass
class StoredIndex:
    """A finished index read back: its metadata, memory-mapped vectors and features, items and failures."""

    path: Path
    meta: dict[str, Any]
    vectors: np.ndarray  # [N, D] float32, memory-mapped
    features: dict[str, np.ndarray]  # name -> [N, ...], memory-mapped
    items: Items

    @property
    def num_videos(self) -> int:
        """Rows of the index."""
        return int(self.vectors.shape[0])

    def failures(self) -> list[dict[str, str]]:
        """The videos that could not be indexed."""
        return json.loads((self.path / FAILURES_FILE).read_text(encoding="utf-8"))

    def bytes_on_disk(self) -> dict[str, int]:
        """Bytes of each file of the index (approx.faiss counted apart from the exact index)."""
        return {p.relative_to(self.path).as_posix(): p.stat().st_size for p in sorted(self.path.rglob("*")) if p.is_file()}


def read_meta(path: str | Path) -> dict[str, Any]:
    """index.json of a finished index; a clear error for a missing, unfinished or foreign folder."""
    path = Path(path)
    meta_path = path / INDEX_FILE
    if not meta_path.is_file():
        if partial_dir(path).is_dir():
            raise IndexFolderError(f"{path} is not finished ({partial_dir(path)} holds an interrupted build): rerun "
                              f"`tvr-bench index ... --out {path} --resume`")
        raise IndexFolderError(f"no search index at {path} ({INDEX_FILE} missing): build one with `tvr-bench index SOURCE "
                          f"--ckpt RUN --out {path}`")
    return read_tagged_json(meta_path, KIND, FORMAT_VERSION, IndexFolderError, "tvr-bench search index")


def open_stored(path: str | Path) -> StoredIndex:
    """Open a finished index: arrays memory-mapped (nothing is read until used), rows checked against the items."""
    path = Path(path)
    meta = read_meta(path)
    try:
        vectors = np.load(path / VECTORS_FILE, mmap_mode="r", allow_pickle=False)
        features = {k: np.load(path / FEATURES_DIR / f"{k}.npy", mmap_mode="r", allow_pickle=False) for k in meta["features"]}
        items = Items(path / ITEMS_FILE)
    except (OSError, ValueError) as exn:
        raise IndexFolderError(f"{path}: damaged index ({type(exn).__name__}: {exn}); rebuild it with --overwrite") from exn
    counts = {len(items), vectors.shape[0], meta.get("num_videos"), *(a.shape[0] for a in features.values())}
    if len(counts) != 1:
        raise IndexFolderError(f"{path}: items, vectors and features disagree on the number of videos ({sorted(map(str, counts))})")
    return StoredIndex(path, meta, vectors, features, items)
