"""Training and evaluation batches over prepared shards: the training order, exact evaluation splits, collation.

Training (:class:`TrainOrderSource`): every epoch follows one global order (:mod:`tvr_bench.data.order`): a
uniform random permutation of the (video, caption) pairs seeded by (seed, epoch), arranged into global batches
of distinct videos. Every rank takes its contiguous share of each global batch and every DataLoader worker
the batches the DataLoader asks it for in turn, reading each sample by its byte offset
(:mod:`tvr_bench.data.offsets`); so W processes with any number of workers train on exactly the batches one
process with the same global batch sees. Augmentation seeds and the caption of a ``videos`` visit are drawn
per position of the order, not per worker or rank.

Frames travel as uint8 (``[B, F, 3, S, S]``), decoded straight into one batch buffer; the DataModule
normalises them on the device (``on_after_batch_transfer``, :func:`tvr_bench.data.transforms.normalize_batch`).

Resume: the training loader is stateful (Lightning stores its ``state_dict`` in checkpoints): a run resumed
mid-epoch starts at the first global batch it had not trained on (no batch is read or decoded to get
there), on any number of ranks with the same global batch.

Evaluation: the samples of a split, in shard order, are cut into ``world_size * num_workers``
contiguous blocks (sizes differ by at most one); a slot opens only the shards overlapping its block
and drops other samples before any JPEG is decoded, so every sample is yielded exactly once across
all ranks and workers, for any number of shards.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from tvr_bench.data.frames import stored_frame_plan
from tvr_bench.data.offsets import SampleReader
from tvr_bench.data.order import EpochOrder, batch_sizes, epoch_order, rank_batches, rank_slice, worker_batches
from tvr_bench.data.shards import ShardError, parse_sample, read_index
from tvr_bench.data.transforms import decode_clip_into

#: Training streams (``train_stream``): every (video, caption) pair once per epoch, or every video once
#: with one random caption per visit.
TRAIN_STREAMS: tuple[str, ...] = ("pairs", "videos")
#: Short-clip warnings shown per process (the main process checks the masks of the batches it hands out).
SHORT_WARNINGS_SHOWN = 1
_short_warned = 0


@dataclass
class SplitShards:
    """The shards of one prepared split, from its index.json."""

    directory: Path | str  # a local folder, or the remote prefix of the split (see `remote_join`)
    urls: list[str]
    counts: list[int]
    num_samples: int
    num_captions: int
    index: dict[str, Any]

    @property
    def offsets(self) -> list[int]:
        """Global index of the first sample of each shard."""
        out, total = [], 0
        for count in self.counts:
            out.append(total)
            total += count
        return out


def is_remote(root: str | Path) -> bool:
    """True for shard roots read through WebDataset's openers: ``http(s)://``, ``gs://``, ``ais://`` ... URLs
    and ``pipe:`` commands."""
    text = str(root)
    return text.startswith("pipe:") or "://" in text


def remote_join(root: str, relative: str) -> str:
    """The URL of ``relative`` (``split/file``) under a remote root: a ``pipe:`` command gets it in place of
    ``{}`` (``pipe:aws s3 cp s3://bucket/msrvtt/{} -``), a URL gets it appended after a slash."""
    if root.startswith("pipe:"):
        if "{}" not in root:
            raise ValueError(f"a pipe: root needs a '{{}}' where the shard's relative path goes, got {root!r}")
        return root.replace("{}", relative)
    return root.rstrip("/") + "/" + relative


def load_remote_split(root: str, split: str, dataset: str) -> SplitShards:
    """Read ``{root}/{split}/index.json`` through WebDataset's ``gopen`` (curl, gsutil, a pipe ...)."""
    import json

    where = remote_join(root, f"{split}/index.json")
    try:
        with wds.gopen(where) as stream:
            index = json.loads(stream.read().decode("utf-8"))
    except Exception as exn:  # noqa: BLE001 - re-raised with the URL and the data card named
        raise FileNotFoundError(
            f"cannot read {where}: {type(exn).__name__}: {exn} (prepare the {dataset!r} dataset and upload "
            f"{{split}}/index.json with its shards; see data_cards/{dataset}.md)"
        ) from exn
    if index["num_samples"] <= 0:
        raise ValueError(f"{where} lists no samples")
    return SplitShards(
        directory=remote_join(root, split),
        urls=[remote_join(root, f"{split}/{s['file']}") for s in index["shards"]],
        counts=[int(s["num_samples"]) for s in index["shards"]],
        num_samples=int(index["num_samples"]),
        num_captions=int(index["num_captions"]),
        index=index,
    )


def load_split(root: str | Path, split: str, dataset: str) -> SplitShards:
    """Read ``{root}/{split}/index.json`` (clear error naming the directory and data card if absent); a
    remote root (URL or ``pipe:`` command, :func:`is_remote`) is read through WebDataset's openers."""
    if is_remote(root):
        return load_remote_split(str(root), split, dataset)
    directory = Path(root) / split
    index = read_index(directory, dataset)
    if index["num_samples"] <= 0:
        raise ValueError(f"{directory} holds no samples (see {Path(root) / 'manifest.json'} for failures)")
    return SplitShards(
        directory=directory,
        urls=[str(directory / s["file"]) for s in index["shards"]],
        counts=[int(s["num_samples"]) for s in index["shards"]],
        num_samples=int(index["num_samples"]),
        num_captions=int(index["num_captions"]),
        index=index,
    )


@dataclass
class StreamState:
    """Per-pass state shared by the stages of one pipeline: epoch (set by the loader) and cursor."""

    epoch: int = 0
    url: str | None = None
    last_key: str | None = None
    shard_seq: int = 0
    skip_batches: int = 0  # training: the global batch a resumed pass starts at (set by the loader)

    def open_shard(self, url: str) -> None:
        """Called by a source when it hands out a shard (the same url may come again later)."""
        self.url, self.last_key = url, None
        self.shard_seq += 1


@dataclass
class SlotPlan:
    """Where this process sits: DDP rank/world size, and the DataLoader worker (looked up lazily)."""

    rank: int = 0
    world_size: int = 1
    seed: int = 0
    state: StreamState = field(default_factory=StreamState)

    def worker(self) -> tuple[int, int]:
        """(DataLoader worker, number of workers) of this process; (0, 1) in the main process."""
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def slot(self) -> tuple[int, int]:
        """(slot, number of slots) over ranks x workers."""
        worker, workers = self.worker()
        return self.rank * workers + worker, self.world_size * workers


def block_range(total: int, slot: int, slots: int) -> tuple[int, int]:
    """Global sample range [lo, hi) of one evaluation slot (contiguous, sizes differ by <= 1)."""
    return slot * total // slots, (slot + 1) * total // slots


class EvalShardSource(IterableDataset):
    """Yields the shards overlapping this slot's block of samples."""

    def __init__(self, shards: SplitShards, plan: SlotPlan) -> None:
        super().__init__()
        self.shards, self.plan = shards, plan

    def __iter__(self) -> Iterator[dict[str, str]]:
        slot, slots = self.plan.slot()
        lo, hi = block_range(self.shards.num_samples, slot, slots)
        for url, start, count in zip(self.shards.urls, self.shards.offsets, self.shards.counts):
            if start < hi and start + count > lo:
                self.plan.state.open_shard(url)
                yield {"url": url}


def _guard(src: Iterable[dict[str, Any]], plan: SlotPlan, expected: dict[str, int]) -> Iterator[dict[str, Any]]:
    """Turn tar errors into ShardError naming the shard and last good key; check per-shard counts.

    A sample belongs to the shard the source handed out last (readers finish a shard before asking
    for the next), so ``shard_seq`` marks shard boundaries even when a url repeats.
    """
    state = plan.state
    it = iter(src)
    current, seq, count = None, None, 0
    while True:
        try:
            sample = next(it)
        except StopIteration:
            break
        except ShardError:
            raise
        except Exception as exn:  # noqa: BLE001 - re-raised with the shard named
            after = f"after sample {state.last_key!r}" if state.last_key else "before its first sample"
            raise ShardError(
                f"{state.url}: corrupt or truncated shard ({after}): {type(exn).__name__}: {exn}; "
                f"re-run `tvr-bench prepare` for this dataset"
            ) from exn
        if state.shard_seq != seq:
            _check_count(current, count, expected)
            current, seq, count = sample.get("__url__"), state.shard_seq, 0
        count += 1
        state.last_key = sample.get("__key__")
        yield sample
    _check_count(current, count, expected)


def _check_count(url: str | None, count: int, expected: dict[str, int]) -> None:
    """A fully read shard must hold as many samples as index.json says."""
    if url is not None and url in expected and count != expected[url]:
        raise ShardError(
            f"{url}: corrupt or truncated shard: read {count} samples, index.json says {expected[url]}; "
            f"re-run `tvr-bench prepare`"
        )


guard = wds.pipelinefilter(_guard)


def _select_block(src: Iterable[dict[str, Any]], shards: SplitShards, plan: SlotPlan) -> Iterator[dict[str, Any]]:
    """Keep only samples whose global index lies in this slot's block (before any decoding)."""
    slot, slots = plan.slot()
    lo, hi = block_range(shards.num_samples, slot, slots)
    offsets = dict(zip(shards.urls, shards.offsets))
    current, i = None, 0
    for sample in src:
        url = sample["__url__"]
        if url != current:
            current, i = url, 0
        index = offsets[url] + i
        i += 1
        if index >= hi:
            return
        if index >= lo:
            yield sample


select_block = wds.pipelinefilter(_select_block)


def _parse(src: Iterable[dict[str, Any]], caption_mode: str) -> Iterator[dict[str, Any]]:
    """Validate raw samples and keep key, shard, captions and the JPEG bytes."""
    for sample in src:
        yield _parsed(sample, caption_mode)


def _parsed(sample: dict[str, Any], caption_mode: str) -> dict[str, Any]:
    """One validated raw sample: key, shard, captions (joined into one in ``paragraph`` mode) and JPEG bytes."""
    meta, frames = parse_sample(sample)
    captions = list(meta["captions"])
    if caption_mode == "paragraph":
        captions = [" ".join(captions)]
    return {"key": sample["__key__"], "url": sample["__url__"], "captions": captions, "jpegs": frames}


parse = wds.pipelinefilter(_parse)


def decode_clip(jpegs: list[bytes], num_frames: int, image_size: int, key: str = "?") -> tuple[torch.Tensor, torch.Tensor]:
    """JPEG frames of one clip -> (uint8 ``[F, 3, S, S]``, bool mask ``[F]``), uniformly subsampled when more
    are stored, zero-padded (mask False, a warning naming the key) when fewer; the batches of the pipelines
    are decoded the same way, straight into their batch buffer (:func:`_decode_batches`)."""
    picked, pad = stored_frame_plan(len(jpegs), num_frames)
    if pad:
        warnings.warn(f"sample {key!r} has {len(jpegs)} stored frames, {num_frames} asked: padded with frame_mask=False", stacklevel=2)
    frames = np.zeros((num_frames, 3, image_size, image_size), dtype=np.uint8)
    decode_clip_into(frames, jpegs, picked, image_size)
    mask = torch.zeros(num_frames, dtype=torch.bool)
    mask[: len(picked)] = True
    return torch.from_numpy(frames), mask


def _decode_batches(
    src: Iterable[dict[str, Any]], batch_size: int, num_frames: int, image_size: int, train: bool, partial: bool
) -> Iterator[dict[str, Any]]:
    """Group items into batches and decode their JPEGs straight into one uint8 ``[B, F, 3, S, S]`` buffer
    (frames uniformly subsampled when more are stored, zero-padded with ``frame_mask`` False when fewer);
    errors name the shard and key."""
    group: list[dict[str, Any]] = []
    for item in src:
        group.append(item)
        if len(group) == batch_size:
            yield _decode_group(group, num_frames, image_size, train)
            group = []
    if group and partial:
        yield _decode_group(group, num_frames, image_size, train)


def _decode_group(items: list[dict[str, Any]], num_frames: int, image_size: int, train: bool) -> dict[str, Any]:
    """One batch: decode every clip into the batch buffer, then collate the text side."""
    frames_t = _batch_buffer((len(items), num_frames, 3, image_size, image_size))
    frames = frames_t.numpy()
    mask = np.zeros((len(items), num_frames), dtype=bool)
    for b, item in enumerate(items):
        picked, pad = stored_frame_plan(len(item["jpegs"]), num_frames)
        try:
            decode_clip_into(frames[b], item["jpegs"], picked, image_size, item.get("aug"))
        except Exception as exn:  # noqa: BLE001 - re-raised with the shard and key named
            raise ShardError(f"{item['url']}: sample {item['key']!r}: undecodable frame: {type(exn).__name__}: {exn}") from exn
        mask[b, : len(picked)] = True
        if pad:
            frames[b, len(picked) :] = 0
    out = {"frames": frames_t, "frame_mask": torch.from_numpy(mask)}
    return {**out, **(_train_text(items) if train else _eval_text(items))}


decode_batches = wds.pipelinefilter(_decode_batches)


def _batch_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 batch tensor; in a DataLoader worker it is allocated in shared memory, so
    handing it to the main process sends its handle instead of copying the batch into a new segment."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, shape)


def _train_text(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Training batch text side: one caption and the key per video."""
    return {"captions": [i["caption"] for i in items], "video_key": [i["key"] for i in items]}


def _eval_text(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Evaluation batch text side: every caption of every video, flattened, with its video and caption keys."""
    captions, caption_video, caption_key = [], [], []
    for v, item in enumerate(items):
        for j, caption in enumerate(item["captions"]):
            captions.append(caption)
            caption_video.append(v)
            caption_key.append(f"{item['key']}#{j}")
    return {
        "video_key": [i["key"] for i in items],
        "captions": captions,
        "caption_video": torch.tensor(caption_video, dtype=torch.long),
        "caption_key": caption_key,
    }


def short_clip_message(batch: dict[str, Any]) -> str | None:
    """The warning for a batch holding padded (short) clips, naming the first one; None when none is."""
    mask = batch.get("frame_mask")
    if not isinstance(mask, torch.Tensor) or bool(mask.all()):
        return None
    rows = (~mask.all(dim=1)).nonzero().flatten().tolist()
    first = rows[0]
    key = batch["video_key"][first] if "video_key" in batch else "?"
    return (
        f"sample {key!r} has {int(mask[first].sum())} stored frames, {mask.shape[1]} asked: padded with "
        f"frame_mask=False ({len(rows)} such clip(s) in this batch; shown once per run, later ones are not reported)"
    )


def _tar_samples() -> Any:
    """WebDataset's tar reader (errors propagate to the guard)."""
    return wds.tarfile_to_samples(handler=wds.reraise_exception)


class TrainOrderSource(IterableDataset):
    """Training batches of one rank in the epoch's global order (:func:`tvr_bench.data.order.epoch_order`).

    The order is a function of (seed, epoch, global batch, caption counts) only; rank r takes its contiguous
    share of every global batch, DataLoader worker w of n the global batches ``start + w``, ``start + w + n``,
    ... (the DataLoader asks its workers in turn, so the batches come out in order), each sample read by its
    byte offset (:class:`tvr_bench.data.offsets.SampleReader`) and decoded straight into the batch buffer.
    """

    def __init__(
        self,
        reader: SampleReader,
        plan: SlotPlan,
        *,
        batch_size: int,
        num_frames: int,
        image_size: int,
        caption_mode: str,
        train_stream: str = "pairs",
        augment: str = "none",
        last_batch: str = "drop",
    ) -> None:
        super().__init__()
        if train_stream not in TRAIN_STREAMS:
            raise ValueError(f"train_stream must be one of {', '.join(TRAIN_STREAMS)}, got {train_stream!r}")
        self.reader, self.plan = reader, plan
        self.batch_size, self.num_frames, self.image_size = batch_size, num_frames, image_size
        self.caption_mode, self.train_stream, self.last_batch = caption_mode, train_stream, last_batch
        self.augment = augment == "clip_train"
        self.global_batch = batch_size * plan.world_size
        raw = reader.offsets.captions
        self.captions = raw if caption_mode == "each" else np.ones_like(raw)
        self._order: tuple[int, EpochOrder] | None = None

    @property
    def num_batches(self) -> int:
        """Global batches per epoch (= batches every rank yields)."""
        units = int(self.captions.sum()) if self.train_stream == "pairs" else len(self.captions)
        return rank_batches(batch_sizes(units, self.global_batch, self.last_batch), self.plan.world_size)

    def order(self, epoch: int) -> EpochOrder:
        """The epoch's global order (computed once per process and epoch; forked workers inherit it)."""
        if self._order is None or self._order[0] != epoch:
            order = epoch_order(self.captions, seed=self.plan.seed, epoch=epoch, global_batch=self.global_batch,
                                stream=self.train_stream, last_batch=self.last_batch)  # fmt: skip
            self._order = (epoch, order)
        return self._order[1]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        state = self.plan.state
        order = self.order(state.epoch)
        worker, workers = self.plan.worker()
        for j in worker_batches(self.num_batches, state.skip_batches, worker, workers):
            part = rank_slice(order.batch(j), self.plan.rank, self.plan.world_size)
            items = [self._item(order, i) for i in range(part.start, part.stop)]
            yield _decode_group(items, self.num_frames, self.image_size, True)

    def _item(self, order: EpochOrder, i: int) -> dict[str, Any]:
        """Item ``i`` of the order: the sample read by offset and validated, its caption and augmentation seed."""
        video = int(order.video[i])
        sample = self.reader.raw(video)
        meta, frames = parse_sample(sample)
        captions = list(meta["captions"])
        if len(captions) != int(self.reader.offsets.captions[video]):
            raise ShardError(f"{sample['__url__']}: sample {sample['__key__']!r} holds {len(captions)} captions, its "
                             f"offsets.json entry {int(self.reader.offsets.captions[video])}: delete offsets.json to "
                             f"rebuild it, or re-run `tvr-bench prepare`")  # fmt: skip
        caption = " ".join(captions) if self.caption_mode == "paragraph" else captions[int(order.caption[i])]
        return {"key": sample["__key__"], "url": sample["__url__"], "jpegs": frames, "caption": caption,
                "aug": int(order.aug[i]) if self.augment else None}  # fmt: skip


def eval_pipeline(
    shards: SplitShards,
    plan: SlotPlan,
    *,
    num_frames: int,
    image_size: int,
    batch_size: int,
    caption_mode: str,
) -> wds.DataPipeline:
    """Finite pipeline of evaluation batches for this rank's share of the split."""
    expected = dict(zip(shards.urls, shards.counts))
    return wds.DataPipeline(
        EvalShardSource(shards, plan),
        _tar_samples(),
        guard(plan, expected),
        select_block(shards, plan),
        parse(caption_mode),
        decode_batches(batch_size, num_frames, image_size, False, True),
    )


def eval_batches_on_rank(num_samples: int, rank: int, world_size: int, num_workers: int, batch_size: int) -> int:
    """Exact number of evaluation batches one rank yields (each worker batches its own block)."""
    workers = max(1, num_workers)
    total = 0
    for worker in range(workers):
        lo, hi = block_range(num_samples, rank * workers + worker, world_size * workers)
        total += math.ceil((hi - lo) / batch_size)
    return total


class StreamLoader:
    """A sized iterable of batches around a :class:`webdataset.WebLoader`.

    When a pass starts (its first batch is asked for) it stores the epoch (from ``epoch_fn``, else its
    own pass counter) in the shared stream state, so that workers started for that pass derive their
    order from it, and calls ``on_pass(epoch)`` (the training source computes the epoch's order there, once,
    before the workers are forked).

    It is stateful in Lightning's sense (``state_dict`` / ``load_state_dict``, saved in checkpoints):
    after ``load_state_dict`` the next pass over the same epoch starts at the first batch not handed out
    before the checkpoint (the workers start there: nothing is read or decoded to skip). The position is
    one of global batches: it holds on any number of ranks with the same global batch.
    """

    def __init__(
        self,
        loader: wds.WebLoader,
        num_batches: int,
        state: StreamState,
        epoch_fn: Any = None,
        num_workers: int = 0,
        warn_short: bool = True,
        global_batch: int | None = None,
        on_pass: Callable[[int], Any] | None = None,
    ) -> None:
        self.loader, self.num_batches, self.state, self.epoch_fn = loader, num_batches, state, epoch_fn
        self.num_workers = num_workers
        self.warn_short = warn_short
        self.global_batch = global_batch
        self.on_pass = on_pass
        self._passes = 0
        self._consumed = 0
        self._resume: dict[str, int] | None = None

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._passes += 1
        return self._iterate(self._passes - 1)

    def _resume_skip(self) -> int:
        """Batches to skip in this pass: those of a loaded state that belong to this very epoch."""
        resume, self._resume = self._resume, None
        if not resume or resume.get("epoch") != self.state.epoch:
            return 0
        done = int(resume.get("batches", 0))
        saved_global = resume.get("global_batch")
        if resume.get("num_batches") != self.num_batches or (saved_global is not None and saved_global != self.global_batch):
            warnings.warn(
                f"cannot restore the data position of epoch {self.state.epoch}: the checkpoint's loader had "
                f"{resume.get('num_batches')} batches per epoch (global batch {saved_global}), this one "
                f"{self.num_batches} (global batch {self.global_batch}): the global batch (batch size x processes) "
                f"or the data changed; the rest of the epoch is drawn from its start",
                stacklevel=3,
            )
            return 0
        return done if 0 < done < self.num_batches else 0

    def _iterate(self, pass_number: int) -> Iterator[dict[str, Any]]:
        """Batches of one pass; a resumed epoch leaves out the batches seen before the checkpoint.

        Epoch and skip are decided when the first batch is asked for, not when the iterator is made:
        Lightning makes the first training iterator while sizing the LR schedule, before it restores
        the loops of a checkpoint, so ``epoch_fn`` is only right at the first batch.
        """
        epoch = self.epoch_fn() if self.epoch_fn is not None else None
        self.state.epoch = pass_number if epoch is None else int(epoch)
        skip = self._resume_skip()
        if self.on_pass is not None:
            self.on_pass(self.state.epoch)
        self.state.skip_batches = skip  # read by the training source when its workers start
        self._consumed = skip
        for batch in self.loader:
            if self._consumed >= self.num_batches:
                break
            self._consumed += 1
            self._check(batch)
            yield batch

    def _check(self, batch: dict[str, Any]) -> None:
        """Warn about padded short clips once per process (the main one: not once per worker and epoch)."""
        global _short_warned
        if not self.warn_short or _short_warned >= SHORT_WARNINGS_SHOWN:
            return
        message = short_clip_message(batch)
        if message is not None:
            _short_warned += 1
            warnings.warn(message, stacklevel=4)

    def state_dict(self) -> dict[str, int]:
        """Where the current pass stands: epoch, batches handed out, batches per epoch and (training) the global
        batch they were cut with (plain ints)."""
        out = {"epoch": int(self.state.epoch), "batches": int(self._consumed), "num_batches": int(self.num_batches)}
        if self.global_batch is not None:
            out["global_batch"] = int(self.global_batch)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume: the next pass, when it is the same epoch, continues after the batches already seen."""
        keys = ("epoch", "batches", "num_batches", "global_batch")
        self._resume = {k: int(v) for k, v in state_dict.items() if k in keys}


#: glibc ``mallopt`` parameter number of M_MMAP_THRESHOLD (malloc.h).
_M_MMAP_THRESHOLD = -3


def fixed_mmap_threshold(worker_id: int = 0, threshold: int = 128 * 1024) -> None:
    """DataLoader worker init: pin glibc's mmap threshold at 128 KiB (Linux; a no-op elsewhere).

    By default glibc raises the threshold each time a large mmapped block is freed, after which decoded
    frames and batch buffers come from the heap, interleave with longer-lived allocations and leave holes
    that are never returned to the OS (measured with the former pools of JPEG bytes: a worker's resident
    memory grew to about 3x its pool's bytes). With the threshold pinned, every block above 128 KiB is its
    own mapping, freed on release.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):
        pass


def make_loader(
    dataset: Any,
    *,
    num_workers: int,
    num_batches: int,
    state: StreamState,
    epoch_fn: Any = None,
    epoch_seeded: bool = False,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    warn_short: bool = True,
    global_batch: int | None = None,
    on_pass: Callable[[int], Any] | None = None,
    prefetch_factor: int | None = None,
) -> StreamLoader:
    """Wrap a batch pipeline or source in a WebLoader (batching already done in the workers).

    The DataLoader draws its worker base seed from its own generator, not from torch's global RNG, so
    creating an iterator (each epoch, each evaluation) leaves the model's random stream untouched: a
    resumed run continues the same dropout / sampling draws as an uninterrupted one.
    `persistent_workers` keeps the workers between passes: only for streams that do not change with the epoch
    (the workers keep the copy of the stream state they were started with); `epoch_seeded` streams refuse it.
    """
    if persistent_workers and epoch_seeded:
        raise ValueError("persistent workers would replay the first epoch's shuffle: the training stream restarts them")
    generator = torch.Generator().manual_seed(0)
    extra = {"prefetch_factor": prefetch_factor} if num_workers > 0 and prefetch_factor else {}
    loader = wds.WebLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        generator=generator,
        worker_init_fn=fixed_mmap_threshold if num_workers > 0 else None,
        **extra,
    )
    return StreamLoader(loader, num_batches, state, epoch_fn, num_workers=num_workers, warn_short=warn_short,
                        global_batch=global_batch, on_pass=on_pass)  # fmt: skip
