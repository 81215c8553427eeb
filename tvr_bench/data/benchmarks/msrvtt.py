"""MSR-VTT (data_cards/msrvtt.md): the 1k-A protocol (9k / 7k training lists, JSFusion test) and the
official "full" split (6,513 / 497 / 2,990, every caption a query, data_cards/msrvtt_full.md).

Official files (CLIP4Clip's ``msrvtt_data.zip``): ``MSRVTT_data.json`` (``videos`` and ``sentences``;
Frozen-in-Time's ``MSR_VTT.json`` with COCO-style ``annotations`` is read too), ``MSRVTT_train.9k.csv``,
``MSRVTT_train.7k.csv`` (header ``video_id``) and ``MSRVTT_JSFUSION_test.csv``
(``key,vid_key,video_id,sentence``). Videos ``video<N>.mp4``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

from tvr_bench.data.benchmarks.common import (
    AnnotationError,
    BenchmarkDataModule,
    BenchmarkSpec,
    VideoIndex,
    records_for_split,
    require_annotation,
)
from tvr_bench.data.prepare import VideoRecord

DATA_JSON_NAMES = ("MSRVTT_data.json", "MSR_VTT.json", "train_val_videodatainfo.json")
TRAIN_LISTS = {"train_9k": "MSRVTT_train.9k.csv", "train_7k": "MSRVTT_train.7k.csv"}
TEST_CSV = "MSRVTT_JSFUSION_test.csv"
#: Values of the official ``split`` field of ``videos`` -> our split names (full protocol).
FULL_SPLITS = {"train": "train", "validate": "val", "val": "val", "test": "test"}


def load_data_json(annotations: Path, dataset: str = "msrvtt") -> dict[str, Any]:
    """The MSR-VTT annotation json (first of the known names)."""
    path = require_annotation(annotations, DATA_JSON_NAMES, dataset)
    return json.loads(path.read_text(encoding="utf-8"))


def captions_by_video(data: dict[str, Any]) -> dict[str, list[str]]:
    """Every caption of every video in file order (duplicates kept), from ``sentences`` or COCO ``annotations``."""
    out: dict[str, list[str]] = {}
    if "sentences" in data:
        rows, id_key = data["sentences"], "video_id"
    elif "annotations" in data:
        rows, id_key = data["annotations"], "image_id"
    else:
        raise AnnotationError("MSR-VTT json has neither 'sentences' nor 'annotations' (data_cards/msrvtt.md)")
    for row in rows:
        out.setdefault(str(row[id_key]), []).append(row["caption"])
    return out


def read_video_list(path: Path) -> list[str]:
    """``video_id`` column of a training csv, in file order."""
    with open(path, newline="", encoding="utf-8") as f:
        return [row["video_id"].strip() for row in csv.DictReader(f) if row.get("video_id", "").strip()]


def read_jsfusion(path: Path) -> dict[str, list[str]]:
    """The 1k-A test pairs: video id -> [its one JSFusion sentence], in csv order."""
    out: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["video_id"].strip(), []).append(row["sentence"])
    return out


def locator(videos: Path) -> Callable[[str], Path]:
    """``video<N>`` -> its file (``video<N>.mp4``, or another container with the same stem)."""
    index = VideoIndex(videos)
    return lambda vid: index.resolve(f"{vid}.mp4", names=(f"{vid}.mp4",), stems=(vid,))


def read_records(videos: Path, annotations: Path) -> Iterator[VideoRecord]:
    """1k-A: ``train_9k`` and ``train_7k`` (all json captions per video), ``test`` (JSFusion sentence)."""
    data = load_data_json(annotations)
    captions = captions_by_video(data)
    locate = locator(videos)
    for split, name in TRAIN_LISTS.items():
        ids = read_video_list(require_annotation(annotations, (name,), "msrvtt"))
        yield from records_for_split(split, ids, captions, locate)
    test = read_jsfusion(require_annotation(annotations, (TEST_CSV,), "msrvtt"))
    yield from records_for_split("test", test, test, locate)


def read_full_records(videos: Path, annotations: Path) -> Iterator[VideoRecord]:
    """Full split from the json's ``split`` field: train / val / test, every caption kept."""
    data = load_data_json(annotations, "msrvtt_full")
    if "videos" not in data or not all("split" in v for v in data["videos"]):
        raise AnnotationError(
            "msrvtt_full needs MSRVTT_data.json with a 'split' field in every 'videos' entry "
            "(data_cards/msrvtt_full.md)"
        )
    captions = captions_by_video(data)
    locate = locator(videos)
    by_split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for video in data["videos"]:
        split = FULL_SPLITS.get(str(video["split"]))
        if split is None:
            raise AnnotationError(f"msrvtt_full: unknown split {video['split']!r} for {video['video_id']}")
        by_split[split].append(str(video["video_id"]))
    for split, ids in by_split.items():
        yield from records_for_split(split, ids, captions, locate)


SPEC = BenchmarkSpec(
    name="msrvtt",
    read=read_records,
    num_frames=12,
    description="MSR-VTT 1k-A: train_9k / train_7k / JSFusion test (data_cards/msrvtt.md)",
)
FULL_SPEC = BenchmarkSpec(
    name="msrvtt_full",
    read=read_full_records,
    num_frames=12,
    description="MSR-VTT full split 6,513 / 497 / 2,990, multi-caption (data_cards/msrvtt_full.md)",
)


class MSRVTTDataModule(BenchmarkDataModule):
    """MSR-VTT 1k-A: trains on ``train_9k`` (or ``train_split="train_7k"``), tests on the 1k-A pairs.

    There is no validation split in 1k-A: like the references, validation runs on ``test``.
    """

    NAME: ClassVar[str] = "msrvtt"
    TRAIN_SPLIT: ClassVar[str] = "train_9k"
    VAL_SPLIT: ClassVar[str | None] = "test"


class MSRVTTFullDataModule(BenchmarkDataModule):
    """MSR-VTT full split: 2,990 test videos, all 20 captions of each are queries."""

    NAME: ClassVar[str] = "msrvtt_full"
