"""VATEX (data_cards/vatex.md): the HGR retrieval split 25,991 / 1,500 / 1,500, English captions only,
every caption a query (10 per video).

Captions come from the official ``vatex_training_v1.0.json`` and ``vatex_validation_v1.0.json``
(lists of ``{"videoID", "enCap", "chCap"}``; ``chCap`` is ignored), or from HGR's
``annotation/RET/ref_captions.json`` when the official files are absent. The split is HGR's, read from
CLIP2Video's ``{train,val,test}_list.txt`` or HGR's ``public_split/{trn,val,tst}_names.npy``; without
either, train is the official training set and test the official validation set (3,000 videos, which
is not the protocol papers report: a warning says so). Videos are ``<videoID>.<mp4|webm|mkv>`` (10-s
clips); partial downloads (``.part``) are ignored.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable, ClassVar, Iterator

import numpy as np

from tvr_bench.data.benchmarks.common import (
    AnnotationError,
    BenchmarkDataModule,
    BenchmarkSpec,
    VideoIndex,
    find_annotation,
    read_id_list,
    records_for_split,
)
from tvr_bench.data.prepare import VideoRecord

OFFICIAL = {"train": "vatex_training_v1.0.json", "val": "vatex_validation_v1.0.json"}
HGR_CAPTIONS = "ref_captions.json"
LISTS = {"train": "train_list.txt", "val": "val_list.txt", "test": "test_list.txt"}
HGR_LISTS = {"train": "trn_names.npy", "val": "val_names.npy", "test": "tst_names.npy"}


def load_official(path: Path) -> dict[str, list[str]]:
    """videoID -> its English captions (``enCap``), in file order."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {str(item["videoID"]): [str(c) for c in item.get("enCap", [])] for item in data}


def load_captions(annotations: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(all English captions by video id, the official split's video ids)."""
    captions: dict[str, list[str]] = {}
    official: dict[str, list[str]] = {}
    for split, name in OFFICIAL.items():
        path = find_annotation(annotations, (name,))
        if path is not None:
            data = load_official(path)
            official[split] = list(data)
            captions.update(data)
    if not captions:
        path = find_annotation(annotations, (HGR_CAPTIONS,))
        if path is None:
            raise AnnotationError(
                f"vatex: none of {', '.join([*OFFICIAL.values(), HGR_CAPTIONS])} found under {annotations} "
                f"(data_cards/vatex.md)"
            )
        data = json.loads(path.read_text(encoding="utf-8"))
        captions = {str(vid): [str(c) for c in caps] for vid, caps in data.items()}
    return captions, official


def load_split_lists(annotations: Path) -> dict[str, list[str]] | None:
    """HGR split ids from the text lists or HGR's ``.npy`` name arrays (None when neither is there)."""
    lists = {split: find_annotation(annotations, (name,)) for split, name in LISTS.items()}
    if all(path is not None for path in lists.values()):
        return {split: read_id_list(path) for split, path in lists.items() if path is not None}
    arrays = {split: find_annotation(annotations, (name,)) for split, name in HGR_LISTS.items()}
    if all(path is not None for path in arrays.values()):
        return {split: [str(x) for x in np.load(path, allow_pickle=False).tolist()] for split, path in arrays.items() if path is not None}
    return None


def locator(videos: Path) -> Callable[[str], Path]:
    """videoID -> ``<videoID>.mp4`` (or ``.webm`` / ``.mkv`` ... from yt-dlp)."""
    index = VideoIndex(videos)
    return lambda vid: index.resolve(f"{vid}.mp4", stems=(vid,))


def read_records(videos: Path, annotations: Path) -> Iterator[VideoRecord]:
    """HGR train / val / test, the 10 English captions of each video."""
    captions, official = load_captions(annotations)
    splits = load_split_lists(annotations)
    if splits is None:
        if "train" not in official or "val" not in official:
            raise AnnotationError(f"vatex: no split lists and no official train/validation json under {annotations}")
        warnings.warn(
            "vatex: no HGR split lists ({train,val,test}_list.txt or *_names.npy); using the official "
            "training set and the whole official validation set as test (not the HGR protocol, data_cards/vatex.md)",
            stacklevel=2,
        )
        splits = {"train": official["train"], "test": official["val"]}
    locate = locator(videos)
    for split, ids in splits.items():
        yield from records_for_split(split, ids, captions, locate)


SPEC = BenchmarkSpec(
    name="vatex",
    read=read_records,
    num_frames=12,
    description="VATEX HGR split 25,991 / 1,500 / 1,500, English, multi-caption (data_cards/vatex.md)",
)


class VATEXDataModule(BenchmarkDataModule):
    """VATEX: every one of a test video's 10 English captions is a query over the 1,500-video gallery."""

    NAME: ClassVar[str] = "vatex"
    PROTOCOL_SIZES: ClassVar[dict[str, int]] = {"train": 25991, "val": 1500, "test": 1500}
    PROTOCOL_SOURCE: ClassVar[str] = (
        "HGR split as shipped by CLIP2Video data/vatex_data/{train,val,test}_list.txt "
        "(/work/shared/anchors/datasets.md section 7)"
    )
    PREPARE_INPUTS: ClassVar[str] = "--videos vatex/videos --annotations vatex/annotations"
