"""RetrievalDataModule: streams prepared WebDataset shards into the batches of docs/INTERFACES.md."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L

from tvr_bench.data.streams import (
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


class RetrievalDataModule(L.LightningDataModule):
    """Text-video retrieval data from ``{root}/{split}/shard-*.tar`` (see data_cards/FORMAT.md); ``root`` may
    also be an ``http(s)://`` / ``gs://`` URL prefix or a ``pipe:`` command with ``{}`` for the relative path
    (object storage, streamed by WebDataset; see docs/scaling.md).

    Training yields shuffled (frames, one caption) batches, the same number on every rank; val/test
    yield every video once with all its captions, exactly once across ranks and workers.
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
        train_captions: Literal["random", "all"] = "random",
        train_split: str = "train",
        val_split: str | None = "val",
        test_split: str = "test",
        seed: int = 0,
        shuffle_buffer: int = 1000,
        pin_memory: bool = False,
    ) -> None:
        """Configure the streams; nothing is read until setup or a dataloader is asked for."""
        super().__init__()
        if caption_mode not in ("each", "paragraph"):
            raise ValueError(f"caption_mode must be 'each' or 'paragraph', got {caption_mode!r}")
        if train_captions not in ("random", "all"):
            raise ValueError(f"train_captions must be 'random' or 'all', got {train_captions!r}")
        if num_frames < 1 or image_size < 1 or batch_size < 1 or eval_batch_size < 1:
            raise ValueError("num_frames, image_size, batch_size and eval_batch_size must be positive")
        self.save_hyperparameters()
        self.root = root
        self.dataset = dataset
        self.num_frames = num_frames
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.caption_mode = caption_mode
        self.train_captions = train_captions
        self.train_split = train_split
        self.val_split = val_split
        self.test_split = test_split
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.pin_memory = pin_memory
        self._splits: dict[str, SplitShards] = {}
        self._train_loader: StreamLoader | None = None
        self._train_resume: dict[str, int] | None = None

    # ----------------------------------------------------------------- splits
    def split_shards(self, split: str) -> SplitShards:
        """The shard list and totals of a split (index.json, cached)."""
        if split not in self._splits:
            self._splits[split] = load_split(self.root, split, self.dataset)  # a path, URL or pipe: command
        return self._splits[split]

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
        expand = self.train_captions == "all" and self.caption_mode == "each"
        pairs = shards.num_captions if expand else shards.num_samples
        _, world = self._dist()
        return max(1, pairs // (world * self.batch_size))

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
            expand_captions=self.train_captions == "all",
            shuffle_buffer=self.shuffle_buffer,
        )
        loader = make_loader(
            pipeline,
            num_workers=self.num_workers,
            num_batches=self.train_batches_per_epoch(),
            state=state,
            epoch_fn=self._epoch,
            endless=True,
            pin_memory=self.pin_memory,
        )
        if self._train_resume is not None:
            loader.load_state_dict(self._train_resume)
            self._train_resume = None
        self._train_loader = loader
        return loader

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
        return make_loader(pipeline, num_workers=self.num_workers, num_batches=batches, state=state, pin_memory=self.pin_memory)

    def val_dataloader(self) -> Any:
        """Validation loader over ``val_split`` (an empty list when it is None)."""
        return [] if not self.val_split else self.eval_dataloader(self.val_split)

    def test_dataloader(self) -> StreamLoader:
        """Test loader over ``test_split``."""
        return self.eval_dataloader(self.test_split)

    def predict_dataloader(self) -> StreamLoader:
        """Same batches as the test loader."""
        return self.eval_dataloader(self.test_split)
