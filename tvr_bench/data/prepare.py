"""Generic, resumable converter: video files + captions -> WebDataset shards of pre-sampled frames.

Input is an iterable of :class:`VideoRecord` (one per video, or several that are merged by id).
Videos are decoded with PyAV in ``workers`` processes, ``num_frames`` frames are chosen by a sampling
policy (``tvr_bench.data.frames``), resized to ``short_side`` and stored as JPEG. Videos that are
missing or cannot be decoded are listed with the reason in ``{out}/manifest.json``. Every split gets
``index.json`` and ``offsets.json`` (each sample's byte range in its shard: random access for training).

Resume: after every finished shard, ``{out}/prepare_progress.json`` records the shard (file, sha256,
video ids, failures). ``resume=True`` keeps those shards, skips their videos, deletes anything else
(a half-written ``.tmp`` or an unrecorded shard) and continues with the same shard numbering, so a
resumed run produces the same shards as an uninterrupted one.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import re
import signal
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from tvr_bench.data.frames import POLICIES, sample_indices
from tvr_bench.data.offsets import OFFSETS_FILE, write_offsets
from tvr_bench.data.shards import (
    FORMAT_VERSION,
    INDEX_FILE,
    MANIFEST_FILE,
    SHARD_PATTERN,
    ShardFile,
    encode_sample,
    jpeg_bytes,
    sanitize_key,
    write_json_atomic,
)
from tvr_bench.data.video import TarMember, decode_video

PROGRESS_FILE = "prepare_progress.json"


@dataclass
class VideoRecord:
    """One video to convert: id, file (or tar member), captions, split, optional [start, end) seconds, extra metadata."""

    video_id: str
    path: Path | TarMember
    captions: list[str]
    split: str
    start: float | None = None
    end: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PrepareConfig:
    """Settings that define the content of the shards (a resumed run must use the same)."""

    dataset: str
    num_frames: int = 12
    sampling: str = "fps1_uniform"
    short_side: int = 224
    jpeg_quality: int = 95
    shard_size: int = 200

    def __post_init__(self) -> None:
        if self.sampling not in POLICIES:
            raise ValueError(f"unknown sampling policy {self.sampling!r}; choose one of {', '.join(POLICIES)}")
        if self.num_frames < 1 or self.shard_size < 1 or self.short_side < 1:
            raise ValueError("num_frames, shard_size and short_side must be positive")


@dataclass
class ConvertResult:
    """Outcome of converting one record: an encoded sample, or the reason it failed."""

    video_id: str
    file: str
    sample: dict[str, Any] | None = None
    num_captions: int = 0
    reason: str | None = None


@dataclass
class PrepareReport:
    """Summary returned by :func:`prepare`."""

    out: Path
    splits: dict[str, dict[str, int]]
    failures: list[dict[str, str]]
    converted: int
    reused: int
    seconds: float


def _source_name(path: Path | TarMember, source_root: Path | None) -> str:
    """The video file as recorded in metadata: relative to the source root when possible
    (``<tar>:<member>`` for a video read from inside a tar)."""
    if isinstance(path, TarMember):
        return f"{_source_name(Path(path.tar), source_root)}:{path.name}"
    if source_root is not None:
        try:
            return str(Path(path).resolve().relative_to(Path(source_root).resolve()))
        except ValueError:
            pass
    return str(path)


def convert_record(record: VideoRecord, config: PrepareConfig, source_root: Path | None = None) -> ConvertResult:
    """Decode, sample and JPEG-encode one video into a shard sample (runs in worker processes)."""
    path = record.path if isinstance(record.path, TarMember) else Path(record.path)
    file = _source_name(path, source_root)
    if not path.is_file():
        return ConvertResult(record.video_id, file, reason=f"missing: {path} not found")
    if not record.captions:
        return ConvertResult(record.video_id, file, reason=f"no captions: {record.captions!r}")
    blank = [i for i, c in enumerate(record.captions) if not (isinstance(c, str) and c.strip())]
    if blank:
        return ConvertResult(record.video_id, file, reason=f"empty caption(s) at position {blank} of {record.captions!r}")

    def choose(info: Any) -> list[int]:
        """Native indices for this record's policy and segment."""
        return sample_indices(config.sampling, info.num_frames, info.fps, config.num_frames, record.start, record.end)

    try:
        decoded = decode_video(path, choose, config.short_side)
        frames = [jpeg_bytes(image, config.jpeg_quality) for image in decoded.images]
    except Exception as exn:  # noqa: BLE001 - any decoder failure is reported in the manifest
        return ConvertResult(record.video_id, file, reason=f"decode error: {type(exn).__name__}: {exn}")
    info = decoded.info
    fps = info.fps or 1.0
    key = sanitize_key(record.video_id)
    meta = {
        "format_version": FORMAT_VERSION,
        "video_id": record.video_id,
        "key": key,
        "dataset": config.dataset,
        "split": record.split,
        "captions": list(record.captions),
        "num_frames": len(frames),
        "frame_indices": decoded.indices,
        "frame_times": [round(i / fps, 4) for i in decoded.indices],
        "frame_size": list(decoded.images[0].size),
        "sampling": {
            "policy": config.sampling,
            "max_frames": config.num_frames,
            "rate_fps": 1.0 if config.sampling == "fps1_uniform" else None,
            "short_side": config.short_side,
            "jpeg_quality": config.jpeg_quality,
        },
        "segment": None if record.start is None and record.end is None else [record.start, record.end],
        "original": info.as_dict(),
        "source": {"dataset": config.dataset, "file": file},
        "extra": record.meta,
    }
    return ConvertResult(record.video_id, file, encode_sample(key, frames, meta), len(record.captions))


