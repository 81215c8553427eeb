"""The training order of one epoch: a uniform random permutation of the (video, caption) pairs, in global
batches of distinct videos, the same whatever the number of ranks and workers (data_cards/FORMAT.md).

Pure functions of the caption counts, the seed, the epoch and the global batch (never of the number of ranks or
workers): every rank and worker computes the same order and takes its share of each global batch
(:func:`rank_slice`), so W processes train on the very batches one process with the same global batch sees
(with a kept last batch, W ranks train on its first ``size - size % W`` items).

``pairs``: the pairs of the epoch are shuffled uniformly (seeded by seed and epoch), the incomplete last
global batch is cut off (``last_batch: drop``: the last pairs of the permutation, as a ``DataLoader`` with
``drop_last=True`` drops them) or kept, and the rest are arranged into batches of distinct videos by
:func:`distinct_video_batches`: a pair whose video is already in the open batch moves to the next batch
that can take it. ``videos``: the videos are shuffled, each with one caption drawn at random per visit
(batches of distinct videos by construction). Per-sample randomness (the caption of a ``videos`` visit,
the augmentation seed of every item) is drawn per position of the epoch's order, never per worker or rank.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

#: What happens to the incomplete last global batch of an epoch (per method: see DATA_PROTOCOL / the cards).
LAST_BATCH: tuple[str, ...] = ("drop", "keep")


def epoch_rng(seed: int, epoch: int, purpose: str) -> np.random.Generator:
    """A generator seeded by (seed, epoch, purpose) through SHA-256 (any int seed, negative ones included)."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{purpose}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


@dataclass(frozen=True)
class EpochOrder:
    """The items of one epoch in training order: ``video[i]`` (sample index in shard order) with its caption
    index ``caption[i]`` and augmentation seed ``aug[i]``; global batch j is items ``starts[j]:starts[j+1]``."""

    video: np.ndarray
    caption: np.ndarray
    aug: np.ndarray
    starts: np.ndarray

    @property
    def num_batches(self) -> int:
        """Global batches in the epoch."""
        return len(self.starts) - 1

    def batch(self, j: int) -> slice:
        """Item range of global batch ``j``."""
        return slice(int(self.starts[j]), int(self.starts[j + 1]))


