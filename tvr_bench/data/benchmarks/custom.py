"""Your own captioned videos as a benchmark (data_cards/custom.md): one CSV or JSONL file of
(video file, caption, split) rows, several rows per video allowed.

``tvr-bench prepare custom --videos DIR --annotations FILE --out data/custom`` reads FILE, which is

- a CSV with a header naming at least the columns ``video``, ``caption`` and ``split``
  (optional: ``video_id``, ``start``, ``end``), one row per (video, caption); or
- a JSONL file, one object per line with ``video``, ``split`` and ``caption`` (a string) or
  ``captions`` (a list of strings), plus the same optional fields.

``video`` is a path relative to ``--videos`` (``cooking/pasta.mp4``) or a bare name (``pasta``, any
container extension). The video id is ``video_id`` when given, else the path without its extension; rows
that share an id are one video with all their captions. ``start``/``end`` (seconds) cut a segment,
so one file can give several videos (each then needs its own ``video_id``).

Problems are reported like the official readers do and nothing is lost silently: a missing or
undecodable video is listed in ``manifest.json`` (prepare goes on); a row repeated exactly (same video,
caption and split) is kept once and the repeats are listed in one warning with their line numbers; a
row without a caption, a split name other than train/val/test, a missing column, a video listed in two
splits or a malformed line stops with an error naming the file and line.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Iterator

from tvr_bench.data.benchmarks.common import (
    VIDEO_EXTENSIONS,
    AnnotationError,
    BenchmarkDataModule,
    BenchmarkSpec,
    VideoIndex,
)
from tvr_bench.data.prepare import VideoRecord
from tvr_bench.data.shards import INDEX_FILE

SPLITS = ("train", "val", "test")
#: Annotation file names looked up when ``--annotations`` is a directory.
ANNOTATION_FILES = ("annotations.csv", "annotations.jsonl", "captions.csv", "captions.jsonl")
REQUIRED = ("video", "split")
OPTIONAL = ("video_id", "start", "end")
#: Repeated rows named in the warning before it only counts them.
SHOWN_REPEATS = 10


@dataclass
class _Video:
    """A video assembled from its rows: id, file, split, segment, captions and the lines they came from."""

    video_id: str
    video: str
    split: str
    start: float | None
    end: float | None
    line: int
    captions: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)


def _seconds(value: Any, what: str, where: str) -> float | None:
    """A start/end time in seconds (blank or missing: None)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise AnnotationError(f"{where}: {what} {value!r} is not a number of seconds (data_cards/custom.md)") from None
    if seconds < 0:
        raise AnnotationError(f"{where}: {what} {seconds} is negative (data_cards/custom.md)")
    return seconds


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a CSV with a header; the header must name the required columns."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in (*REQUIRED, "caption") if c not in header]
        if missing:
            raise AnnotationError(
                f"{path}: the header {header or '(empty file)'} lacks the column(s) {', '.join(missing)}; "
                f"expected video,caption,split[,video_id,start,end] (data_cards/custom.md)"
            )
        reader.fieldnames = header
        for row in reader:
            if None in row:
                raise AnnotationError(
                    f"{path}:{reader.line_num}: more fields than the header's {len(header)} "
                    f"(quote captions that contain commas) (data_cards/custom.md)"
                )
            yield reader.line_num, row


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of a JSON-lines file; blank lines are skipped."""
    with open(path, encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exn:
                raise AnnotationError(f"{path}:{number}: not a JSON object: {exn.msg} (data_cards/custom.md)") from None
            if not isinstance(row, dict):
                raise AnnotationError(f"{path}:{number}: expected a JSON object, got {type(row).__name__} (data_cards/custom.md)")
            yield number, row


def annotation_file(annotations: Path) -> Path:
    """The annotation file: ``annotations`` itself, or the first of :data:`ANNOTATION_FILES` inside it."""
    annotations = Path(annotations)
    if annotations.is_dir():
        for name in ANNOTATION_FILES:
            if (annotations / name).is_file():
                return annotations / name
        raise AnnotationError(f"custom: none of {', '.join(ANNOTATION_FILES)} in {annotations} (data_cards/custom.md)")
    if not annotations.is_file():
        raise AnnotationError(f"custom: annotation file {annotations} not found (data_cards/custom.md)")
    if annotations.suffix.lower() not in (".csv", ".jsonl", ".ndjson"):
        raise AnnotationError(f"{annotations}: expected a .csv or .jsonl annotation file (data_cards/custom.md)")
    return annotations


def _captions_of(row: dict[str, Any], where: str) -> list[str]:
    """The row's caption(s): ``caption`` (string) or ``captions`` (list of strings), each with text."""
    if "captions" in row and "caption" not in row:
        captions = row["captions"]
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise AnnotationError(f"{where}: `captions` must be a list of strings (data_cards/custom.md)")
    elif "caption" in row:
        captions = [row["caption"]]
        if not isinstance(captions[0], str):
            raise AnnotationError(f"{where}: `caption` must be a string (data_cards/custom.md)")
    else:
        raise AnnotationError(f"{where}: no `caption` (or `captions`) field (data_cards/custom.md)")
    if not captions or any(not c.strip() for c in captions):
        raise AnnotationError(f"{where}: empty caption; every row needs a caption with text (data_cards/custom.md)")
    return [c.strip() for c in captions]


