"""DiDeMo (data_cards/didemo.md): paragraph-to-video retrieval, CLIP4Clip protocol.

Official files (LisaAnne/LocalizingMoments ``data/``): ``{train,val,test}_data.json`` (a JSON list of
moment records with ``video``, ``description``, ``times`` ...), the split lists ``{split}_list.txt``
(full file names, as CLIP4Clip and collaborative-experts use) and ``video_licenses.txt``.
Each video's descriptions are kept in JSON order (the paragraph is their ``" ".join``, made by the
DataModule) and frames come from [0, 31] s, as CLIP4Clip does (whole seconds 0..31 inclusive). Video ids are the Flickr file names,
extension included (``.m4v``, ``.null``, a trailing ``.`` ...); files are found under that exact name
or under the AWS download script's ``<name>.mp4``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable, ClassVar, Iterator

from tvr_bench.data.benchmarks.common import (
    VIDEO_EXTENSIONS,
    AnnotationError,
    BenchmarkDataModule,
    BenchmarkSpec,
    VideoIndex,
    find_annotation,
    paragraph_parts,
    read_id_list,
    records_for_split,
    require_annotation,
)
from tvr_bench.data.prepare import VideoRecord

SPLITS = ("train", "val", "test")
#: CLIP4Clip reads the clip [0, 31] s (so video lengths need not be known): its 1-fps loop takes the
#: whole seconds 0, 1, ..., 31 inclusive, i.e. the half-open window [0, 32) that prepare samples.
REFERENCE_WINDOW = (0.0, 31.0)
SEGMENT = (REFERENCE_WINDOW[0], REFERENCE_WINDOW[1] + 1.0)


def descriptions_by_video(path: Path) -> dict[str, list[str]]:
    """Video name -> descriptions of its moments, in JSON order (not temporal order)."""
    records = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise AnnotationError(f"{path}: expected a JSON list of moment records (data_cards/didemo.md)")
    out: dict[str, list[str]] = {}
    for record in records:
        out.setdefault(record["video"], []).append(record["description"])
    return out


def read_licenses(path: Path | None) -> dict[str, str]:
    """Flickr photo id -> licence URL from ``video_licenses.txt`` (tab-separated, empty columns skipped)."""
    if path is None:
        return {}
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines()[1:]:
        fields = [f.strip() for f in line.split("\t") if f.strip()]
        if len(fields) >= 2:
            out[fields[0]] = fields[-1]
    return out


def photo_id(video: str) -> str:
    """The Flickr photo id inside ``<owner>_<photoid>_<secret>.<ext>``."""
    parts = video.split("_")
    return parts[1] if len(parts) >= 3 else video


def locator(videos: Path) -> Callable[[str], Path]:
    """Video name -> file: the exact name, the AWS ``<name>.mp4``, ``<name>.<ext>``, then ``<stem>.<ext>``."""
    index = VideoIndex(videos)

    def locate(video: str) -> Path:
        """The file of one DiDeMo video (or where it should be)."""
        stems = [video]
        base, dot, ext = video.rpartition(".")
        if dot and (ext.lower() in VIDEO_EXTENSIONS or ext == "" or ext.lower() == "null"):
            stems.append(base)
        return index.resolve(video, names=(video, f"{video}.mp4"), stems=stems)

    return locate


def read_records(videos: Path, annotations: Path) -> Iterator[VideoRecord]:
    """One record per listed video: its descriptions (JSON order), clip [0, 31] s, licence in the metadata."""
    licenses = read_licenses(find_annotation(annotations, ("video_licenses.txt",)))
    locate = locator(videos)
    for split in SPLITS:
        data = require_annotation(annotations, (f"{split}_data.json",), "didemo")
        descriptions = {vid: paragraph_parts(texts) for vid, texts in descriptions_by_video(data).items()}
        listed = find_annotation(annotations, (f"{split}_list.txt",))
        if listed is None:
            warnings.warn(
                f"didemo: no {split}_list.txt under {annotations}; using every video of {data.name} "
                f"(the CLIP4Clip protocol uses the split lists, data_cards/didemo.md)",
                stacklevel=2,
            )
            ids = list(descriptions)
        else:
            ids = read_id_list(listed)
        yield from records_for_split(
            split,
            ids,
            descriptions,
            locate,
            segment=SEGMENT,
            meta=lambda vid: {"license": licenses.get(photo_id(vid)), "reference_window_s": list(REFERENCE_WINDOW)},
        )


SPEC = BenchmarkSpec(
    name="didemo",
    read=read_records,
    num_frames=64,
    description="DiDeMo paragraph-to-video, clip [0, 31] s, CE split lists (data_cards/didemo.md)",
)


class DiDeMoDataModule(BenchmarkDataModule):
    """DiDeMo: one paragraph per video (descriptions joined in JSON order), 64 frames."""

    NAME: ClassVar[str] = "didemo"
    PROTOCOL_SIZES: ClassVar[dict[str, int]] = {"train": 8392, "val": 1065, "test": 1004}
    PROTOCOL_SOURCE: ClassVar[str] = (
        "collaborative-experts misc/datasets/didemo {train,val,test}_list.txt, the lists CLIP4Clip reads "
        "(/work/shared/anchors/datasets.md section 6)"
    )
    PREPARE_INPUTS: ClassVar[str] = "--videos didemo/videos --annotations LocalizingMoments/data"
    NUM_FRAMES: ClassVar[int] = 64
    CAPTION_MODE: ClassVar[str] = "paragraph"
