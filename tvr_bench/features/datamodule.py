"""FeaturesDataModule: train and evaluate a method's head on cached frozen CLIP features (docs/features.md).

Batches have the keys of the frame loaders (docs/INTERFACES.md) with ``frames`` holding the per-frame
CLIP embeddings ``[B, F, D]`` instead of pixels and ``text_features`` holding the backbone's text
outputs (``embeds`` [N, D], ``tokens`` [N, L, D] when stored, ``token_mask`` [N, L]).
`RetrievalModule` hands both to the unchanged method code through `CLIPBackbone`'s precomputed-input
hook, so every method computes exactly what it computes on frames with ``freeze: all``.

The split is held in memory (sorted by key). Training draws a fresh seeded permutation per epoch of the
videos (``train_stream: videos``: one random caption each) or of every (video, caption) pair
(``pairs``, cut into batches of distinct videos as the frame loaders do); rank r of W takes the r-th of
every W consecutive batch slices, so every rank yields the same number of batches. Evaluation yields
every video once with all its captions, contiguous blocks per rank. The training position is stored in checkpoints as for the frame loaders (exact mid-epoch resume).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import torch

from tvr_bench.data.datamodule import RetrievalDataModule
from tvr_bench.data.shards import ShardError
from tvr_bench.data.streams import SplitShards, block_range, load_split
from tvr_bench.features.store import (
    FeatureStoreError,
    SplitFeatures,
    backbone_fingerprint,
    load_split_features,
    pad_tokens,
    read_store,
)

TRAIN_STREAMS = ("videos", "pairs")


def _batch(split: SplitFeatures, videos: np.ndarray, rows: np.ndarray, text_length: int) -> dict[str, Any]:
    """Tensors of the given videos and caption rows (``rows[i]`` is a caption of ``videos[j]`` as the caller pairs them)."""
    text: dict[str, torch.Tensor] = {"embeds": torch.from_numpy(split.text[rows])}
    if split.tokens is not None:
        tokens, mask = pad_tokens(split, rows.tolist(), text_length)
        text["tokens"], text["token_mask"] = torch.from_numpy(tokens), torch.from_numpy(mask)
    return {
        "frames": torch.from_numpy(split.frames[videos]),
        "frame_mask": torch.from_numpy(split.frame_mask[videos]),
        "video_key": [split.keys[v] for v in videos.tolist()],
        "text_features": text,
    }


def distinct_video_batches(
    order: np.ndarray, owner: np.ndarray, size: int, need: int, rng: np.random.Generator
) -> np.ndarray:
    """``need`` items of ``order`` (caption rows) cut into batches of ``size`` with no video twice in a batch.

    Items go in permutation order; one whose video is already in the open batch waits and is placed first in
    a later batch. Once the permutation is used up, batches are completed from a fresh permutation (a few
    items of an epoch may then repeat or wait for the next one). Without enough videos for one batch,
    the permutation is simply cut (repeats cannot be avoided)."""
    n_videos = int(owner.max()) + 1 if len(owner) else 0
    if n_videos < size:
        return np.resize(order, need)
    out: list[int] = []
    waiting: list[int] = []
    batch: list[int] = []
    seen: set[int] = set()
    source = iter(order.tolist())
    while len(out) < need:
        placed = False
        for i, item in enumerate(waiting):
            if int(owner[item]) not in seen:
                batch.append(waiting.pop(i))
                seen.add(int(owner[item]))
                placed = True
                break
        if not placed:
            item = next(source, None)
            if item is None:
                source = iter(rng.permutation(len(owner)).tolist())
                continue
            if int(owner[item]) in seen:
                waiting.append(item)
                continue
            batch.append(item)
            seen.add(int(owner[item]))
        if len(batch) == size:
            out.extend(batch)
            batch, seen = [], set()
    return np.asarray(out[:need], dtype=np.int64)


def caption_owner(split: SplitFeatures) -> np.ndarray:
    """Video index of every caption row."""
    return np.repeat(np.arange(split.num_videos), np.diff(split.caption_offsets))


class FeatureTrainLoader:
    """Sized, stateful iterable of training batches over one split held in memory."""

    def __init__(
        self,
        split: SplitFeatures,
        *,
        batch_size: int,
        stream: str,
        seed: int,
        rank: int,
        world_size: int,
        text_length: int,
        epoch_fn: Callable[[], int | None] | None = None,
    ) -> None:
        self.split, self.batch_size, self.stream, self.seed = split, batch_size, stream, seed
        self.rank, self.world_size, self.text_length, self.epoch_fn = rank, world_size, text_length, epoch_fn
        units = split.num_captions if stream == "pairs" else split.num_videos
        self.units = units
        self.num_batches = max(1, units // (world_size * batch_size))
        self._owner = caption_owner(split)
        self._passes = 0
        self._epoch = 0
        self._consumed = 0
        self._resume: dict[str, int] | None = None

    def __len__(self) -> int:
        return self.num_batches

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(video, caption row) of every training item of an epoch, in global order (seeded by seed and epoch);
        every global batch (``world_size * batch_size`` consecutive items) holds distinct videos when the
        split has that many."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.units)
        need = self.num_batches * self.world_size * self.batch_size
        if self.stream == "pairs":
            rows = distinct_video_batches(order, self._owner, self.world_size * self.batch_size, need, rng)
            return self._owner[rows], rows
        if need > len(order):  # fewer videos than one global batch: wrap around
            order = np.resize(order, need)
        counts = np.diff(self.split.caption_offsets)
        picks = (rng.random(self.units) * counts).astype(np.int64)
        rows = self.split.caption_offsets[:-1] + np.minimum(picks, counts - 1)
        return order, rows[order]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._passes += 1
        epoch = self.epoch_fn() if self.epoch_fn is not None else None
        self._epoch = self._passes - 1 if epoch is None else int(epoch)
        skip = 0
        resume, self._resume = self._resume, None
        if resume and resume.get("epoch") == self._epoch:
            done = int(resume.get("batches", 0))
            if resume.get("num_batches") == self.num_batches:
                skip = done if 0 < done < self.num_batches else 0
            else:
                warnings.warn(
                    f"cannot restore the data position of epoch {self._epoch}: the checkpoint's loader had "
                    f"{resume.get('num_batches')} batches per epoch, this one {self.num_batches}; the epoch starts over",
                    stacklevel=2,
                )
        videos, rows = self.epoch_order(self._epoch)
        self._consumed = skip
        bs, world = self.batch_size, self.world_size
        for b in range(skip, self.num_batches):
            lo = (b * world + self.rank) * bs
            vids, caps = videos[lo : lo + bs], rows[lo : lo + bs]
            batch = _batch(self.split, vids, caps, self.text_length)
            offsets = self.split.caption_offsets
            batch["captions"] = [self.split.captions[v][r - offsets[v]] for v, r in zip(vids.tolist(), caps.tolist())]
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Epoch, batches handed out in it, batches per epoch (stored in Lightning checkpoints)."""
        return {"epoch": int(self._epoch), "batches": int(self._consumed), "num_batches": int(self.num_batches)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The next pass, when it is the same epoch, continues after the batches already trained on."""
        self._resume = {k: int(v) for k, v in state_dict.items() if k in ("epoch", "batches", "num_batches")}


class FeatureEvalLoader:
    """Sized iterable of evaluation batches: this rank's contiguous block of videos, with all captions."""

    def __init__(self, split: SplitFeatures, *, batch_size: int, rank: int, world_size: int, text_length: int) -> None:
        self.split, self.batch_size, self.text_length = split, batch_size, text_length
        self.lo, self.hi = block_range(split.num_videos, rank, world_size)

    def __len__(self) -> int:
        return math.ceil((self.hi - self.lo) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        offsets = self.split.caption_offsets
        for start in range(self.lo, self.hi, self.batch_size):
            videos = np.arange(start, min(start + self.batch_size, self.hi))
            rows = np.arange(offsets[videos[0]], offsets[videos[-1] + 1])
            batch = _batch(self.split, videos, rows, self.text_length)
            captions, caption_video, caption_key = [], [], []
            for i, v in enumerate(videos.tolist()):
                for j, caption in enumerate(self.split.captions[v]):
                    captions.append(caption)
                    caption_video.append(i)
                    caption_key.append(f"{self.split.keys[v]}#{j}")
            batch.update(captions=captions, caption_video=torch.tensor(caption_video, dtype=torch.long), caption_key=caption_key)
            yield batch


def check_model(model: Any, store: dict[str, Any], features_dir: str, training: bool) -> None:
    """Refuse a model that cannot use these features: other CLIP weights or words, an unfrozen backbone
    in training, or a method whose training needs pixels (it overrides ``training_features``)."""
    from tvr_bench.methods.base import RetrievalModule

    if not isinstance(model, RetrievalModule):
        return
    hp = model.hparams
    where = f"features {features_dir} (backbone {store['backbone']!r}, max_words {store['max_words']})"
    if training and hp.get("freeze") != "all":
        raise FeatureStoreError(
            f"{where}: cached features need a frozen backbone: set model.init_args.freeze: all (got {hp.get('freeze')!r})"
        )
    if training and type(model).training_features is not RetrievalModule.training_features:
        raise FeatureStoreError(
            f"{where}: {type(model).__name__} builds its training views from pixels and cannot train on cached "
            "features (evaluation works)"
        )
    length = min(int(hp.get("max_words")), int(model.backbone.clip.config.text_config.max_position_embeddings))
    if length != int(store["text_length"]):
        raise FeatureStoreError(
            f"{where}: the model tokenizes to {length} tokens (max_words={hp.get('max_words')}) but the features were "
            f"computed with {store['text_length']}: extract again with --max-words {hp.get('max_words')}"
        )
    if int(model.backbone.embed_dim) != int(store["embed_dim"]):
        raise FeatureStoreError(f"{where}: embedding width {store['embed_dim']} but the model's backbone has {model.backbone.embed_dim}")
    if backbone_fingerprint(model.backbone.clip) != store["backbone_fingerprint"]:
        raise FeatureStoreError(
            f"{where}: the model's CLIP weights ({hp.get('backbone')!r}) are not the ones the features were computed "
            "with (a different checkpoint, preset seed, or a fine-tuned backbone); extract the features again with "
            "this backbone and --seed"
        )


class FeaturesDataModule(RetrievalDataModule):
    """Cached frozen CLIP features from ``features_dir`` (written by ``tvr-bench features``) instead of frames.

    Dataset, frames, sampling and caption mode come from the store; the optional ``sampling``,
    ``num_frames`` and ``caption_mode`` are checked against it (a method's protocol filled in by the CLI
    must match what was extracted). Augmentation is off under this protocol (features come from
    centre-cropped frames).
    """

    def __init__(
        self,
        features_dir: str,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        train_stream: Literal["videos", "pairs"] | None = None,
        train_split: str = "train",
        val_split: str | None = "val",
        test_split: str = "test",
        seed: int = 0,
        sampling: str | None = None,
        num_frames: int | None = None,
        caption_mode: str | None = None,
    ) -> None:
        """Read ``{features_dir}/features.json`` and check the optional protocol settings against it."""
        store = read_store(features_dir)
        if sampling is not None and not _dataset_has_sampling(str(store.get("dataset"))):
            sampling = None  # as the dataset's own DataModule (e.g. synthetic): one sampling, no choice to check
        for name, value in (("sampling", sampling), ("num_frames", num_frames), ("caption_mode", caption_mode)):
            if value is not None and value != store.get(name):
                raise FeatureStoreError(
                    f"{features_dir}: features were extracted with {name}={store.get(name)!r} but this run asks for "
                    f"{value!r}: extract them from frames prepared with that setting (docs/features.md)"
                )
        if train_stream is not None and train_stream not in TRAIN_STREAMS:
            raise ValueError(f"train_stream must be one of {TRAIN_STREAMS}, got {train_stream!r}")
        super().__init__(
            root=str(features_dir),
            dataset=str(store["dataset"]),
            num_frames=int(store["num_frames"]),
            image_size=int(store["image_size"]),
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=0,
            caption_mode=store.get("caption_mode", "each"),
            train_split=train_split,
            val_split=val_split,
            test_split=test_split,
            seed=seed,
        )
        self.features_dir = str(features_dir)
        self.store = store
        self.train_stream = train_stream or "videos"
        self.sampling = store.get("sampling")
        self.backbone = store.get("backbone")
        self._features: dict[str, SplitFeatures] = {}
        self._features_train_loader: FeatureTrainLoader | None = None
        self._features_resume: dict[str, int] | None = None

    # ----------------------------------------------------------------- data
    def split_shards(self, split: str) -> SplitShards:
        """The frame shards the features were computed from when they are still there with the same counts
        (so the qualitative page can show frames), else the feature shards; sizes are the same."""
        if split not in self._splits:
            features = load_split(self.features_dir, split, self.dataset)
            source = self.store.get("source_root")
            try:
                frames = load_split(source, split, self.dataset) if source else None
            except (OSError, ValueError, ShardError):
                frames = None
            same = frames is not None and (frames.num_samples, frames.num_captions) == (features.num_samples, features.num_captions)
            self._splits[split] = frames if same else features
        return self._splits[split]

    def split_features(self, split: str) -> SplitFeatures:
        """The split's features in memory (loaded once)."""
        if split not in self._features:
            if split not in self.store.get("splits", {}):
                raise FeatureStoreError(
                    f"{self.features_dir} has no {split!r} split (it has {sorted(self.store.get('splits', {}))}); "
                    f"extract it with `tvr-bench features {self.dataset} --splits {split}`"
                )
            self._features[split] = load_split_features(self.features_dir, split, self.store)
        return self._features[split]

    def protocol_size(self, split: str) -> int | None:
        """Videos the official protocol has in ``split``, from the dataset's own DataModule class when it defines one."""
        from tvr_bench.data.benchmarks.catalog import datamodules

        cls = datamodules().get(self.dataset)
        method = getattr(cls, "protocol_size", None) if cls is not None else None
        return None if method is None else method(split)  # a classmethod of BenchmarkDataModule

    def train_batches_per_epoch(self) -> int:
        """Batches every rank yields per epoch: videos (or pairs) / (world_size * batch_size), at least 1."""
        shards = self.split_shards(self.train_split)
        units = shards.num_captions if self.train_stream == "pairs" else shards.num_samples
        _, world = self._dist()
        return max(1, units // (world * self.batch_size))

    def _text_length(self) -> int:
        return int(self.store["text_length"])

    def _check_attached_model(self, training: bool) -> None:
        trainer = self.trainer
        model = getattr(trainer, "lightning_module", None) if trainer is not None else None
        if model is not None:
            check_model(model, self.store, self.features_dir, training)

    def train_dataloader(self) -> FeatureTrainLoader:
        """Seeded per-epoch permutation of videos (or pairs), this rank's share, fixed batches per epoch."""
        self._check_attached_model(training=True)
        rank, world = self._dist()
        loader = FeatureTrainLoader(
            self.split_features(self.train_split),
            batch_size=self.batch_size,
            stream=self.train_stream,
            seed=self.seed,
            rank=rank,
            world_size=world,
            text_length=self._text_length(),
            epoch_fn=self._epoch,
        )
        if self._features_resume is not None:
            loader.load_state_dict(self._features_resume)
            self._features_resume = None
        self._features_train_loader = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        """Position of the training stream (epoch, batches handed out), stored in Lightning checkpoints."""
        loader = self._features_train_loader
        return {} if loader is None else {"train_stream": loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume mid-epoch: the next training pass skips the batches its epoch already trained on."""
        resume = state_dict.get("train_stream")
        if not resume:
            return
        if self._features_train_loader is not None:
            self._features_train_loader.load_state_dict(resume)
        else:
            self._features_resume = dict(resume)

    def eval_dataloader(self, split: str) -> FeatureEvalLoader:  # type: ignore[override]
        """Every video of ``split`` once (this rank's contiguous block), with all its captions."""
        self._check_attached_model(training=False)
        rank, world = self._dist()
        features = self.split_features(split)
        if features.num_videos < world:
            raise ValueError(f"the {split!r} split has {features.num_videos} videos, fewer than the {world} DDP processes")
        return FeatureEvalLoader(
            features, batch_size=self.eval_batch_size, rank=rank, world_size=world, text_length=self._text_length()
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Features are already model inputs: no pixel normalisation or augmentation."""
        return batch


def _dataset_has_sampling(dataset: str) -> bool:
    """Whether the dataset's own DataModule lets a run choose the frame sampling (the real benchmarks do)."""
    from tvr_bench.data.benchmarks.catalog import datamodules

    return dataset in datamodules()


def default_features_dir(dataset: str, backbone: str, num_frames: int, sampling: str | None, max_words: int) -> Path:
    """``data/features/<dataset>-<backbone>-f<frames>-<sampling>-w<words>``: one store per setting."""
    slug = backbone.strip("/").replace("/", "_").replace(" ", "_")
    return Path("data/features") / f"{dataset}-{slug}-f{num_frames}-{sampling}-w{max_words}"