def default_video_id(video: str) -> str:
    """The id of a video given by its path: the relative path without a known container extension."""
    pure = PurePosixPath(video.replace("\\", "/"))
    if pure.suffix.lower().lstrip(".") in VIDEO_EXTENSIONS:
        pure = pure.with_suffix("")
    return str(pure).lstrip("./") or video


def read_annotations(path: Path) -> list[_Video]:
    """Parse and check the annotation file: one entry per video id, in first-seen order."""
    rows = _jsonl_rows(path) if path.suffix.lower() in (".jsonl", ".ndjson") else _csv_rows(path)
    videos: dict[str, _Video] = {}
    seen: dict[tuple[str, str, str], int] = {}
    repeats: list[str] = []
    for number, row in rows:
        where = f"{path}:{number}"
        values = {k: row.get(k) for k in (*REQUIRED, *OPTIONAL)}
        for column in REQUIRED:
            if not isinstance(values[column], str) or not values[column].strip():
                raise AnnotationError(f"{where}: no `{column}` value (data_cards/custom.md)")
        video, split = values["video"].strip(), values["split"].strip()
        if split not in SPLITS:
            raise AnnotationError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)} (data_cards/custom.md)")
        given_id = values["video_id"]
        video_id = given_id.strip() if isinstance(given_id, str) and given_id.strip() else default_video_id(video)
        start, end = _seconds(values["start"], "start", where), _seconds(values["end"], "end", where)
        if start is not None and end is not None and end <= start:
            raise AnnotationError(f"{where}: end {end} is not after start {start} (data_cards/custom.md)")
        entry = videos.get(video_id)
        if entry is None:
            entry = videos[video_id] = _Video(video_id, video, split, start, end, number)
        elif entry.split != split:
            raise AnnotationError(
                f"{where}: video {video_id!r} is in split {split!r} here and in {entry.split!r} at line {entry.line}: "
                f"a video in two splits leaks test content into training (data_cards/custom.md)"
            )
        elif (entry.video, entry.start, entry.end) != (video, start, end):
            raise AnnotationError(
                f"{where}: video id {video_id!r} names {video} [{start}, {end}] here and {entry.video} "
                f"[{entry.start}, {entry.end}] at line {entry.line}: give each file or segment its own video_id "
                f"(data_cards/custom.md)"
            )
        for caption in _captions_of(row, where):
            key = (video_id, caption, split)
            if key in seen:
                repeats.append(f"line {number} repeats line {seen[key]} ({video_id!r}: {caption!r})")
                continue
            seen[key] = number
            entry.captions.append(caption)
            entry.lines.append(number)
    if not videos:
        raise AnnotationError(f"{path}: no annotation rows (data_cards/custom.md)")
    if repeats:
        shown = "; ".join(repeats[:SHOWN_REPEATS]) + (f"; and {len(repeats) - SHOWN_REPEATS} more" if len(repeats) > SHOWN_REPEATS else "")
        warnings.warn(f"{path}: {len(repeats)} repeated row(s) kept once: {shown}", stacklevel=2)
    return list(videos.values())