_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")


def _path_text(path: Path | TarMember | str) -> str:
    """A video location as comparable text (paths normalised)."""
    return str(path) if isinstance(path, TarMember) else str(Path(path))


def check_split_name(split: str) -> str:
    """A split names a directory under the output root: letters, digits, ``_`` and ``-`` only (no path)."""
    if not isinstance(split, str) or not _SPLIT_NAME.fullmatch(split):
        raise ValueError(
            f"invalid split name {split!r}: use letters, digits, '_' and '-' only "
            f"(it becomes a directory under the output root)"
        )
    return split


def group_records(records: Iterable[VideoRecord]) -> dict[str, list[VideoRecord]]:
    """Group by split in first-seen order; records sharing a video id within a split are merged
    (captions concatenated in order), as LSMDC-style one-row-per-caption annotations need. Split names
    are checked (they become directories); video ids only ever become sanitised keys inside shards."""
    splits: dict[str, dict[str, VideoRecord]] = {}
    for record in records:
        if record.split not in splits:
            check_split_name(record.split)
        by_id = splits.setdefault(record.split, {})
        seen = by_id.get(record.video_id)
        if seen is None:
            by_id[record.video_id] = replace(record, captions=list(record.captions), meta=dict(record.meta))  # asdict would turn a TarMember into a dict
            continue
        if _path_text(seen.path) != _path_text(record.path):
            warnings.warn(
                f"video {record.video_id!r} ({record.split}) listed with two files "
                f"({seen.path}, {record.path}); keeping the first",
                stacklevel=2,
            )
        seen.captions.extend(record.captions)
    grouped = {split: list(by_id.values()) for split, by_id in splits.items()}
    for split, recs in grouped.items():
        keys: dict[str, str] = {}
        for rec in recs:
            key = sanitize_key(rec.video_id)
            if key in keys:
                raise ValueError(f"video ids {keys[key]!r} and {rec.video_id!r} map to the same key {key!r}")
            keys[key] = rec.video_id
    return grouped


def _fresh_state(config: PrepareConfig) -> dict[str, Any]:
    """Empty progress state."""
    return {"format_version": FORMAT_VERSION, "config": asdict(config), "splits": {}}