def batch_sizes(items: int, global_batch: int, last_batch: str) -> list[int]:
    """Global batch sizes of an epoch of ``items``: full batches, plus the remainder with ``keep``. They do not
    depend on the number of ranks (see :func:`rank_batches` for what W ranks can train on)."""
    if last_batch not in LAST_BATCH:
        raise ValueError(f"last_batch must be one of {', '.join(LAST_BATCH)}, got {last_batch!r}")
    if global_batch < 1:
        raise ValueError(f"the global batch must be positive, got {global_batch}")
    sizes = [global_batch] * (items // global_batch)
    rest = items - len(sizes) * global_batch
    if last_batch == "keep" and rest > 0:
        sizes.append(rest)
    return sizes


def rank_batches(sizes: list[int], world_size: int) -> int:
    """Batches every one of ``world_size`` ranks trains on: each rank takes an equal share of a global batch (the
    features are all-gathered), so a kept last batch smaller than the number of ranks is left out, and one that
    is not a multiple of it loses its last ``size % world_size`` items (:func:`rank_slice`)."""
    if any(size % world_size for size in sizes[:-1]):
        raise ValueError(f"the global batch {sizes[0]} must be a multiple of the {world_size} ranks")
    return len(sizes) - (bool(sizes) and sizes[-1] < world_size)


def distinct_video_batches(video: np.ndarray, sizes: list[int]) -> np.ndarray:
    """Arrange items (``video[i]``: the video of the item at position i of a permutation) into consecutive
    batches of ``sizes`` with no video twice in a batch; returns the positions in batch order.

    Items are taken in permutation order; one whose video is already in the open batch waits and goes first
    into the next batch that can take it. A video whose remaining items would not fit into the remaining
    batches otherwise is taken early (its first waiting item): so every batch, the last ones included,
    holds distinct videos whenever some arrangement can (every video has at most one item per remaining
    batch; with a smaller final batch, at most its size of videos may have one item in every batch).
    Where none can (fewer videos than a batch, or a video with more items than there are batches), the
    batch is completed with the earliest remaining items, repeating as few videos as this greedy finds.
    Only the first ``sum(sizes)`` positions are arranged; later ones are left out.
    """
    total = int(sum(sizes))
    video = np.asarray(video, dtype=np.int64)[:total]
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    num_videos = int(video.max()) + 1
    count = np.bincount(video, minlength=num_videos)
    if len(np.flatnonzero(count)) < max(sizes):  # fewer videos than a batch: distinct batches do not exist
        return np.arange(total, dtype=np.int64)
    by_video = np.argsort(video, kind="stable")  # positions of each video's items, ascending
    first = np.concatenate([[0], np.cumsum(count)])
    head = first[:-1].copy()  # next candidate item of each video in by_video
    used = np.zeros(total, dtype=bool)
    waiting: list[int] = []  # positions passed by the frontier and not yet placed, ascending
    frontier = 0
    out = np.empty(total, dtype=np.int64)
    filled = 0
    video_list = video.tolist()
    final = sizes[-1]
    for j, size in enumerate(sizes):
        left = len(sizes) - j  # batches from this one to the end
        in_batch: set[int] = set()
        picked: list[int] = []

        def take(position: int) -> None:
            used[position] = True
            picked.append(position)
            in_batch.add(video_list[position])

        def earliest(v: int) -> int:
            """The first unused item of video ``v``."""
            k = head[v]
            while used[by_video[k]]:
                k += 1
            head[v] = k
            return int(by_video[k])

        if int(count.max()) >= left - 1 and left > 1:
            # videos that must appear in this batch so that the rest stays feasible
            urgent = np.flatnonzero(count >= left)
            urgent = urgent[np.argsort(-count[urgent], kind="stable")][:size]
            must = urgent.tolist()
            if final < size:
                at_limit = np.flatnonzero(count == left - 1)
                excess = len(urgent) + len(at_limit) - final
                if excess > 0:
                    must += sorted(at_limit.tolist(), key=lambda v: earliest(v))[: min(excess, size - len(must))]
            for v in must:
                position = earliest(v)
                take(position)
            if waiting and picked:
                taken = set(picked)
                waiting = [q for q in waiting if q not in taken]
        # waiting items first (oldest first), then the permutation
        keep: list[int] = []
        for q in waiting:
            if len(picked) < size and video_list[q] not in in_batch:
                take(q)
            else:
                keep.append(q)
        waiting = keep
        while len(picked) < size and frontier < total:
            q = frontier
            frontier += 1
            if used[q]:
                continue
            if video_list[q] in in_batch:
                waiting.append(q)
            else:
                take(q)
        if len(picked) < size:  # no arrangement of distinct videos: the earliest remaining items, repeats allowed
            extra = waiting[: size - len(picked)]
            waiting = waiting[len(extra) :]
            for q in extra:
                take(q)
        picked.sort()
        for q in picked:
            count[video_list[q]] -= 1
        out[filled : filled + len(picked)] = picked
        filled += len(picked)
    return out


def epoch_order(
    captions: np.ndarray,
    *,
    seed: int,
    epoch: int,
    global_batch: int,
    stream: str = "pairs",
    last_batch: str = "drop",
) -> EpochOrder:
    """The epoch's training order over videos with ``captions[v]`` captions each (see the module docstring)."""
    captions = np.asarray(captions, dtype=np.int64)
    if stream == "pairs":
        owner = np.repeat(np.arange(len(captions), dtype=np.int64), captions)
        index = np.arange(len(owner), dtype=np.int64) - np.repeat(np.cumsum(captions) - captions, captions)
        perm = epoch_rng(seed, epoch, "pairs").permutation(len(owner))
        sizes = batch_sizes(len(owner), global_batch, last_batch)
        arranged = perm[distinct_video_batches(owner[perm], sizes)]
        video, caption = owner[arranged], index[arranged]
    elif stream == "videos":
        video = epoch_rng(seed, epoch, "videos").permutation(len(captions)).astype(np.int64)
        sizes = batch_sizes(len(video), global_batch, last_batch)
        video = video[: sum(sizes)]
        draws = epoch_rng(seed, epoch, "captions").random(len(captions))
        caption = np.minimum((draws * captions).astype(np.int64), captions - 1)[video]  # one caption per visit
    else:
        raise ValueError(f"stream must be 'pairs' or 'videos', got {stream!r}")
    aug = epoch_rng(seed, epoch, "augment").integers(0, 2**63 - 1, size=len(video), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
    return EpochOrder(video=video, caption=caption, aug=aug, starts=starts)


def rank_slice(batch: slice, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous share of a global batch: ``size // world_size`` items (a kept last batch that is
    not a multiple of the ranks leaves its last ``size % world_size`` items out)."""
    size = (batch.stop - batch.start) // world_size
    return slice(batch.start + rank * size, batch.start + (rank + 1) * size)


def worker_batches(num_batches: int, start: int, worker: int, workers: int) -> range:
    """Global batches one DataLoader worker yields from batch ``start`` on: the DataLoader takes batches from its
    workers in turn (worker 0 first), so worker w yields ``start + w``, ``start + w + workers``, ..."""
    return range(start + worker, num_batches, max(1, workers))
