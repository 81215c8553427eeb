"""MSR-VTT (data_cards/msrvtt.md): the 1k-A protocol (9k / 7k training lists, JSFusion test) and the
official "full" split (6,513 / 497 / 2,990, every caption a query, data_cards/msrvtt_full.md).

Official files (CLIP4Clip's ``msrvtt_data.zip``): ``MSRVTT_data.json`` (``videos`` and ``sentences``;
Frozen-in-Time's ``MSR_VTT.json`` with COCO-style ``annotations`` is read too; without either, the
original release's ``train_val_videodatainfo.json`` and ``test_videodatainfo.json`` are merged), ``MSRVTT_train.9k.csv``,
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
    find_annotation,
    records_for_split,
    require_annotation,
)
from tvr_bench.data.prepare import VideoRecord

#: One-file annotation bundles (all 10,000 videos): CLIP4Clip's, then Frozen-in-Time's.
BUNDLE_JSON_NAMES = ("MSRVTT_data.json", "MSR_VTT.json")
#: The official release's two files (train + validate videos; test videos), merged when no bundle is found.
OFFICIAL_JSON_NAMES = ("train_val_videodatainfo.json", "test_videodatainfo.json")
DATA_JSON_NAMES = BUNDLE_JSON_NAMES + OFFICIAL_JSON_NAMES
TRAIN_LISTS = {"train_9k": "MSRVTT_train.9k.csv", "train_7k": "MSRVTT_train.7k.csv"}
TEST_CSV = "MSRVTT_JSFUSION_test.csv"
#: Values of the official ``split`` field of ``videos`` -> our split names (full protocol).
FULL_SPLITS = {"train": "train", "validate": "val", "val": "val", "test": "test"}


def _read_json(path: Path, dataset: str) -> dict[str, Any]:
    """A json annotation file as a dict, or an AnnotationError naming it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as exn:
        raise AnnotationError(f"{dataset}: {path} is not valid json ({exn}) (data_cards/{dataset}.md)") from None
    if not isinstance(data, dict):
        raise AnnotationError(f"{dataset}: {path} holds a {type(data).__name__}, not an object (data_cards/{dataset}.md)")
    return data


def merge_data_json(parts: list[tuple[Path, dict[str, Any]]], dataset: str = "msrvtt") -> dict[str, Any]:
    """The official files as one bundle: ``videos`` and ``sentences`` concatenated in file order.

    A video listed in two files is an error (the official train/val and test files are disjoint).
    """
    videos: list[dict[str, Any]] = []
    sentences: list[dict[str, Any]] = []
    seen: dict[str, Path] = {}
    for path, data in parts:
        if "videos" not in data or "sentences" not in data:
            raise AnnotationError(
                f"{dataset}: {path} lacks {'videos' if 'videos' not in data else 'sentences'}: an official "
                f"MSR-VTT file holds both (data_cards/{dataset}.md)"
            )
        for video in data["videos"]:
            vid = str(video["video_id"])
            if vid in seen:
                raise AnnotationError(f"{dataset}: {vid} is listed in both {seen[vid]} and {path}")
            seen[vid] = path
        videos.extend(data["videos"])
        sentences.extend(data["sentences"])
    return {"videos": videos, "sentences": sentences}


def load_data_json(annotations: Path, dataset: str = "msrvtt") -> dict[str, Any]:
    """The MSR-VTT annotations as one dict: a bundle (``MSRVTT_data.json`` / ``MSR_VTT.json``), or the
    official ``train_val_videodatainfo.json`` and ``test_videodatainfo.json`` merged (both required)."""
    annotations = Path(annotations)
    bundle = find_annotation(annotations, BUNDLE_JSON_NAMES)
    if bundle is not None:
        return _read_json(bundle, dataset)
    folder = annotations.parent if annotations.is_file() else annotations
    found = {name: find_annotation(annotations, (name,)) or find_annotation(folder, (name,)) for name in OFFICIAL_JSON_NAMES}
    missing = [name for name, path in found.items() if path is None]
    if len(missing) == len(OFFICIAL_JSON_NAMES):
        require_annotation(annotations, DATA_JSON_NAMES, dataset)  # raises, naming every accepted file
    if missing:
        present = next(name for name in OFFICIAL_JSON_NAMES if name not in missing)
        raise AnnotationError(
            f"{dataset}: found {present} but not {missing[0]} under {folder}: the official release splits the "
            f"annotations into train_val_videodatainfo.json (7,010 videos) and test_videodatainfo.json "
            f"(2,990 videos); both are needed (the 9k training list and the test split include test-file "
            f"videos). Put both in --annotations, or use CLIP4Clip's MSRVTT_data.json (data_cards/{dataset}.md)"
        )
    return merge_data_json([(path, _read_json(path, dataset)) for path in found.values() if path is not None], dataset)


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
    PROTOCOL_SIZES: ClassVar[dict[str, int]] = {"train_9k": 9000, "train_7k": 7010, "test": 1000}
    PROTOCOL_SOURCE: ClassVar[str] = (
        "rows of MSRVTT_train.9k.csv / MSRVTT_train.7k.csv / MSRVTT_JSFUSION_test.csv in CLIP4Clip's msrvtt_data.zip "
        "(ArrowLuo/CLIP4Clip release v0.0; /work/shared/anchors/datasets.md section 2)"
    )
    PREPARE_INPUTS: ClassVar[str] = "--videos MSRVTT/videos/all --annotations msrvtt_data"
    TRAIN_SPLIT: ClassVar[str] = "train_9k"
    VAL_SPLIT: ClassVar[str | None] = "test"


class MSRVTTFullDataModule(BenchmarkDataModule):
    """MSR-VTT full split: 2,990 test videos, all 20 captions of each are queries."""

    NAME: ClassVar[str] = "msrvtt_full"
    PROTOCOL_SIZES: ClassVar[dict[str, int]] = {"train": 6513, "val": 497, "test": 2990}
    PROTOCOL_SOURCE: ClassVar[str] = (
        "the official split (Xu et al. 2016); CLIP2Video MSRVTT_{train,val,test}.full.csv and "
        "collaborative-experts misc/datasets/msrvtt (/work/shared/anchors/datasets.md section 2)"
    )
    PREPARE_INPUTS: ClassVar[str] = "--videos MSRVTT/videos/all --annotations msrvtt_data"
