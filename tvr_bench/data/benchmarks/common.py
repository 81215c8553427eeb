"""Shared pieces of the real benchmarks: finding official files and videos, and the DataModule base.

Every benchmark module (``msrvtt.py``, ``didemo.py`` ...) defines

- a reader ``read_records(videos, annotations)`` that parses the official annotation files and yields
  one :class:`~tvr_bench.data.prepare.VideoRecord` per (video, split) for the generic ``prepare``;
- a :class:`BenchmarkSpec` ``SPEC`` (name, reader, prepare defaults) that
  :mod:`tvr_bench.data.benchmarks.catalog` hands to the reader registry;
- a :class:`BenchmarkDataModule` subclass whose class attributes are the benchmark's defaults.

Videos are located by the dataset's own naming through a :class:`VideoIndex` (one directory walk); a
video that cannot be found still becomes a record, pointing at the path the official naming expects,
so that ``prepare`` lists it as missing in ``manifest.json`` instead of dropping it silently.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Literal, Sequence

from tvr_bench.data.datamodule import RetrievalDataModule
from tvr_bench.data.frames import POLICIES
from tvr_bench.data.prepare import VideoRecord
from tvr_bench.data.streams import SplitShards
from tvr_bench.data.video import TarMember

#: Container extensions tried (in this order) when a dataset names a video by id only.
VIDEO_EXTENSIONS: tuple[str, ...] = (
    "mp4", "webm", "mkv", "avi", "mov", "m4v", "mpg", "mpeg", "3gp", "3g2", "3gpp", "wmv", "asf", "flv",
    "ogv", "ts", "mts", "m2ts", "qt", "divx",
)
#: Names of unfinished downloads (yt-dlp, browsers, aria2): never used as a video.
PARTIAL_SUFFIXES: tuple[str, ...] = (".part", ".ytdl", ".tmp", ".temp", ".crdownload", ".aria2", ".download")

Reader = Callable[[Path, Path], Iterable[VideoRecord]]


class AnnotationError(FileNotFoundError):
    """An official annotation file is missing or malformed; the message names the file and data card."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """What the prepare registry needs to know about one benchmark."""

    name: str
    read: Reader
    num_frames: int = 12
    sampling: str = "fps1_uniform"
    shard_size: int = 200
    description: str = ""
    #: Called by ``tvr-bench prepare`` after a successful run with (out, annotations, the report's splits).
    finish: Callable[[Path, Path, dict[str, dict[str, int]]], None] | None = None

    def reader_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`tvr_bench.data.readers.DatasetReader`."""
        return {
            "read": self.read,
            "num_frames": self.num_frames,
            "sampling": self.sampling,
            "shard_size": self.shard_size,
            "description": self.description,
            "finish": self.finish,
        }


# --------------------------------------------------------------------------- annotation files
def find_annotation(annotations: Path, names: Sequence[str]) -> Path | None:
    """The first of ``names`` found as ``annotations`` itself, directly inside it, or anywhere below it."""
    annotations = Path(annotations)
    if annotations.is_file():
        return annotations if annotations.name in names else None
    if not annotations.is_dir():
        return None
    for name in names:
        if (annotations / name).is_file():
            return annotations / name
    for name in names:
        found = sorted(p for p in annotations.rglob(name) if p.is_file())
        if found:
            return found[0]
    return None


def require_annotation(annotations: Path, names: Sequence[str], dataset: str) -> Path:
    """Like :func:`find_annotation` but raises :class:`AnnotationError` naming the expected files."""
    path = find_annotation(annotations, names)
    if path is None:
        raise AnnotationError(
            f"{dataset}: none of {', '.join(names)} found under {annotations} "
            f"(see data_cards/{dataset}.md for the official files)"
        )
    return path


