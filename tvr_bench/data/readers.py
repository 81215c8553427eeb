"""Registry of prepare readers: dataset name -> how to turn its raw release into VideoRecords.

A real benchmark plugs in by adding one :class:`DatasetReader` here (its reader function lives in
``tvr_bench/data/benchmarks/<name>.py`` or next to it) and a data card ``data_cards/<name>.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from tvr_bench.data import synth
from tvr_bench.data.prepare import VideoRecord


@dataclass(frozen=True)
class DatasetReader:
    """A record reader plus the prepare defaults its benchmark uses."""

    read: Callable[[Path, Path], Iterable[VideoRecord]]
    num_frames: int = 12
    sampling: str = "fps1_uniform"
    short_side: int = 224
    jpeg_quality: int = 95
    shard_size: int = 200
    description: str = ""
    #: Called after a successful prepare with (out, annotations, per-split counts), e.g. to write a data card.
    finish: Callable[[Path, Path, dict[str, dict[str, int]]], None] | None = None


READERS: dict[str, DatasetReader] = {
    "synthetic": DatasetReader(
        read=synth.read_records,
        num_frames=12,
        sampling="segment_middle",
        short_side=synth.FRAME_SIZE,
        jpeg_quality=90,
        shard_size=100,
        description="procedural shapes benchmark written by `tvr-bench synth` (data_cards/synthetic.md)",
    ),
}


def get_reader(name: str) -> DatasetReader:
    """Look up a reader by dataset name with a helpful error."""
    if name not in READERS:
        raise KeyError(f"no prepare reader for dataset {name!r}; known: {', '.join(sorted(READERS))}")
    return READERS[name]


def _register_official() -> None:
    """Add the real benchmarks (tvr_bench/data/benchmarks/<name>.py, listed in catalog.py)."""
    from tvr_bench.data.benchmarks.catalog import official_specs

    for name, spec in official_specs().items():
        READERS.setdefault(name, DatasetReader(**spec.reader_kwargs()))


_register_official()
