"""RetrievalDataModule: streams prepared WebDataset shards into the batches of docs/INTERFACES.md."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L

from tvr_bench.data.streams import (
    TRAIN_STREAMS,
    SlotPlan,
    SplitShards,
    StreamLoader,
    StreamState,
    eval_batches_on_rank,
    eval_pipeline,
    load_split,
    make_loader,
    train_pipeline,
)
from tvr_bench.data.transforms import AUGMENTS, normalize_batch

#: The deprecated ``train_captions`` values and the ``train_stream`` each stands for.
TRAIN_CAPTIONS_ALIAS: dict[str, str] = {"random": "videos", "all": "pairs"}


class RetrievalDataModule(L.LightningDataModule):
    """Text-video retrieval data from ``{root}/{split}/shard-*.tar`` (see data_cards/FORMAT.md); ``root`` may
    also be an ``http(s)://`` / ``gs://`` URL prefix or a ``pipe:`` command with ``{}`` for the relative path
    (object storage, streamed by WebDataset; see docs/scaling.md).

    Training yields shuffled (frames, one caption) batches of distinct videos, the same number on every
    rank: ``train_stream: pairs`` uses every (video, caption) pair once per epoch (epoch = pairs / batch;
    CLIP4Clip / DRL / X-Pool / T-MASS code), ``videos`` every video once with one random caption per visit
    (epoch = videos / batch). ``augment: clip_train`` adds X-Pool's random resized crop + flip (the same
    for every frame of a clip); eval always centre-crops. val/test yield every video once with all its
    captions, exactly once across ranks and workers.

    Frames leave the loaders as uint8 ``[B, F, 3, S, S]``; :meth:`on_after_batch_transfer` normalises them
    on the device (CLIP mean/std, padded frames zero); code iterating the loaders without a Trainer calls
    :func:`tvr_bench.data.transforms.normalize_batch`.

    ``train_captions`` is the deprecated name of ``train_stream`` (``random`` = ``videos``, ``all`` =
    ``pairs``), read only when ``train_stream`` is unset; both unset: ``videos``. ``shuffle_buffer`` is
    the number of undecoded videos each worker's pool holds, ``shuffle_buffer_mb`` the JPEG bytes the
    pools of one rank may hold together (split over its workers; always room for one batch).
    ``persistent_workers`` keeps the val/test workers alive between evaluations (the training stream's
    workers restart each epoch, as its shuffles derive from the epoch).
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
        train_split: str = "train",
        val_split: str | None = "val",
        test_split: str = "test",
        seed: int = 0,
        shuffle_buffer: int = 1000,
        shuffle_buffer_mb: float = 1024.0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
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
        if shuffle_buffer < 1 or shuffle_buffer_mb <= 0:
            raise ValueError(f"shuffle_buffer and shuffle_buffer_mb must be positive, got {shuffle_buffer}, {shuffle_buffer_mb}")
        self.save_hyperparameters()
        self.hparams.update(train_stream=train_stream, augment=augment)
        self.train_stream: str = train_stream
        self.augment: str = augment
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
        self._splits: dict[str, SplitShards] = {}
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
        """Batches every rank yields per training epoch: pairs / (world_size * batch_size), at least 1."""
        shards = self.split_shards(self.train_split)
        expand = self.train_stream == "pairs" and self.caption_mode == "each"
        pairs = shards.num_captions if expand else shards.num_samples
        _, world = self._dist()
        return max(1, pairs // (world * self.batch_size))

    def pool_bytes_per_worker(self) -> int:
        """JPEG bytes one worker's training pool may hold: ``shuffle_buffer_mb`` of the rank over its workers."""
        return int(self.shuffle_buffer_mb * 2**20 / max(1, self.num_workers))

    # ----------------------------------------------------------- dataloaders
    def train_dataloader(self) -> StreamLoader:
        """Endless shuffled stream cut to :meth:`train_batches_per_epoch` batches per epoch."""
        rank, world = self._dist()
        state = StreamState()
        plan = SlotPlan(rank=rank, world_size=world, seed=self.seed, state=state)
        pipeline = train_pipeline(
            self.split_shards(self.train_split),
            plan,
            num_frames=self.num_frames,
            image_size=self.image_size,
            batch_size=self.batch_size,
            caption_mode=self.caption_mode,
            train_stream=self.train_stream,
            augment=self.augment,
            pool_videos=self.shuffle_buffer,
            pool_bytes=self.pool_bytes_per_worker(),
        )
        loader = make_loader(
            pipeline,
            num_workers=self.num_workers,
            num_batches=self.train_batches_per_epoch(),
            state=state,
            epoch_fn=self._epoch,
            endless=True,
            pin_memory=self.pin_memory,
            warn_short=rank == 0,
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
            persistent_workers=self.persistent_workers, warn_short=rank == 0,
        )  # fmt: skip

    def val_dataloader(self) -> Any:
        """Validation loader over ``val_split`` (an empty list when it is None)."""
        return [] if not self.val_split else self.eval_dataloader(self.val_split)

    def test_dataloader(self) -> StreamLoader:
        """Test loader over ``test_split``."""
        return self.eval_dataloader(self.test_split)

    def predict_dataloader(self) -> StreamLoader:
        """Same batches as the test loader."""
        return self.eval_dataloader(self.test_split)