def read_id_list(path: Path) -> list[str]:
    """Ids of a split list, one per line (blank lines skipped, line ends stripped, order kept)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            out.append(line)
    return out


def unique(items: Iterable[str]) -> list[str]:
    """Items in first-seen order without repeats."""
    return list(dict.fromkeys(items))


def paragraph_parts(sentences: Sequence[str]) -> list[str]:
    """Sentences as captions with text whose ``" ".join`` equals the reference ``" ".join(sentences)``.

    Shards require captions with text; an empty or blank sentence is folded into its neighbour
    together with the separator the reference join puts around it, so paragraphs stay byte-identical.
    """
    parts: list[str] = []
    pending = ""
    for sentence in sentences:
        if not sentence.strip():
            if parts:
                parts[-1] += " " + sentence
            else:
                pending += sentence + " "
            continue
        parts.append(pending + sentence)
        pending = ""
    return parts


# --------------------------------------------------------------------------- video files
class VideoIndex:
    """Every file below a video directory, by file name (one walk, on first use).

    Unfinished downloads (``.part`` ...) and hidden directories are ignored. When two folders hold the
    same file name, the first in sorted walk order wins and a warning names both.

    A directory registered with :meth:`use_members` (video2dataset shards) is not walked: its videos
    are the registered tar members, found by the same names.
    """

    #: Registered in-tar videos: resolved directory -> {file name: tar member}.
    _MEMBERS: ClassVar[dict[str, dict[str, TarMember]]] = {}

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._names: dict[str, Path | TarMember] | None = None
        self._lower: dict[str, Path | TarMember] = {}

    @classmethod
    def use_members(cls, root: Path, members: dict[str, TarMember] | None) -> None:
        """Make ``root`` resolve to these tar members (file name -> member); ``None`` unregisters it."""
        key = str(Path(root).resolve())
        if members is None:
            cls._MEMBERS.pop(key, None)
        else:
            cls._MEMBERS[key] = dict(members)

    def _walk(self) -> dict[str, Path | TarMember]:
        """Build the name -> path map."""
        if self._names is not None:
            return self._names
        registered = self._MEMBERS.get(str(self.root.resolve()))
        if registered is not None:
            self._names = dict(registered)
            self._lower = {}
            for name, member in self._names.items():
                self._lower.setdefault(name.lower(), member)
            return self._names
        names: dict[str, Path | TarMember] = {}
        duplicates = 0
        for folder, dirs, files in os.walk(self.root, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith(".") or name.lower().endswith(PARTIAL_SUFFIXES):
                    continue
                path = Path(folder) / name
                if name in names:
                    duplicates += 1
                    if duplicates <= 3:
                        warnings.warn(f"{name} found twice ({names[name]}, {path}); using the first", stacklevel=3)
                    continue
                names[name] = path
        self._names = names
        self._lower = {}
        for name, path in names.items():
            self._lower.setdefault(name.lower(), path)
        return names

    def exact(self, *names: str) -> Path | TarMember | None:
        """The first of ``names`` present as a file name."""
        index = self._walk()
        for name in names:
            if name in index:
                return index[name]
        return None

    def by_stem(self, stem: str, extensions: Sequence[str] = VIDEO_EXTENSIONS) -> Path | TarMember | None:
        """A file called ``<stem>.<ext>`` for a known video extension (any case), in extension order."""
        index = self._walk()
        for ext in extensions:
            name = f"{stem}.{ext}"
            if name in index:
                return index[name]
            if name.lower() in self._lower:
                return self._lower[name.lower()]
        return None

    def find(self, names: Sequence[str] = (), stems: Sequence[str] = ()) -> Path | TarMember | None:
        """Exact names first, then ``<stem>.<video ext>`` for each stem."""
        found = self.exact(*names)
        if found is not None:
            return found
        for stem in stems:
            found = self.by_stem(stem)
            if found is not None:
                return found
        return None

    def resolve(self, expected: str, names: Sequence[str] = (), stems: Sequence[str] = ()) -> Path | TarMember:
        """The video file, or ``root/expected`` (absent, so prepare reports it missing) when none matches."""
        found = self.find(names, stems)
        return found if found is not None else self.root / expected


# --------------------------------------------------------------------------- DataModule base
AUTO = "auto"


class BenchmarkDataModule(RetrievalDataModule):
    """A prepared real benchmark: :class:`RetrievalDataModule` with the benchmark's defaults.

    Arguments left at ``None`` / ``"auto"`` take the class defaults (``NUM_FRAMES``, ``CAPTION_MODE``,
    ``TRAIN_SPLIT``, ``VAL_SPLIT`` ...). The shards are read from ``root`` (default ``data/<name>``, or
    ``data/<name>-segment_middle`` when ``sampling="segment_middle"``); when ``sampling`` is given, the
    shards must have been prepared with it. A missing root raises a FileNotFoundError pointing to the
    benchmark's data card.
    """

    NAME: ClassVar[str] = ""
    NUM_FRAMES: ClassVar[int] = 12
    SAMPLING: ClassVar[str] = "fps1_uniform"
    CAPTION_MODE: ClassVar[str] = "each"
    TRAIN_CAPTIONS: ClassVar[str] = "all"
    TRAIN_SPLIT: ClassVar[str] = "train"
    VAL_SPLIT: ClassVar[str | None] = "val"
    TEST_SPLIT: ClassVar[str] = "test"
    #: Videos per split in the official protocol (a split left out: the protocol fixes no size for it).
    PROTOCOL_SIZES: ClassVar[dict[str, int]] = {}
    #: Where :attr:`PROTOCOL_SIZES` come from (repository file or paper), shown in the data card.
    PROTOCOL_SOURCE: ClassVar[str] = ""
    #: ``--videos``/``--annotations`` of the data card's prepare command (where the user unpacked the release).
    PREPARE_INPUTS: ClassVar[str] = ""
    #: An official benchmark (a published protocol, its name fixed); False for the user's own data, which has no
    #: protocol size and may be labelled with ``name``.
    OFFICIAL: ClassVar[bool] = True

    def __init__(
        self,
        root: str | None = None,
        sampling: Literal["fps1_uniform", "segment_middle"] | None = None,
        num_frames: int | None = None,
        image_size: int = 224,
        batch_size: int = 128,
        eval_batch_size: int = 64,
        num_workers: int = 4,
        caption_mode: Literal["each", "paragraph"] | None = None,
        train_stream: Literal["pairs", "videos"] | None = None,
        augment: Literal["none", "clip_train"] | None = None,
        train_captions: Literal["random", "all"] | None = None,
        last_batch: Literal["drop", "keep"] | None = None,
        train_split: str | None = None,
        val_split: str | None = AUTO,
        test_split: str | None = None,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        shuffle_buffer_mb: float = 1024.0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        name: str | None = None,
        cache_dir: str | None = None,
        prefetch_factor: int = 2,
    ) -> None:
        """``None``/``"auto"`` arguments take the benchmark's defaults; ``val_split=None`` disables validation;
        ``name`` labels the dataset in results (only the user's own data, not an ``OFFICIAL`` benchmark)."""
        if not self.NAME:
            raise TypeError("BenchmarkDataModule is abstract: use a benchmark subclass")
        if name is not None and name != self.NAME:
            if self.OFFICIAL:
                raise ValueError(f"the {self.NAME} benchmark keeps its name (got name={name!r}); only custom data is renamed")
            if not all(c.isalnum() or c in "-_" for c in name):
                raise ValueError(f"data name must be letters, digits, '-' or '_', got {name!r}")
        if sampling is not None and sampling not in POLICIES:
            raise ValueError(f"sampling must be one of {', '.join(POLICIES)}, got {sampling!r}")
        super().__init__(
            root=root or self.default_root(sampling, num_frames),
            dataset=self.NAME,
            num_frames=num_frames or self.NUM_FRAMES,
            image_size=image_size,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            caption_mode=caption_mode or self.CAPTION_MODE,  # type: ignore[arg-type]
            train_stream=train_stream,
            augment=augment,
            train_captions=train_captions or self.TRAIN_CAPTIONS,  # type: ignore[arg-type]  # read when train_stream is unset
            last_batch=last_batch,
            train_split=train_split or self.TRAIN_SPLIT,
            val_split=self.VAL_SPLIT if val_split == AUTO else val_split,
            test_split=test_split or self.TEST_SPLIT,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            shuffle_buffer_mb=shuffle_buffer_mb,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            cache_dir=cache_dir,
            prefetch_factor=prefetch_factor,
        )
        self.sampling = sampling
        self.name = name or self.NAME
        # hparams: this class's own arguments with the defaults resolved (re-instantiable as is)
        self.hparams.pop("dataset", None)
        self.hparams.update(
            name=self.name,
            root=self.root,
            num_frames=self.num_frames,
            caption_mode=self.caption_mode,
            train_stream=self.train_stream,
            augment=self.augment,
            train_captions=self.train_captions,
            last_batch=self.last_batch,
            train_split=self.train_split,
            val_split=self.val_split,
            test_split=self.test_split,
        )

    @classmethod
    def default_root(cls, sampling: str | None = None, num_frames: int | None = None) -> str:
        """Where ``tvr-bench prepare`` writes this benchmark by the data card's command:
        ``data/<name>``, plus ``-<sampling>`` for the other sampling and ``-<N>f`` for another frame count."""
        root = f"data/{cls.NAME}"
        if sampling is not None and sampling != cls.SAMPLING:
            root += f"-{sampling}"
        if num_frames is not None and num_frames != cls.NUM_FRAMES:
            root += f"-{num_frames}f"
        return root

    @classmethod
    def protocol_size(cls, split: str) -> int | None:
        """Videos the official protocol has in ``split`` (None when the protocol fixes no size for it)."""
        return cls.PROTOCOL_SIZES.get(split)

    @classmethod
    def prepare_command(cls, sampling: str | None = None, num_frames: int | None = None, out: str | None = None) -> str:
        """The exact ``tvr-bench prepare`` command (data card form) for shards with this sampling and frame count."""
        sampling = sampling or cls.SAMPLING
        parts = ["tvr-bench prepare", cls.NAME, cls.PREPARE_INPUTS]
        if num_frames is not None and num_frames != cls.NUM_FRAMES:
            parts.append(f"--frames {num_frames}")
        if sampling != cls.SAMPLING:
            parts.append(f"--sampling {sampling}")
        parts.append(f"--out {out or cls.default_root(sampling, num_frames)}")
        return " ".join(p for p in parts if p)

    def split_shards(self, split: str) -> SplitShards:
        """The split's shards, checked to belong to this benchmark (and sampling, when one was asked)."""
        shards = super().split_shards(split)
        index = shards.index
        if index.get("dataset") not in (None, self.NAME):
            raise ValueError(
                f"{shards.directory} holds {index.get('dataset')!r} shards, not {self.NAME!r}: "
                f"check `root` (data_cards/{self.NAME}.md)"
            )
        if self.sampling is not None and index.get("sampling") != self.sampling:
            raise ValueError(
                f"{shards.directory} was prepared with sampling {index.get('sampling')!r} but this run asks for "
                f"{self.sampling!r}: prepare them with `{self.prepare_command(self.sampling, self.num_frames)}` "
                f"(data_cards/{self.NAME}.md)"
            )
        return shards


def records_for_split(
    split: str,
    ids: Iterable[str],
    captions: dict[str, list[str]],
    locate: Callable[[str], Path],
    segment: tuple[float | None, float | None] = (None, None),
    meta: Callable[[str], dict[str, Any]] | None = None,
) -> Iterator[VideoRecord]:
    """Records for the ids of a split list with their non-blank captions, in list order.

    A listed video without any caption is still yielded (with none), so that ``prepare`` reports it
    in the manifest ("no captions") instead of it vanishing from the split.
    """
    for video_id in unique(ids):
        yield VideoRecord(
            video_id=video_id,
            path=locate(video_id),
            captions=[text for text in captions.get(video_id, []) if text.strip()],
            split=split,
            start=segment[0],
            end=segment[1],
            meta=meta(video_id) if meta is not None else {},
        )
