"""Random access to the samples of prepared shards through an index of member offsets (``offsets.json``).

``tvr-bench prepare`` writes ``{split}/offsets.json`` beside index.json: for every shard (in index order)
the byte range of each sample (its first member header to the end of its last member, tar padding
included) and its number of captions. The training loader reads a sample with one ``pread`` of that range
and splits the tar members itself (:class:`SampleReader`), so any sample of any shard is one read away:
no shard is streamed, no pool of undecoded videos is held.

Shards prepared before the index existed still work: :func:`load_offsets` builds the index from the tar
headers on first use (a scan that seeks over the frame data and reads the small JSON members) and writes
it next to index.json when the directory is writable (otherwise it is kept in memory, for this run). An
index whose shard names, sizes or sha256 differ from index.json is rebuilt the same way.

Remote roots (URL or ``pipe:``) are copied once into a local cache (:func:`cache_remote_split`, sha256
checked against index.json) before training reads them by offset; evaluation keeps streaming them.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tvr_bench.data.shards import INDEX_FILE, ShardError, parse_sample, read_index

OFFSETS_FILE = "offsets.json"
OFFSETS_VERSION = 1
_BLOCK = 512
#: Open shard files kept per process (least recently used closed first).
MAX_OPEN_FILES = 64


def _member_key(name: str) -> tuple[str | None, str | None]:
    """(key, lower-case suffix) of a tar member name, cut at the first dot of its base name (WebDataset's rule)."""
    head, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    if not dot or not stem:
        return None, None
    return (f"{head}/{stem}" if head else stem), suffix.lower()


def _skipped(name: str) -> bool:
    """WebDataset skips ``__*__`` metadata members (its ``skip_meta`` pattern)."""
    return re.match(r"__[^/]*__($|/)", name) is not None


def scan_shard(path: str | Path) -> list[list[Any]]:
    """``[key, offset, length, num_captions]`` of every sample of a local shard, in stored order; the JSON member
    of each sample is validated as the loaders do (errors name the shard and key)."""
    out: list[list[Any]] = []
    current: list[Any] | None = None
    names: dict[str, bytes] = {}

    def close() -> None:
        if current is None:
            return
        meta, _ = parse_sample({"__key__": current[0], "__url__": str(path), **names})
        current[3] = len(meta["captions"])
        out.append(current)

    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isreg() or _skipped(member.name):
                    continue
                key, suffix = _member_key(member.name)
                if key is None or suffix is None:
                    continue
                end = member.offset_data + -(-member.size // _BLOCK) * _BLOCK
                if current is None or key != current[0]:
                    close()
                    current, names = [key, member.offset, 0, 0], {}
                current[2] = end - current[1]
                if suffix == "json":
                    handle = tar.extractfile(member)
                    names[suffix] = handle.read() if handle is not None else b""
                else:
                    names[suffix] = b""
    except ShardError:
        raise
    except (tarfile.TarError, OSError, EOFError) as exn:
        after = f"after sample {out[-1][0]!r}" if out else "before its first sample"
        raise ShardError(f"{path}: corrupt or truncated shard ({after}): {type(exn).__name__}: {exn}; "
                         f"re-run `tvr-bench prepare` for this dataset") from exn  # fmt: skip
    close()
    return out


def build_offsets(split_dir: Path, index: dict[str, Any]) -> dict[str, Any]:
    """The offsets.json payload of a local split: every shard of index.json scanned (:func:`scan_shard`)."""
    shards = []
    for entry in index["shards"]:
        path = Path(split_dir) / entry["file"]
        samples = scan_shard(path)
        if len(samples) != int(entry["num_samples"]):
            raise ShardError(f"{path}: corrupt or truncated shard: read {len(samples)} samples, index.json says "
                             f"{entry['num_samples']}; re-run `tvr-bench prepare`")  # fmt: skip
        shards.append({"file": entry["file"], "sha256": entry.get("sha256"), "bytes": entry.get("bytes"), "samples": samples})
    return {"format_version": OFFSETS_VERSION, "split": index.get("split"), "shards": shards}


def write_offsets(split_dir: Path, index: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build ``{split_dir}/offsets.json`` from the shards and write it atomically (compact JSON); returns it."""
    split_dir = Path(split_dir)
    payload = build_offsets(split_dir, index if index is not None else read_index(split_dir))
    tmp = split_dir / f"{OFFSETS_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(payload, separators=(",", ":"), ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, split_dir / OFFSETS_FILE)
    return payload


def _matches(payload: Any, index: dict[str, Any]) -> bool:
    """Whether an offsets payload describes exactly the shards index.json lists (names, sizes, sha256, counts)."""
    try:
        if payload.get("format_version") != OFFSETS_VERSION or len(payload["shards"]) != len(index["shards"]):
            return False
        return all(
            (o["file"], o["sha256"], o["bytes"], len(o["samples"])) == (e["file"], e.get("sha256"), e.get("bytes"), int(e["num_samples"]))
            for o, e in zip(payload["shards"], index["shards"])
        )
    except (AttributeError, KeyError, TypeError):
        return False


@dataclass
class SplitOffsets:
    """Where every sample of a split lies: shard file, byte offset and length, captions; in shard order."""

    files: list[str]
    shard: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    captions: np.ndarray
    keys: list[str] = field(repr=False)

    @property
    def num_samples(self) -> int:
        """Samples in the split."""
        return len(self.keys)

    @classmethod
    def from_payload(cls, split_dir: Path, payload: dict[str, Any]) -> "SplitOffsets":
        """Arrays of an offsets.json payload, files resolved under ``split_dir``."""
        files, shard, keys, offset, length, captions = [], [], [], [], [], []
        for i, entry in enumerate(payload["shards"]):
            files.append(str(Path(split_dir) / entry["file"]))
            for key, start, size, count in entry["samples"]:
                shard.append(i)
                keys.append(key)
                offset.append(start)
                length.append(size)
                captions.append(count)
        return cls(files, np.asarray(shard, dtype=np.int32), np.asarray(offset, dtype=np.int64),
                   np.asarray(length, dtype=np.int64), np.asarray(captions, dtype=np.int64), keys)  # fmt: skip


def load_offsets(split_dir: str | Path, index: dict[str, Any] | None = None) -> SplitOffsets:
    """The offsets of a local split: ``offsets.json`` when it matches index.json, else built from the shards
    (and written next to index.json when the directory is writable)."""
    split_dir = Path(split_dir)
    index = index if index is not None else read_index(split_dir)
    path = split_dir / OFFSETS_FILE
    payload: Any = None
    if path.is_file():
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            payload = None
    if not _matches(payload, index):
        try:
            payload = write_offsets(split_dir, index)
        except OSError:  # a read-only dataset: keep the index in memory for this run
            payload = build_offsets(split_dir, index)
    return SplitOffsets.from_payload(split_dir, payload)


def split_members(data: bytes, where: str, key: str) -> dict[str, bytes]:
    """The members of one sample's byte range as ``{suffix: bytes}`` (plain ustar members parsed directly, any
    other header kind through :mod:`tarfile`); a bad header, a short range or another key raises ShardError."""
    out: dict[str, bytes] = {}
    pos = 0
    try:
        while pos < len(data):
            header = data[pos : pos + _BLOCK]
            parsed = _plain_header(header)
            if parsed is None:
                info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")  # raises on a bad header
                if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
                    return _split_with_tarfile(data, where, key)
                parsed = info.name, info.size
            name, size = parsed
            start = pos + _BLOCK
            if start + size > len(data):
                raise EOFError(f"member {name!r} needs {size} bytes, {len(data) - start} left")
            _add_member(out, name, data[start : start + size], where, key)
            pos = start + -(-size // _BLOCK) * _BLOCK
    except ShardError:
        raise
    except (tarfile.TarError, EOFError, ValueError) as exn:
        raise ShardError(f"{where}: corrupt or truncated shard at sample {key!r}: {type(exn).__name__}: {exn}; "
                         f"re-run `tvr-bench prepare` for this dataset") from exn  # fmt: skip
    return out


def _plain_header(header: bytes) -> tuple[str, int] | None:
    """(name, size) of a plain ustar regular-file header with a valid checksum, read directly (``tarfile`` takes
    about 10x longer); None for anything else (other types, a ``prefix`` field, base-256 sizes, bad checksums),
    which :mod:`tarfile` then handles or rejects."""
    if len(header) != _BLOCK or header[156] not in (0x30, 0) or header[257:262] != b"ustar" or header[345] or header[124] & 0x80:
        return None
    try:
        checksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    if checksum != sum(header) - sum(header[148:156]) + 256:
        return None
    return header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape"), size


def _split_with_tarfile(data: bytes, where: str, key: str) -> dict[str, bytes]:
    """:func:`split_members` for ranges holding pax / GNU long-name headers."""
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if member.isreg() and not _skipped(member.name):
                handle = tar.extractfile(member)
                _add_member(out, member.name, handle.read() if handle is not None else b"", where, key)
    return out


def _add_member(out: dict[str, bytes], name: str, value: bytes, where: str, key: str) -> None:
    """Store one member under its suffix; a member of another sample means the index and shard disagree."""
    found, suffix = _member_key(name)
    if found != key or suffix is None:
        raise ShardError(f"{where}: corrupt shard or stale {OFFSETS_FILE}: member {name!r} where sample {key!r} was "
                         f"indexed; delete {OFFSETS_FILE} to rebuild it, or re-run `tvr-bench prepare`")  # fmt: skip
    if suffix in out:
        raise ShardError(f"{where}: sample {key!r}: duplicate member {name!r}")
    out[suffix] = value


class SampleReader:
    """Raw samples (``{"__key__", "__url__", suffix: bytes}``, as WebDataset yields them) by global index, one
    ``pread`` each; file descriptors are opened lazily per process (forked workers open their own)."""

    def __init__(self, offsets: SplitOffsets) -> None:
        self.offsets = offsets
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (spawned workers): without the open descriptors."""
        return {**self.__dict__, "_fds": {}, "_pid": -1}

    def _fd(self, shard: int) -> int:
        """The descriptor of a shard file in this process (least recently used closed beyond MAX_OPEN_FILES)."""
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()  # inherited descriptors belong to the parent's table
        fd = self._fds.pop(shard, None)
        if fd is None:
            path = self.offsets.files[shard]
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exn:
                raise ShardError(f"{path}: cannot open shard: {exn}; re-run `tvr-bench prepare`") from exn
            if len(self._fds) >= MAX_OPEN_FILES:
                os.close(self._fds.pop(next(iter(self._fds))))
        self._fds[shard] = fd
        return fd

    def raw(self, i: int) -> dict[str, Any]:
        """Sample ``i`` of the split (global index in shard order); errors name the shard file and key."""
        o = self.offsets
        shard, key = int(o.shard[i]), o.keys[i]
        where, start, size = o.files[shard], int(o.offset[i]), int(o.length[i])
        data = os.pread(self._fd(shard), size, start)
        if len(data) < size:
            raise ShardError(f"{where}: corrupt or truncated shard at sample {key!r}: bytes {start}-{start + size} "
                             f"indexed, the file ends at {start + len(data)}; re-run `tvr-bench prepare` for this dataset")  # fmt: skip
        return {"__key__": key, "__url__": where, **split_members(data, where, key)}

    def close(self) -> None:
        """Close this process's descriptors."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}


def default_cache_dir() -> Path:
    """Where remote training shards are cached: ``$TVR_BENCH_CACHE``, else ``$XDG_CACHE_HOME/tvr-bench/shards``
    (``~/.cache/tvr-bench/shards``)."""
    if os.environ.get("TVR_BENCH_CACHE"):
        return Path(os.environ["TVR_BENCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tvr-bench" / "shards"


def cache_remote_split(urls: list[str], index: dict[str, Any], split: str, root: str, cache_dir: str | Path) -> Path:
    """Copy a remote split's shards (``urls``, in index order) into ``{cache_dir}/{hash of root}/{split}`` once,
    each checked against index.json's sha256 (a lock per shard: ranks of one node copy each shard once); returns
    the local split directory, with index.json written last."""
    import webdataset as wds

    local = Path(cache_dir) / hashlib.sha1(root.encode()).hexdigest()[:16] / split
    local.mkdir(parents=True, exist_ok=True)
    for url, entry in zip(urls, index["shards"]):
        target = local / entry["file"]
        with open(local / f"{entry['file']}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if target.is_file() and target.stat().st_size == int(entry.get("bytes", -1)):
                continue
            tmp = local / f"{entry['file']}.{os.getpid()}.tmp"
            digest = hashlib.sha256()
            try:
                with wds.gopen(url) as stream, open(tmp, "wb") as out:
                    for block in iter(lambda: stream.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
            except Exception as exn:  # noqa: BLE001 - re-raised with the URL named
                tmp.unlink(missing_ok=True)
                raise ShardError(f"{url}: cannot copy the shard into the training cache {local}: {type(exn).__name__}: {exn}") from exn
            if entry.get("sha256") and digest.hexdigest() != entry["sha256"]:
                tmp.unlink(missing_ok=True)
                raise ShardError(f"{url}: sha256 {digest.hexdigest()} differs from index.json's {entry['sha256']}: "
                                 f"the remote shard is corrupt or out of date; re-upload the prepared split")  # fmt: skip
            os.replace(tmp, target)
    tmp = local / f"{INDEX_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(index, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, local / INDEX_FILE)
    return local
