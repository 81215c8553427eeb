"""MSVD (data_cards/msvd.md): 1,200 / 100 / 670 videos, every caption a query (multi-caption test).

Split lists ``{train,val,test}_list.txt`` (Venugopalan et al. 2015, as shipped by CLIP4Clip and
collaborative-experts) plus one of three caption files, tried in this order:

- ``raw-captions.pkl`` (CLIP4Clip / CE): ``{id: [[token, ...], ...]}``, captions are ``" ".join(tokens)``;
  loaded with an unpickler that only accepts plain containers and strings;
- ``captions_msvd.json`` (X-Pool): ``{id: [caption, ...]}``;
- ``video_corpus.csv`` (Microsoft's original corpus): English rows only, the raw ``Description``,
  id ``<VideoID>_<Start>_<End>``.

Videos are ``<id>.avi`` from ``YouTubeClips.tar``.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

from tvr_bench.data.benchmarks.common import (
    AnnotationError,
    BenchmarkDataModule,
    BenchmarkSpec,
    VideoIndex,
    find_annotation,
    read_id_list,
    records_for_split,
    require_annotation,
)
from tvr_bench.data.prepare import VideoRecord

SPLITS = ("train", "val", "test")
CAPTION_FILES = ("raw-captions.pkl", "captions_msvd.json", "video_corpus.csv")


class _PlainUnpickler(pickle.Unpickler):
    """Refuses every global: only dicts, lists, tuples, strings and numbers can be loaded."""

    def find_class(self, module: str, name: str) -> Any:
        """Never import anything from a pickle."""
        raise pickle.UnpicklingError(f"raw-captions.pkl refers to {module}.{name}; only plain data is accepted")


def load_pickle_captions(path: Path) -> dict[str, list[str]]:
    """``raw-captions.pkl``: id -> captions, each the space-joined token list."""
    data = _PlainUnpickler(io.BytesIO(Path(path).read_bytes())).load()
    out = {}
    for vid, captions in data.items():
        out[str(vid)] = [c if isinstance(c, str) else " ".join(c) for c in captions]
    return out


def load_json_captions(path: Path) -> dict[str, list[str]]:
    """``captions_msvd.json``: id -> captions."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return {str(vid): [str(c) for c in captions] for vid, captions in data.items()}


def load_corpus_captions(path: Path) -> dict[str, list[str]]:
    """``video_corpus.csv``: id ``<VideoID>_<Start>_<End>`` -> non-empty English Descriptions, file order."""
    out: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            if (row.get("Language") or "").strip() != "English":
                continue
            text = row.get("Description") or ""
            if not text.strip():
                continue
            out.setdefault(f"{row['VideoID']}_{row['Start']}_{row['End']}", []).append(text)
    return out


LOADERS: dict[str, Callable[[Path], dict[str, list[str]]]] = {
    "raw-captions.pkl": load_pickle_captions,
    "captions_msvd.json": load_json_captions,
    "video_corpus.csv": load_corpus_captions,
}


def load_captions(annotations: Path) -> tuple[Path, dict[str, list[str]]]:
    """The first caption file found (in :data:`CAPTION_FILES` order) and its captions."""
    path = require_annotation(annotations, CAPTION_FILES, "msvd")
    return path, LOADERS[path.name](path)


def locator(videos: Path) -> Callable[[str], Path]:
    """``<id>`` -> ``<id>.avi`` (or the same stem in another container)."""
    index = VideoIndex(videos)
    return lambda vid: index.resolve(f"{vid}.avi", names=(f"{vid}.avi",), stems=(vid,))


def read_records(videos: Path, annotations: Path) -> Iterator[VideoRecord]:
    """train / val / test from the split lists, all captions of each video in file order."""
    path, captions = load_captions(annotations)
    locate = locator(videos)
    for split in SPLITS:
        listed = find_annotation(path.parent, (f"{split}_list.txt",)) or find_annotation(
            annotations, (f"{split}_list.txt",)
        )
        if listed is None:
            raise AnnotationError(f"msvd: no {split}_list.txt beside {path} (data_cards/msvd.md)")
        yield from records_for_split(
            split, read_id_list(listed), captions, locate, meta=lambda vid: {"annotation_file": path.name}
        )


SPEC = BenchmarkSpec(
    name="msvd",
    read=read_records,
    num_frames=12,
    description="MSVD 1,200 / 100 / 670, multi-caption (data_cards/msvd.md)",
)


class MSVDDataModule(BenchmarkDataModule):
    """MSVD: every caption of a test video is a query over the 670-video gallery."""

    NAME: ClassVar[str] = "msvd"
    PROTOCOL_SIZES: ClassVar[dict[str, int]] = {"train": 1200, "val": 100, "test": 670}
    PROTOCOL_SOURCE: ClassVar[str] = (
        "collaborative-experts misc/datasets/msvd {train,val,test}_list.txt (/work/shared/anchors/datasets.md section 3)"
    )
    PREPARE_INPUTS: ClassVar[str] = "--videos YouTubeClips --annotations msvd_data"
