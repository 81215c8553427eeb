"""video2dataset output as a video source for ``tvr-bench prepare <dataset> --source video2dataset``.

video2dataset (iejMac/video2dataset) writes ``{shard:05d}.tar`` files whose samples are
``<key>.mp4`` (or another ``encode_formats`` extension) + ``<key>.txt`` + ``<key>.json``, where the key
is a running number, not the dataset's video id. The id is recovered from the sample json: the first
of :data:`ID_FIELDS` present (save it with ``--save_additional_columns '["video_id"]'``), else the file
name of a local ``url`` (the MSR-VTT example feeds local paths), else the ``v=`` id of a YouTube url.
Videos are never copied out: :func:`index_videos` records each video member's offset and size
inside its (uncompressed) tar under the name ``<id>.<ext>``, so the dataset's own naming finds it
(:class:`~tvr_bench.data.benchmarks.common.VideoIndex` over these members), and ``prepare`` decodes
it in place (:class:`~tvr_bench.data.video.TarMember`). ``<out>/video2dataset_index.json`` lists the
mapping and every sample that was skipped.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlparse

from rich.progress import Progress

from tvr_bench.data.benchmarks.common import VIDEO_EXTENSIONS
from tvr_bench.data.video import TarMember

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


def _samples(tar_path: Path) -> Iterator[tuple[str, dict[str, bytes], dict[str, TarMember]]]:
    """Per sample of an uncompressed tar: (key, small members' bytes, video members' locations).

    Members are grouped by the key before the first dot. Video members are not read: only their
    offset and size inside the tar are kept. The sample json and txt are read (a few hundred bytes).
    """
    current: str | None = None
    data: dict[str, bytes] = {}
    videos: dict[str, TarMember] = {}
    try:
        tar = tarfile.open(tar_path, "r:")
    except tarfile.ReadError as exn:
        raise ValueError(
            f"{tar_path}: not an uncompressed tar ({exn}); video2dataset writes plain .tar shards, "
            f"which are read in place (decompress any .tar.gz first)"
        ) from None
    with tar:
        for info in tar:
            if not info.isfile():
                continue
            base = os.path.basename(info.name)
            key, dot, ext = base.partition(".")
            if not dot:
                continue
            if key != current:
                if current is not None:
                    yield current, data, videos
                current, data, videos = key, {}, {}
            ext = ext.lower()
            if ext in VIDEO_EXTENSIONS:
                videos[ext] = TarMember(tar=tar_path, name=info.name, offset=info.offset_data, size=info.size)
                continue
            handle = tar.extractfile(info)
            if handle is not None:
                data[ext] = handle.read()
    if current is not None:
        yield current, data, videos


def _safe_name(video_id: str) -> str:
    """A file name for a video id (path separators replaced)."""
    return video_id.replace("/", "_").replace("\\", "_").lstrip(".") or "_"


@dataclass
class Video2DatasetIndex:
    """The videos of a set of video2dataset shards, by the file name the dataset's naming expects."""

    shards: Path
    members: dict[str, TarMember] = field(default_factory=dict)
    videos: dict[str, dict[str, str]] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON form: shard folder, video id -> (sample, file name, url, member), skipped samples."""
        return {"shards": str(self.shards), "videos": self.videos, "skipped": self.skipped}


def index_videos(shards: Path, progress: bool = True) -> Video2DatasetIndex:
    """Find every video in the video2dataset shards under ``shards`` without copying any of them out.

    Each video is named ``<id>.<ext>`` by the dataset id its json gives (:func:`video_id_of`), so a
    benchmark's own naming finds it; samples without a video, without an id, or repeating an id are
    listed in ``skipped`` with the reason.
    """
    shards = Path(shards)
    tars = sorted(p for p in shards.rglob("*.tar") if p.is_file())
    if not tars:
        raise FileNotFoundError(f"no video2dataset shards (*.tar) under {shards}")
    index = Video2DatasetIndex(shards=shards)
    with Progress(disable=not progress) as bar:
        task = bar.add_task("video2dataset shards", total=len(tars))
        for tar_path in tars:
            for key, members, videos in _samples(tar_path):
                where = f"{tar_path.relative_to(shards)}:{key}"
                meta: dict[str, Any] = {}
                if "json" in members:
                    try:
                        meta = json.loads(members["json"])
                    except ValueError:
                        index.skipped.append({"sample": where, "reason": "unreadable json"})
                        continue
                ext = next((e for e in VIDEO_EXTENSIONS if e in videos), None)
                if ext is None:
                    status = meta.get("status", "?")
                    index.skipped.append({"sample": where, "reason": f"no video member (status {status})"})
                    continue
                video_id = video_id_of(meta)
                if video_id is None:
                    index.skipped.append({"sample": where, "reason": f"no video id in json (fields {', '.join(ID_FIELDS)} or url)"})
                    continue
                if video_id in index.videos:
                    index.skipped.append({"sample": where, "reason": f"duplicate of {index.videos[video_id]['sample']} for {video_id}"})
                    continue
                name = f"{_safe_name(video_id)}.{ext}"
                index.members[name] = videos[ext]
                index.videos[video_id] = {"sample": where, "file": name, "member": videos[ext].name, "url": str(meta.get("url", ""))}
            bar.update(task, advance=1)
    return index


def write_index(index: Video2DatasetIndex, out: Path) -> Path:
    """Write ``out/video2dataset_index.json`` (the id -> tar member mapping and the skipped samples)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / INDEX_FILE
    path.write_text(json.dumps(index.as_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