def _load_state(out: Path, config: PrepareConfig, resume: bool, overwrite: bool) -> dict[str, Any]:
    """Read or reset the progress file; refuse to touch existing output without resume/overwrite."""
    progress = out / PROGRESS_FILE
    existing = progress.exists() or (out / MANIFEST_FILE).exists() or any(out.glob("*/shard-*.tar"))
    if overwrite:
        for path in [*out.glob("*/shard-*.tar*"), *out.glob(f"*/{INDEX_FILE}"), *out.glob(f"*/{OFFSETS_FILE}"), out / MANIFEST_FILE, progress]:
            path.unlink(missing_ok=True)
        return _fresh_state(config)
    if not existing:
        return _fresh_state(config)
    if not resume:
        raise FileExistsError(
            f"{out} already holds prepared shards; pass --resume to continue an interrupted run "
            f"or --overwrite to rebuild"
        )
    if not progress.exists():
        raise FileExistsError(f"{out} holds shards but no {PROGRESS_FILE}: cannot resume safely; use --overwrite")
    state = json.loads(progress.read_text(encoding="utf-8"))
    if state.get("config") != asdict(config):
        raise ValueError(
            f"cannot resume {out}: it was prepared with {state.get('config')}, now asked for {asdict(config)}; "
            f"use the same settings or --overwrite"
        )
    return state


def _clean_split_dir(split_dir: Path, finished: set[str], console: Console) -> None:
    """Delete shard files that are not recorded as finished (interrupted or unrecorded writes)."""
    for path in sorted(split_dir.glob("shard-*.tar*")):
        if path.name not in finished:
            console.log(f"redoing {path}: not recorded as finished")
            path.unlink()
    for name in finished:
        if not (split_dir / name).is_file():
            raise FileNotFoundError(
                f"{split_dir / name} is recorded as finished but missing; re-run with --overwrite"
            )