def read_records(videos: Path, annotations: Path) -> Iterator[VideoRecord]:
    """Records of the user's annotation file, each video found under ``videos`` by its path or name."""
    path = annotation_file(annotations)
    entries = read_annotations(path)
    index = VideoIndex(videos)
    for entry in entries:
        relative = Path(videos) / entry.video
        if relative.is_file():
            located: Any = relative
        else:
            name = PurePosixPath(entry.video.replace("\\", "/")).name
            stem = default_video_id(name)
            located = index.resolve(entry.video, names=(name,), stems=(stem,))
        yield VideoRecord(
            video_id=entry.video_id,
            path=located,
            captions=list(entry.captions),
            split=entry.split,
            start=entry.start,
            end=entry.end,
            meta={"annotation_file": path.name, "annotation_lines": list(entry.lines)},
        )


#: The card ``prepare custom`` writes beside the shards (once; an existing card is never overwritten).
CARD_FILE = "DATA_CARD.md"
CARD_TEMPLATE = """# {name}

Your own captioned videos, prepared with `tvr-bench prepare custom` (data_cards/custom.md explains the format).
Fill in what is in brackets: a reader of your results needs it.

## Source and licence

- **Videos:** [where they come from, who recorded them, their licence or terms of use]
- **Captions:** [who wrote them, how (instructions, crowd-sourced, generated), their licence]
- Annotation file: `{annotations}`

## Splits and counts (as prepared)

| split | videos | captions | missing or undecodable |
|---|---|---|---|
{rows}

`manifest.json` beside this card lists every video that was missing or could not be decoded, with the reason.

## Protocol

- Every caption of a test video is a query over the test videos (text-to-video); video-to-text ranks each
  video by the best caption of every video (the multi-caption protocol of MSVD and VATEX).
- Model selection: the `val` split [or: none; results select on test and flatter the model].
- [How the splits were drawn: by video, by source, by date; whether one source appears in two splits.]

## Known quirks

- [Anything a reader should know: duplicated clips, very short videos, captions that name the file, ...]
"""


def write_card(out: Path, annotations: Path, splits: dict[str, dict[str, int]]) -> Path | None:
    """Write ``<out>/DATA_CARD.md`` from :data:`CARD_TEMPLATE` with the prepared counts (never overwrites one)."""
    card = Path(out) / CARD_FILE
    if card.exists():
        return None
    rows = "\n".join(
        f"| `{split}` | {counts.get('num_samples', 0):,} | {counts.get('num_captions', 0):,} | {counts.get('num_failed', 0):,} |"
        for split, counts in splits.items()
    )
    card.write_text(CARD_TEMPLATE.format(name=Path(out).name, annotations=annotations, rows=rows), encoding="utf-8")
    print(f"wrote {card}: fill in its bracketed parts (source, licence, how the splits were drawn)")
    return card


SPEC = BenchmarkSpec(
    name="custom",
    read=read_records,
    num_frames=12,
    description="your own captioned videos: a CSV/JSONL of (video, caption, split) rows (data_cards/custom.md)",
    finish=write_card,
)


class CustomDataModule(BenchmarkDataModule):
    """Your own captioned videos, prepared with ``tvr-bench prepare custom``: every caption of a test video
    is a query over the test videos. Validation uses the ``val`` split; without one, the run stops and says
    how to add one (or to select on the test split, knowingly)."""

    NAME: ClassVar[str] = "custom"
    PROTOCOL_SIZES: ClassVar[dict[str, int]] = {}
    PROTOCOL_SOURCE: ClassVar[str] = "your annotation file (no official protocol: every prepared video counts)"
    PREPARE_INPUTS: ClassVar[str] = "--videos VIDEOS_DIR --annotations ANNOTATIONS.csv"
    OFFICIAL: ClassVar[bool] = False  # no protocol size; `name` labels the results (give each dataset its own)

    def setup(self, stage: str | None = None) -> None:
        """Check that a validation split exists before training (a clear error instead of an empty loader)."""
        if stage in (None, "fit", "validate") and self.val_split is not None and self._is_local():
            index = Path(self.root) / self.val_split / INDEX_FILE
            if not index.is_file() and (Path(self.root) / self.train_split / INDEX_FILE).is_file():
                raise FileNotFoundError(
                    f"{self.root} has no {self.val_split!r} split for model selection: add rows with split=val to your "
                    f"annotations and prepare again, or select on the test split knowingly with "
                    f"--data.init_args.val_split test (the chosen checkpoint then flatters the test numbers) "
                    f"(data_cards/custom.md)"
                )
        super().setup(stage)

    def _is_local(self) -> bool:
        """True when the root is a local directory (not a URL or a pipe)."""
        return "://" not in str(self.root) and not str(self.root).startswith("pipe:")
