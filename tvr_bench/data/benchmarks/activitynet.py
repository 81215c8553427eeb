"""ActivityNet Captions (data_cards/activitynet.md): paragraph-to-video retrieval, CLIP4Clip protocol.

Official files (``captions.zip``): ``train.json`` and ``val_1.json`` (``{"v_<ytid>": {"duration",
"timestamps", "sentences"}}``), and the id lists ``train_ids.json`` / ``val_ids.json``. Train on
``train.json``, test on ``val_1.json`` (``val_2.json`` holds other captions of the same videos and is
never read). The paragraph is ``" ".join(sentences)`` in JSON order with the sentences' own spacing,
made by the DataModule; frames come from [0, ceil(duration)] s (whole seconds, inclusive) of the
decoded file, never past its end. Videos are found
as ``v_<ytid>.<ext>`` or, as CLIP4Clip expects, ``<ytid>.<ext>``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

from tvr_bench.data.benchmarks.common import (
    BenchmarkDataModule,
    BenchmarkSpec,
    VideoIndex,
    find_annotation,
    paragraph_parts,
    require_annotation,
    unique,
)
from tvr_bench.data.prepare import VideoRecord

#: split -> (captions json, id list json); the retrieval test set is val_1.
SPLITS = {"train": ("train.json", "train_ids.json"), "test": ("val_1.json", "val_ids.json")}


def youtube_id(video_id: str) -> str:
    """``v_<ytid>`` -> ``<ytid>`` (CLIP4Clip strips the first two characters)."""
    return video_id[2:] if video_id.startswith("v_") else video_id


def locator(videos: Path) -> Callable[[str], Path]:
    """``v_<ytid>`` -> ``v_<ytid>.<ext>`` or ``<ytid>.<ext>``."""
    index = VideoIndex(videos)
    return lambda vid: index.resolve(f"{vid}.mp4", stems=(vid, youtube_id(vid)))


def read_split(annotations: Path, captions_name: str, ids_name: str) -> tuple[list[str], dict[str, Any]]:
    """(video ids: the id list's order restricted to the captions file as CLIP4Clip does, else the
    captions file's order; the captions)."""
    captions = json.loads(require_annotation(annotations, (captions_name,), "activitynet").read_text(encoding="utf-8"))
    ids_path = find_annotation(annotations, (ids_name,))
    ids = list(captions)
    if ids_path is not None:
        ids = unique(vid for vid in json.loads(ids_path.read_text(encoding="utf-8")) if vid in captions)
    return ids, captions


def read_records(videos: Path, annotations: Path) -> Iterator[VideoRecord]:
    """train (train.json) and test (val_1.json): one record per video, its sentences in JSON order."""
    locate = locator(videos)
    for split, (captions_name, ids_name) in SPLITS.items():
        ids, captions = read_split(annotations, captions_name, ids_name)
        for vid in ids:
            entry = captions[vid]
            parts = paragraph_parts(entry.get("sentences", []))  # none: reported by prepare
            duration = entry.get("duration")
            # CLIP4Clip reads whole seconds 0..ceil(duration) inclusive (never past the file's end):
            # the half-open window [0, ceil(duration) + 1).
            end = float(math.ceil(duration) + 1) if duration else None
            yield VideoRecord(
                video_id=vid,
                path=locate(vid),
                captions=parts,
                split=split,
                start=0.0,
                end=end,
                meta={"annotation_duration": duration, "timestamps": entry.get("timestamps")},
            )


SPEC = BenchmarkSpec(
    name="activitynet",
    read=read_records,
    num_frames=64,
    description="ActivityNet Captions paragraph-to-video: train / val_1 as test (data_cards/activitynet.md)",
)


class ActivityNetDataModule(BenchmarkDataModule):
    """ActivityNet Captions: one paragraph per video, 64 frames; validation runs on the test (val_1) split."""

    NAME: ClassVar[str] = "activitynet"
    PROTOCOL_SIZES: ClassVar[dict[str, int]] = {"train": 10009, "test": 4917}
    PROTOCOL_SOURCE: ClassVar[str] = (
        "train.json / val_1.json video counts (collaborative-experts misc/datasets/activity-net; "
        "escorciav/moments-retrieval data/processed/README.md; /work/shared/anchors/datasets.md section 5)"
    )
    PREPARE_INPUTS: ClassVar[str] = "--videos activitynet/videos --annotations captions"
    NUM_FRAMES: ClassVar[int] = 64
    CAPTION_MODE: ClassVar[str] = "paragraph"
    VAL_SPLIT: ClassVar[str | None] = "test"
