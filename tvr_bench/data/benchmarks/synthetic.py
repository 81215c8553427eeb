"""The embedded synthetic benchmark: generated on first use, then streamed like any prepared dataset."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path
from typing import Literal

from tvr_bench.data import synth
from tvr_bench.data.datamodule import RetrievalDataModule
from tvr_bench.data.prepare import PROGRESS_FILE, PrepareConfig, prepare
from tvr_bench.data.readers import get_reader
from tvr_bench.data.shards import MANIFEST_FILE, ShardError, read_index

# Shard sizes: several training shards even for the tiny set, so worker/rank splitting is exercised.
SHARD_SIZES: dict[str, int] = {"tiny": 16, "default": 100}


def default_root(size: str, synth_seed: int = 0) -> str:
    """Where the shards of a synthetic size live unless told otherwise."""
    return f"data/synthetic-{size}" + ("" if synth_seed == 0 else f"-seed{synth_seed}")


def build_synthetic(root: str | Path, size: str = "tiny", synth_seed: int = 0, workers: int | None = None, progress: bool = True) -> Path:
    """Generate videos into ``{root}/raw`` and prepare shards into ``{root}`` unless already complete;
    a set made by an older generator version is rebuilt."""
    root = Path(root)
    raw = root / "raw"
    version = synth.generator_version(raw)
    stale = version is not None and version != synth.GENERATOR_VERSION
    if (root / MANIFEST_FILE).is_file() and not stale:
        return root
    workers = workers or min(2, os.cpu_count() or 1)
    if stale or version is None:
        synth.generate(raw, size=size, seed=synth_seed, workers=workers, progress=progress)
    reader = get_reader("synthetic")
    config = PrepareConfig(
        dataset="synthetic",
        num_frames=reader.num_frames,
        sampling=reader.sampling,
        short_side=reader.short_side,
        jpeg_quality=reader.jpeg_quality,
        shard_size=SHARD_SIZES.get(size, reader.shard_size),
    )
    prepare(
        reader.read(raw / "videos", raw),
        root,
        config,
        source_root=raw / "videos",
        workers=workers,
        resume=not stale and (root / PROGRESS_FILE).is_file(),
        overwrite=stale,
        progress=progress,
    )
    return root


class SyntheticDataModule(RetrievalDataModule):
    """Synthetic shapes benchmark (data_cards/synthetic.md); ``prepare_data`` builds it when missing."""

    def __init__(
        self,
        size: Literal["tiny", "default"] = "default",
        root: str | None = None,
        synth_seed: int = 0,
        num_frames: int = 12,
        image_size: int = 64,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 2,
        caption_mode: Literal["each", "paragraph"] = "each",
        train_stream: Literal["pairs", "videos"] | None = None,
        augment: Literal["none", "clip_train"] | None = None,
        train_captions: Literal["random", "all"] | None = None,
        last_batch: Literal["drop", "keep"] | None = None,
        val_split: str | None = "val",
        test_split: str = "test",
        seed: int = 0,
        shuffle_buffer: int = 1000,
        shuffle_buffer_mb: float = 1024.0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        cache_dir: str | None = None,
        prefetch_factor: int = 2,
    ) -> None:
        """``size`` picks tiny (tests) or default (benchmark); ``synth_seed`` the generated content."""
        if size not in synth.SIZES:
            raise ValueError(f"size must be one of {', '.join(synth.SIZES)}, got {size!r}")
        super().__init__(
            root=root or default_root(size, synth_seed),
            dataset="synthetic",
            num_frames=num_frames,
            image_size=image_size,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            caption_mode=caption_mode,
            train_stream=train_stream,
            augment=augment,
            train_captions=train_captions,
            last_batch=last_batch,
            train_split="train",
            val_split=val_split,
            test_split=test_split,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            shuffle_buffer_mb=shuffle_buffer_mb,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            cache_dir=cache_dir,
            prefetch_factor=prefetch_factor,
        )
        self.size = size
        self.synth_seed = synth_seed
        self._caption_types: dict[str, dict[str, str]] = {}

    def prepare_data(self) -> None:
        """Generate and prepare the synthetic set if its shards are missing (runs once per node)."""
        build_synthetic(self.root, size=self.size, synth_seed=self.synth_seed)

    def caption_types(self, split: str) -> dict[str, str] | None:
        """The type of every evaluation caption of ``split`` (``<video key>#<j>`` -> full, first, second, order,
        objects), read from the shards' metadata; None in paragraph mode or for a remote root. The evaluator
        reports retrieval by type from it (tvr_bench/diagnostics.py)."""
        if self.caption_mode != "each" or "://" in str(self.root) or str(self.root).startswith("pipe:"):
            return None
        if split not in self._caption_types:
            self._caption_types[split] = caption_types_of_split(Path(self.root) / split)
        return self._caption_types[split]


def caption_types_of_split(split_dir: Path) -> dict[str, str]:
    """``<video key>#<j>`` -> the type of caption j of every video of a prepared synthetic split (the
    ``extra.caption_types`` of each sample's metadata; only the JSON members are parsed)."""
    index = read_index(split_dir, "synthetic")
    out: dict[str, str] = {}
    for shard in index["shards"]:
        with tarfile.open(split_dir / shard["file"]) as tar:
            for member in tar:
                if not member.name.endswith(".json"):
                    continue
                meta = json.loads(tar.extractfile(member).read())  # type: ignore[union-attr]
                types = (meta.get("extra") or {}).get("caption_types") or []
                key = member.name[: -len(".json")]
                if len(types) != len(meta.get("captions") or []):
                    raise ShardError(f"{split_dir / shard['file']}: sample {key!r}: caption_types do not match its captions")
                out.update({f"{key}#{j}": str(t) for j, t in enumerate(types)})
    return out
