"""LSMDC (data_cards/lsmdc.md): the LSMDC 2016 retrieval files, CLIP4Clip protocol (every row a pair).

Official files: ``LSMDC16_annos_training.csv``, ``LSMDC16_annos_val.csv`` and
``LSMDC16_challenge_1000_publictect.csv`` (sic): no header, TAB-separated despite the extension, six
fields ``CLIP_ID START_ALIGNED END_ALIGNED START_EXTRACTED END_EXTRACTED SENTENCE``. Lines are split
on tabs, never parsed as CSV (sentences start with or contain double quotes). Clip ids repeat in
training (several sentences per clip): they become one video with all its sentences. Videos are
``<videos>/<movie>/<clip_id>.avi`` with ``movie = clip_id.split('.')[0][:-3]``; the ids contain dots,
so their shard keys are sanitised (the id itself is kept in the metadata).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar, Iterator

from tvr_bench.data.benchmarks.common import (
    AnnotationError,
    BenchmarkDataModule,
    BenchmarkSpec,
    VideoIndex,
    records_for_split,
    require_annotation,
)
from tvr_bench.data.prepare import VideoRecord

FILES = {
    "train": ("LSMDC16_annos_training.csv",),
    "val": ("LSMDC16_annos_val.csv",),
    "test": ("LSMDC16_challenge_1000_publictect.csv", "LSMDC16_challenge_1000_publictest.csv"),
}
NUM_FIELDS = 6


def read_rows(path: Path) -> list[tuple[str, list[str]]]:
    """(clip id, [the six fields]) per line; the sentence is everything after the fifth tab."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()  # as CLIP4Clip: the line, not the sentence's inner spacing
        if not line:
            continue
        fields = line.split("\t", NUM_FIELDS - 1)
        if len(fields) != NUM_FIELDS:
            raise AnnotationError(
                f"{path}:{number}: expected {NUM_FIELDS} tab-separated fields, got {len(fields)} (data_cards/lsmdc.md)"
            )
        rows.append((fields[0].strip(), fields))
    return rows


def sentences_by_clip(path: Path) -> dict[str, list[str]]:
    """Clip id -> the sentence of each of its rows, in file order (first-seen clip order)."""
    out: dict[str, list[str]] = {}
    for clip, fields in read_rows(path):
        out.setdefault(clip, []).append(fields[-1])
    return out


def movie_of(clip_id: str) -> str:
    """The movie folder of a clip, as the reference loaders compute it."""
    return clip_id.split(".")[0][:-3]


def locator(videos: Path) -> Callable[[str], Path]:
    """Clip id -> ``<movie>/<clip_id>.avi`` (or the clip under any folder / container)."""
    index = VideoIndex(videos)
    return lambda clip: index.resolve(f"{movie_of(clip)}/{clip}.avi", names=(f"{clip}.avi",), stems=(clip,))


def read_records(videos: Path, annotations: Path) -> Iterator[VideoRecord]:
    """train / val / test from the three official files; one record per distinct clip id."""
    locate = locator(videos)
    for split, names in FILES.items():
        sentences = sentences_by_clip(require_annotation(annotations, names, "lsmdc"))
        yield from records_for_split(
            split, sentences, sentences, locate, meta=lambda clip: {"movie": movie_of(clip)}
        )


SPEC = BenchmarkSpec(
    name="lsmdc",
    read=read_records,
    num_frames=12,
    description="LSMDC 2016 retrieval: training / val / 1,000-clip public test (data_cards/lsmdc.md)",
)


class LSMDCDataModule(BenchmarkDataModule):
    """LSMDC: train on every (clip, sentence) row, test on the 1,000 public-test pairs."""

    NAME: ClassVar[str] = "lsmdc"
    # train/val: clip ids repeat across rows and the distinct-clip counts are not published, so no size
    PROTOCOL_SIZES: ClassVar[dict[str, int]] = {"test": 1000}
    PROTOCOL_SOURCE: ClassVar[str] = (
        "LSMDC16_challenge_1000_publictect.csv, 1,000 distinct clips (asserted in CLIP4Clip "
        "dataloaders/dataloader_lsmdc_retrieval.py; /work/shared/anchors/datasets.md section 4)"
    )
    PREPARE_INPUTS: ClassVar[str] = "--videos LSMDC/avi --annotations LSMDC/annotations"
