"""Charades (data_cards/charades.md): text-to-video retrieval on Charades v1, HVP-Net protocol.

Official files (``Charades.zip``): ``Charades_v1_train.csv`` and ``Charades_v1_test.csv`` (header
``id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length``, RFC-4180
quoting). The text of a video is its raw ``descriptions`` field, kept as ONE query even when it holds
several ';'-joined descriptions. Videos are ``Charades_v1/<id>.mp4`` (or the 480p release).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, ClassVar, Iterator

from tvr_bench.data.benchmarks.common import (
    BenchmarkDataModule,
    BenchmarkSpec,
    VideoIndex,
    records_for_split,
    require_annotation,
)
from tvr_bench.data.prepare import VideoRecord

FILES = {"train": "Charades_v1_train.csv", "test": "Charades_v1_test.csv"}


def read_descriptions(path: Path) -> dict[str, list[str]]:
    """id -> [raw descriptions field], csv order (an empty field becomes a "no captions" manifest entry)."""
    out: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            vid = (row.get("id") or "").strip()
            if vid:
                out[vid] = [row.get("descriptions") or ""]
    return out


def locator(videos: Path) -> Callable[[str], Path]:
    """id -> ``<id>.mp4`` (any folder below ``--videos``)."""
    index = VideoIndex(videos)
    return lambda vid: index.resolve(f"{vid}.mp4", names=(f"{vid}.mp4",), stems=(vid,))


def read_records(videos: Path, annotations: Path) -> Iterator[VideoRecord]:
    """train / test: one record (one text) per video."""
    locate = locator(videos)
    for split, name in FILES.items():
        texts = read_descriptions(require_annotation(annotations, (name,), "charades"))
        yield from records_for_split(split, texts, texts, locate)


SPEC = BenchmarkSpec(
    name="charades",
    read=read_records,
    num_frames=12,
    description="Charades v1 train / test, one descriptions text per video (data_cards/charades.md)",
)


class CharadesDataModule(BenchmarkDataModule):
    """Charades: one text per video; no validation split, so validation runs on ``test``."""

    NAME: ClassVar[str] = "charades"
    PROTOCOL_SIZES: ClassVar[dict[str, int]] = {"train": 7985, "test": 1863}
    PROTOCOL_SOURCE: ClassVar[str] = (
        "Sigurdsson et al. 2016 (arXiv 1604.01753): 9,848 videos split 7,985 / 1,863; not checked against "
        "the csv row counts here (/work/shared/anchors/datasets.md section 8 marks them unverified)"
    )
    PREPARE_INPUTS: ClassVar[str] = "--videos Charades_v1_480 --annotations Charades"
    VAL_SPLIT: ClassVar[str | None] = "test"
