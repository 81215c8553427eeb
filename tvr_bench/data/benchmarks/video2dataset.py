"""video2dataset output as a video source for ``tvr-bench prepare <dataset> --source video2dataset``.

video2dataset (iejMac/video2dataset) writes ``{shard:05d}.tar`` files whose samples are
``<key>.mp4`` (or another ``encode_formats`` extension) + ``<key>.txt`` + ``<key>.json``, where the key
is a running number, not the dataset's video id. The id is recovered from the sample json: the first
of :data:`ID_FIELDS` present (save it with ``--save_additional_columns '["video_id"]'``), else the file
name of a local ``url`` (the MSR-VTT example feeds local paths), else the ``v=`` id of a YouTube url.
Each video is unpacked once to ``<cache>/<id>.<ext>``, so the dataset's own naming finds it;
``video2dataset_index.json`` in the cache lists the mapping and every sample that was skipped.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlparse

from rich.progress import Progress

from tvr_bench.data.benchmarks.common import VIDEO_EXTENSIONS

#: Sample-json fields holding the dataset's own video id, in order of preference.
ID_FIELDS: tuple[str, ...] = ("video_id", "videoID", "videoid", "video", "clip_id", "clip_name", "vid", "id")
INDEX_FILE = "video2dataset_index.json"


def video_id_of(meta: dict[str, Any]) -> str | None:
    """The dataset video id a video2dataset sample json refers to (None when it cannot be told)."""
    for field in ID_FIELDS:
        value = meta.get(field)
        if isinstance(value, (str, int)) and str(value).strip():
            return str(value).strip()
    url = meta.get("url")
    if not isinstance(url, str) or not url:
        return None
    parsed = urlparse(url)
    if "youtube" in parsed.netloc or "youtu.be" in parsed.netloc:
        if "youtu.be" in parsed.netloc:
            return parsed.path.strip("/") or None
        return (parse_qs(parsed.query).get("v") or [None])[0]
    name = os.path.basename(parsed.path if parsed.scheme in ("http", "https", "file") else url)
    stem, dot, ext = name.rpartition(".")
    return stem if dot and ext.lower() in VIDEO_EXTENSIONS else (name or None)


def _samples(tar_path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a tar, members grouped by the key before the first dot."""
    current: str | None = None
    members: dict[str, bytes] = {}
    with tarfile.open(tar_path, "r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            base = os.path.basename(info.name)
            key, dot, ext = base.partition(".")
            if not dot:
                continue
            if key != current:
                if current is not None:
                    yield current, members
                current, members = key, {}
            handle = tar.extractfile(info)
            if handle is not None:
                members[ext.lower()] = handle.read()
    if current is not None:
        yield current, members


def _safe_name(video_id: str) -> str:
    """A file name for a video id (path separators replaced)."""
    return video_id.replace("/", "_").replace("\\", "_").lstrip(".") or "_"


def extract_videos(shards: Path, cache: Path, progress: bool = True) -> Path:
    """Unpack the videos of the video2dataset shards under ``shards`` into ``cache`` named by video id."""
    shards, cache = Path(shards), Path(cache)
    tars = sorted(p for p in shards.rglob("*.tar") if p.is_file())
    if not tars:
        raise FileNotFoundError(f"no video2dataset shards (*.tar) under {shards}")
    cache.mkdir(parents=True, exist_ok=True)
    mapping: dict[str, dict[str, str]] = {}
    skipped: list[dict[str, str]] = []
    with Progress(disable=not progress) as bar:
        task = bar.add_task("video2dataset shards", total=len(tars))
        for tar_path in tars:
            for key, members in _samples(tar_path):
                where = f"{tar_path.name}:{key}"
                meta: dict[str, Any] = {}
                if "json" in members:
                    try:
                        meta = json.loads(members["json"])
                    except ValueError:
                        skipped.append({"sample": where, "reason": "unreadable json"})
                        continue
                ext = next((e for e in VIDEO_EXTENSIONS if e in members), None)
                if ext is None:
                    status = meta.get("status", "?")
                    skipped.append({"sample": where, "reason": f"no video member (status {status})"})
                    continue
                video_id = video_id_of(meta)
                if video_id is None:
                    skipped.append({"sample": where, "reason": f"no video id in json (fields {', '.join(ID_FIELDS)} or url)"})
                    continue
                if video_id in mapping:
                    skipped.append({"sample": where, "reason": f"duplicate of {mapping[video_id]['sample']} for {video_id}"})
                    continue
                target = cache / f"{_safe_name(video_id)}.{ext}"
                data = members[ext]
                if not (target.is_file() and target.stat().st_size == len(data)):
                    tmp = target.with_name(target.name + ".part")
                    tmp.write_bytes(data)
                    os.replace(tmp, target)
                mapping[video_id] = {"sample": where, "file": target.name, "url": str(meta.get("url", ""))}
            bar.update(task, advance=1)
    index = {"shards": str(shards), "videos": mapping, "skipped": skipped}
    (cache / INDEX_FILE).write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return cache