def _worker_init() -> None:
    """Workers leave Ctrl-C to the parent, which terminates the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _results(pool: Any, func: Any, jobs: list[VideoRecord]) -> Iterator[ConvertResult]:
    """Ordered results, from the pool or in-process when there is none."""
    if pool is None:
        return map(func, jobs)
    return pool.imap(func, jobs, chunksize=2)


def _split_failures(split_state: dict[str, Any]) -> list[dict[str, str]]:
    """All failures recorded for a split, in input order."""
    out = [f for shard in split_state["shards"] for f in shard["failures"]]
    return out + split_state["tail_failures"]


def _prepare_split(
    split: str,
    records: list[VideoRecord],
    out: Path,
    config: PrepareConfig,
    state: dict[str, Any],
    pool: Any,
    func: Any,
    bar: Progress,
    console: Console,
) -> tuple[int, int]:
    """Convert one split; returns (samples converted now, samples kept from finished shards)."""
    split_dir = out / split
    split_dir.mkdir(parents=True, exist_ok=True)
    sp = state["splits"].setdefault(split, {"complete": False, "shards": [], "tail_failures": []})
    done = {vid for shard in sp["shards"] for vid in shard["video_ids"]}
    done |= {f["video_id"] for f in _split_failures(sp)}
    pending = [r for r in records if r.video_id not in done]
    reused = sum(shard["num_samples"] for shard in sp["shards"])
    if sp["complete"] and pending:
        raise ValueError(
            f"split {split!r} in {out} is complete but {len(pending)} new videos appeared in the annotations "
            f"(e.g. {pending[0].video_id!r}); rebuild with --overwrite"
        )
    _clean_split_dir(split_dir, {shard["file"] for shard in sp["shards"]}, console)
    task = bar.add_task(f"{config.dataset}/{split}", total=len(records), completed=len(records) - len(pending), failed=0)
    shard_no = len(sp["shards"])
    writer: ShardFile | None = None
    ids: list[str] = []
    failures: list[dict[str, str]] = []
    converted = 0
    n_failed = 0

    def close_shard() -> None:
        """Finish the open shard and record it in the progress file."""
        nonlocal writer, ids, failures, shard_no
        assert writer is not None
        info = writer.finish()
        sp["shards"].append({**info.as_dict(), "video_ids": ids, "failures": failures})
        write_json_atomic(out / PROGRESS_FILE, state)
        writer, ids, failures = None, [], []
        shard_no += 1

    try:
        for result in _results(pool, func, pending):
            if result.sample is None:
                failures.append({"video_id": result.video_id, "split": split, "file": result.file, "reason": result.reason or "?"})
                n_failed += 1
            else:
                if writer is None:
                    writer = ShardFile(split_dir / SHARD_PATTERN.format(shard_no))
                writer.write(result.sample, result.num_captions)
                ids.append(result.video_id)
                converted += 1
                if writer.num_samples >= config.shard_size:
                    close_shard()
            bar.update(task, advance=1, failed=n_failed)
        if writer is not None:
            close_shard()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    sp["tail_failures"].extend(failures)
    sp["complete"] = True
    write_json_atomic(out / PROGRESS_FILE, state)
    return converted, reused


def _write_outputs(out: Path, config: PrepareConfig, state: dict[str, Any], splits: list[str]) -> PrepareReport:
    """index.json per split and manifest.json, both derived from the progress state only."""
    summary: dict[str, dict[str, int]] = {}
    failures: list[dict[str, str]] = []
    for split in splits:
        sp = state["splits"][split]
        shards = [{k: s[k] for k in ("file", "num_samples", "num_captions", "sha256", "bytes")} for s in sp["shards"]]
        split_failures = _split_failures(sp)
        counts = {
            "num_samples": sum(s["num_samples"] for s in shards),
            "num_captions": sum(s["num_captions"] for s in shards),
            "num_shards": len(shards),
            "num_failed": len(split_failures),
        }
        index = {
            "format_version": FORMAT_VERSION,
            "dataset": config.dataset,
            "split": split,
            "num_frames": config.num_frames,
            "sampling": config.sampling,
            "short_side": config.short_side,
            **{k: counts[k] for k in ("num_samples", "num_captions", "num_shards")},
            "shards": shards,
        }
        write_json_atomic(out / split / INDEX_FILE, index)
        write_offsets(out / split, index)  # every sample's byte range: random access for the training order
        summary[split] = counts
        failures.extend(split_failures)
    write_json_atomic(
        out / MANIFEST_FILE,
        {
            "format_version": FORMAT_VERSION,
            "dataset": config.dataset,
            "config": asdict(config),
            "splits": summary,
            "num_failures": len(failures),
            "failures": failures,
        },
    )
    return PrepareReport(out=out, splits=summary, failures=failures, converted=0, reused=0, seconds=0.0)


def prepare(
    records: Iterable[VideoRecord],
    out: str | Path,
    config: PrepareConfig,
    *,
    source_root: str | Path | None = None,
    workers: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> PrepareReport:
    """Convert records to shards under ``out`` (``{split}/shard-*.tar``, ``index.json``, ``manifest.json``)."""
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = _load_state(out, config, resume, overwrite)
    grouped = group_records(records)
    func = partial(convert_record, config=config, source_root=Path(source_root) if source_root else None)
    console = Console(stderr=True)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    pool = None
    if workers > 1:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        pool = mp.get_context(method).Pool(workers, initializer=_worker_init)
    converted = reused = 0
    try:
        with Progress(*columns, console=console, disable=not progress) as bar:
            for split, recs in grouped.items():
                done, kept = _prepare_split(split, recs, out, config, state, pool, func, bar, console)
                converted += done
                reused += kept
        if pool is not None:
            pool.close()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    splits = [s for s in state["splits"] if s in grouped] + [s for s in state["splits"] if s not in grouped]
    report = _write_outputs(out, config, state, splits)
    report.converted, report.reused = converted, reused
    report.seconds = time.perf_counter() - started
    return report
