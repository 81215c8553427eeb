"""RetrievalDataModule: streams prepared WebDataset shards into the batches of docs/INTERFACES.md."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import lightning as L

from tvr_bench.data.offsets import SampleReader, SplitOffsets, cache_remote_split, default_cache_dir, load_offsets
from tvr_bench.data.order import LAST_BATCH, batch_sizes, rank_batches
from tvr_bench.data.streams import (
    TRAIN_STREAMS,
    SlotPlan,
    SplitShards,
    StreamLoader,
    StreamState,
    TrainOrderSource,
    eval_batches_on_rank,
    eval_pipeline,
    is_remote,
    load_split,
    make_loader,
)
from tvr_bench.data.transforms import AUGMENTS, normalize_batch

#: The deprecated ``train_captions`` values and the ``train_stream`` each stands for.
TRAIN_CAPTIONS_ALIAS: dict[str, str] = {"random": "videos", "all": "pairs"}


class RetrievalDataModule(L.LightningDataModule):
    """Text-video retrieval data from ``{root}/{split}/shard-*.tar`` (see data_cards/FORMAT.md); ``root`` may
    also be an ``http(s)://`` / ``gs://`` URL prefix or a ``pipe:`` command with ``{}`` for the relative path
    (object storage, streamed by WebDataset; see docs/scaling.md).

    Training yields (frames, one caption) batches of distinct videos in one global order per epoch (a uniform
    random permutation seeded by ``seed`` and the epoch; :mod:`tvr_bench.data.order`), each global batch
    (``batch_size`` x processes) split across the ranks, so any number of processes and workers trains on the
    same batches: ``train_stream: pairs`` uses every (video, caption) pair once per epoch (CLIP4Clip / DRL /
    X-Pool / T-MASS code), ``videos`` every video once with one random caption per visit. ``last_batch``
    drops (``drop``, the default) or keeps (``keep``) the incomplete last global batch of an epoch, as the
    method's reference does (the CLI fills it from the method's ``DATA_PROTOCOL``). ``augment: clip_train``
    adds X-Pool's random resized crop + flip (the same for every frame of a clip, seeded per sample); eval
    always centre-crops. val/test yield every video once with all its captions, exactly once across ranks
    and workers.

    Frames leave the loaders as uint8 ``[B, F, 3, S, S]``; :meth:`on_after_batch_transfer` normalises them
    on the device (CLIP mean/std, padded frames zero); code iterating the loaders without a Trainer calls
    :func:`tvr_bench.data.transforms.normalize_batch`.

    ``train_captions`` is the deprecated name of ``train_stream`` (``random`` = ``videos``, ``all`` =
    ``pairs``), read only when ``train_stream`` is unset; both unset: ``videos``. Training reads samples by
    their byte offsets (``{split}/offsets.json``, written by ``prepare``, built on first use for older shards);
    a remote ``root`` is copied once into ``cache_dir`` (default ``$TVR_BENCH_CACHE`` or
    ``~/.cache/tvr-bench/shards``) for training. ``shuffle_buffer`` and ``shuffle_buffer_mb`` are deprecated
    and ignored (the former pools of undecoded videos are gone). ``prefetch_factor`` is the DataLoader's
    batches in flight per worker. ``persistent_workers`` keeps the val/test workers alive between
    evaluations (the training workers restart each epoch, as the order derives from the epoch).
    """

    def __init__(
        self,
        root: str = "data/synthetic-default",
        dataset: str = "synthetic",
        num_frames: int = 12,
        image_size: int = 224,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 2,
        caption_mode: Literal["each", "paragraph"] = "each",
        train_stream: Literal["pairs", "videos"] | None = None,
        augment: Literal["none", "clip_train"] | None = None,
        train_captions: Literal["random", "all"] | None = None,
        last_batch: Literal["drop", "keep"] | None = None,
        train_split: str = "train",
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
        """Configure the streams; nothing is read until setup or a dataloader is asked for."""
        super().__init__()
        if caption_mode not in ("each", "paragraph"):
            raise ValueError(f"caption_mode must be 'each' or 'paragraph', got {caption_mode!r}")
        if train_captions is not None and train_captions not in TRAIN_CAPTIONS_ALIAS:
            raise ValueError(f"train_captions (deprecated: use train_stream) must be 'random' or 'all', got {train_captions!r}")
        if train_stream is None:
            train_stream = TRAIN_CAPTIONS_ALIAS[train_captions or "random"]  # type: ignore[assignment]
        if train_stream not in TRAIN_STREAMS:
            raise ValueError(f"train_stream must be one of {', '.join(TRAIN_STREAMS)}, got {train_stream!r}")
        augment = augment or "none"  # type: ignore[assignment]
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
        if num_frames < 1 or image_size < 1 or batch_size < 1 or eval_batch_size < 1:
            raise ValueError("num_frames, image_size, batch_size and eval_batch_size must be positive")
        last_batch = last_batch or "drop"  # type: ignore[assignment]
        if last_batch not in LAST_BATCH:
            raise ValueError(f"last_batch must be one of {', '.join(LAST_BATCH)}, got {last_batch!r}")
        if prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be positive, got {prefetch_factor}")
        if (shuffle_buffer, shuffle_buffer_mb) != (1000, 1024.0):
            warnings.warn("shuffle_buffer and shuffle_buffer_mb are deprecated and ignored: the training order is one "
                          "global permutation read by offset, with no pool of undecoded videos", stacklevel=2)  # fmt: skip
        self.save_hyperparameters()
        self.hparams.update(train_stream=train_stream, augment=augment, last_batch=last_batch)
        self.train_stream: str = train_stream
        self.augment: str = augment
        self.last_batch: str = last_batch
        self.root = root
        self.dataset = dataset
        self.num_frames = num_frames
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.caption_mode = caption_mode
        self.train_captions = {v: k for k, v in TRAIN_CAPTIONS_ALIAS.items()}[train_stream]  # the deprecated spelling
        self.train_split = train_split
        self.val_split = val_split
        self.test_split = test_split
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_buffer_mb = shuffle_buffer_mb
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.cache_dir = cache_dir
        self.prefetch_factor = prefetch_factor
        self._splits: dict[str, SplitShards] = {}
        self._offsets: dict[str, SplitOffsets] = {}
        self._train_loader: StreamLoader | None = None
        self._train_resume: dict[str, int] | None = None

    # ----------------------------------------------------------------- splits
    def split_shards(self, split: str) -> SplitShards:
        """The shard list and totals of a split (index.json, cached)."""
        if split not in self._splits:
            shards = load_split(self.root, split, self.dataset)  # a path, URL or pipe: command
            self._check_prepared_frames(shards)
            self._splits[split] = shards
        return self._splits[split]

    def _check_prepared_frames(self, shards: SplitShards) -> None:
        """Refuse to ask more frames per video than the split was prepared with (index.json ``num_frames``)."""
        prepared = shards.index.get("num_frames")
        if not isinstance(prepared, int) or self.num_frames <= prepared:
            return
        sampling = getattr(self, "sampling", None) or shards.index.get("sampling")
        command = getattr(self, "prepare_command", None)
        if callable(command):
            fix = command(sampling, self.num_frames)
        else:
            fix = f"tvr-bench prepare {self.dataset} --videos ... --annotations ... --frames {self.num_frames}"
            fix += f" --sampling {sampling}" if sampling else ""
            fix += " --out <new root>"
        raise ValueError(
            f"{shards.directory} was prepared with {prepared} frames per video but num_frames={self.num_frames} is "
            f"asked: frames would be padded, not sampled. Ask num_frames <= {prepared}, or prepare the shards with "
            f"`{fix}` (data_cards/{self.dataset}.md)"
        )

    def eval_size(self, split: str) -> tuple[int, int]:
        """(videos, captions) an evaluation pass over ``split`` yields in total across ranks."""
        shards = self.split_shards(split)
        captions = shards.num_samples if self.caption_mode == "paragraph" else shards.num_captions
        return shards.num_samples, captions

    def setup(self, stage: str | None = None) -> None:
        """Check that the splits this stage needs are prepared (clear error otherwise)."""
        needed = {
            "fit": [self.train_split, self.val_split],
            "validate": [self.val_split],
            "test": [self.test_split],
            "predict": [self.test_split],
        }.get(stage or "", [self.train_split, self.val_split, self.test_split])
        for split in needed:
            if split:
                self.split_shards(split)

    # ---------------------------------------------------------- distribution
    def _dist(self) -> tuple[int, int]:
        """(global rank, world size) from the attached trainer, else single process."""
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _epoch(self) -> int | None:
        """The trainer's current epoch (None without a trainer)."""
        return None if self.trainer is None else int(self.trainer.current_epoch)

    def train_batches_per_epoch(self) -> int:
        """Global batches (= batches every rank yields) per training epoch: pairs (or videos) over the global batch
        ``batch_size x world_size``, plus the incomplete last one with ``last_batch: keep``."""
        shards = self.split_shards(self.train_split)
        expand = self.train_stream == "pairs" and self.caption_mode == "each"
        units = shards.num_captions if expand else shards.num_samples
        _, world = self._dist()
        batches = rank_batches(batch_sizes(units, self.batch_size * world, self.last_batch), world)
        if batches == 0:
            what = "pairs" if expand else "videos"
            raise ValueError(f"the {self.train_split!r} split of {self.root} has {units} {what}, fewer than one global batch "
                             f"of {self.batch_size} x {world} process(es): lower batch_size")  # fmt: skip
        return batches

    def split_offsets(self, split: str) -> SplitOffsets:
        """Byte offsets of every sample of ``split`` (``offsets.json``; built on first use for shards prepared before
        it existed). A remote root's split is first copied into ``cache_dir`` (sha256 checked)."""
        if split not in self._offsets:
            shards = self.split_shards(split)
            if is_remote(self.root):
                cache = Path(self.cache_dir) if self.cache_dir else default_cache_dir()
                local = cache_remote_split(shards.urls, shards.index, split, str(self.root), cache)
                self._offsets[split] = load_offsets(local, shards.index)
            else:
                self._offsets[split] = load_offsets(Path(str(shards.directory)), shards.index)
        return self._offsets[split]

    # ----------------------------------------------------------- dataloaders
    def train_dataloader(self) -> StreamLoader:
        """This rank's share of every global batch of the epoch's order, :meth:`train_batches_per_epoch` per epoch."""
        rank, world = self._dist()
        num_batches = self.train_batches_per_epoch()
        state = StreamState()
        plan = SlotPlan(rank=rank, world_size=world, seed=self.seed, state=state)
        source = TrainOrderSource(
            SampleReader(self.split_offsets(self.train_split)),
            plan,
            batch_size=self.batch_size,
            num_frames=self.num_frames,
            image_size=self.image_size,
            caption_mode=self.caption_mode,
            train_stream=self.train_stream,
            augment=self.augment,
            last_batch=self.last_batch,
        )
        assert source.num_batches == num_batches, (source.num_batches, num_batches)
        loader = make_loader(
            source,
            num_workers=self.num_workers,
            num_batches=num_batches,
            state=state,
            epoch_fn=self._epoch,
            epoch_seeded=True,
            pin_memory=self.pin_memory,
            warn_short=rank == 0,
            global_batch=source.global_batch,
            on_pass=source.order,
            prefetch_factor=self.prefetch_factor,
        )
        if self._train_resume is not None:
            loader.load_state_dict(self._train_resume)
            self._train_resume = None
        self._train_loader = loader
        return loader

    # -------------------------------------------------------------- transport
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 frames -> CLIP-normalised float32 on the device (padded frames zero): see ``normalize_batch``."""
        return normalize_batch(batch) if isinstance(batch, dict) else batch

    # ----------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """Position of the training stream (epoch, batches handed out), stored in Lightning checkpoints."""
        return {} if self._train_loader is None else {"train_stream": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume mid-epoch: the next training pass skips the batches its epoch already trained on.

        Lightning restores the datamodule before it asks for the training loader, so the position is
        handed to the loader made next (or to the current one)."""
        resume = state_dict.get("train_stream")
        if not resume:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(resume)
        else:
            self._train_resume = dict(resume)

    def eval_dataloader(self, split: str) -> StreamLoader:
        """Every video of ``split`` once (this rank's share), with all captions, deterministic order."""
        rank, world = self._dist()
        state = StreamState()
        shards = self.split_shards(split)
        if shards.num_samples < world:
            # A rank with no batch skips Lightning's evaluation hooks and the others would wait for it forever.
            raise ValueError(
                f"the {split!r} split has {shards.num_samples} videos, fewer than the {world} DDP processes: "
                f"evaluate on fewer devices"
            )
        plan = SlotPlan(rank=rank, world_size=world, seed=self.seed, state=state)
        pipeline = eval_pipeline(
            shards,
            plan,
            num_frames=self.num_frames,
            image_size=self.image_size,
            batch_size=self.eval_batch_size,
            caption_mode=self.caption_mode,
        )
        batches = eval_batches_on_rank(shards.num_samples, rank, world, self.num_workers, self.eval_batch_size)
        # Evaluation streams do not depend on the epoch, so their workers may outlive a pass (the training
        # stream's workers restart each epoch: they derive their shuffles from it).
        return make_loader(
            pipeline, num_workers=self.num_workers, num_batches=batches, state=state, pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers, warn_short=rank == 0, prefetch_factor=self.prefetch_factor,
        )  # fmt: skip

    def query_bank(self, limit: int = 0, seed: int = 0) -> dict[str, list[str]]:
        """Training captions for a query bank (QB-Norm, SK-norm): ``{"captions": [...]}``, every caption of the
        train split (joined into one paragraph per video with ``caption_mode: paragraph``), or ``limit`` of them
        drawn without replacement with ``seed`` (kept in shard order)."""
        import random

        import webdataset as wds

        from tvr_bench.data.shards import parse_sample

        captions: list[str] = []
        for url in self.split_shards(self.train_split).urls:
            dataset = wds.WebDataset(str(url), shardshuffle=False, nodesplitter=None, workersplitter=None,
                                     empty_check=False)
            for sample in dataset:
                found = list(parse_sample(sample)[0]["captions"])
                captions += [" ".join(found)] if self.caption_mode == "paragraph" else found
        if not captions:
            raise ValueError(f"the {self.train_split!r} split has no captions for a query bank")
        if 0 < limit < len(captions):
            keep = sorted(random.Random(seed).sample(range(len(captions)), limit))
            captions = [captions[i] for i in keep]
        return {"captions": captions}

    def val_dataloader(self) -> Any:
        """Validation loader over ``val_split`` (an empty list when it is None)."""
        return [] if not self.val_split else self.eval_dataloader(self.val_split)

    def test_dataloader(self) -> StreamLoader:
        """Test loader over ``test_split``."""
        return self.eval_dataloader(self.test_split)

    def predict_dataloader(self) -> StreamLoader:
        """Same batches as the test loader."""
        return self.eval_dataloader(self.test_split)
