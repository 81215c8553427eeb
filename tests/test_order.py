"""The epoch order as pure functions (tvr_bench/data/order.py): exactly once, distinct videos, uniform, little
displacement from the plain permutation, drop/keep of the last batch, rank and worker shares."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from tvr_bench.data.order import (
    batch_sizes,
    distinct_video_batches,
    epoch_order,
    epoch_rng,
    rank_batches,
    rank_slice,
    worker_batches,
)


def _check(order, captions: np.ndarray) -> list[int]:  # noqa: ANN001 - EpochOrder
    """Every (video, caption) of the order is a real pair and appears once; returns the repeats per batch."""
    pairs = list(zip(order.video.tolist(), order.caption.tolist()))
    assert max(Counter(pairs).values()) == 1
    assert all(0 <= c < captions[v] for v, c in pairs)
    return [order.batch(j).stop - order.batch(j).start - len(set(order.video[order.batch(j)].tolist())) for j in range(order.num_batches)]


def test_batch_sizes_drop_keep_and_rank_shares() -> None:
    assert batch_sizes(1000, 128, "drop") == [128] * 7
    assert batch_sizes(1000, 128, "keep") == [128] * 7 + [104]
    assert batch_sizes(100, 128, "drop") == [] and batch_sizes(100, 128, "keep") == [100]
    assert rank_batches([128] * 7 + [105], 4) == 8  # 4 ranks train on 26 items each of the last batch
    assert rank_batches([128] * 8 + [2], 4) == 8  # 2 left: nothing every rank can share
    assert rank_batches([], 2) == 0
    with pytest.raises(ValueError, match="multiple"):
        rank_batches([10, 10, 5], 4)
    with pytest.raises(ValueError, match="last_batch"):
        batch_sizes(100, 10, "pad")


@pytest.mark.parametrize("last", ["drop", "keep"])
def test_msrvtt_sized_order_every_pair_once_in_distinct_batches(last: str) -> None:
    """9,000 videos x 20 captions, global batch 128: 179,968 (drop) or all 180,000 (keep) pairs once, 128 distinct
    videos in every batch, the last ones included; at most a few thousand pairs moved, by at most 2 batches."""
    captions = np.full(9000, 20)
    order = epoch_order(captions, seed=0, epoch=0, global_batch=128, last_batch=last)
    repeats = _check(order, captions)
    assert order.num_batches == 1406 + (last == "keep") and max(repeats) == 0
    assert len(order.video) == (179_968 if last == "drop" else 180_000)
    # displacement: the batch of each pair vs its batch in the plain permutation
    perm = epoch_rng(0, 0, "pairs").permutation(180_000)
    plain_batch = np.empty(180_000, dtype=np.int64)
    plain_batch[perm] = np.arange(180_000) // 128
    ours = np.repeat(np.arange(order.num_batches), np.diff(order.starts))
    moved = ours - plain_batch[order.video * 20 + order.caption]
    assert (moved != 0).sum() < 5000 and np.abs(moved).max() <= 3


def test_uneven_caption_counts_and_the_feasibility_limit() -> None:
    """Random caption counts (1-29, some videos with 30-200), random batch sizes, drop or keep: whenever batches of
    distinct videos exist (every video at most once per batch is possible), every batch has them."""
    rng = np.random.default_rng(1)
    checked = 0
    for trial in range(150):
        videos, batch = int(rng.integers(5, 300)), int(rng.integers(2, 48))
        captions = rng.integers(1, 30, size=videos)
        if rng.random() < 0.3:
            captions[rng.integers(videos)] = rng.integers(30, 200)
        last = str(rng.choice(["drop", "keep"]))
        if not batch_sizes(int(captions.sum()), batch, last):
            continue
        order = epoch_order(captions, seed=trial, epoch=0, global_batch=batch, last_batch=last)
        repeats = _check(order, captions)
        kept = np.bincount(order.video, minlength=videos)
        sizes = np.diff(order.starts)
        feasible = kept.max() <= len(sizes) and (kept == len(sizes)).sum() <= sizes[-1] and (kept > 0).sum() >= sizes.max()
        if feasible:
            assert max(repeats) == 0, (trial, videos, batch, last)
            checked += 1
    assert checked > 100


def test_infeasible_inputs_still_use_every_pair_once() -> None:
    """Fewer videos than a batch, or one video with more captions than there are batches: repeats are unavoidable,
    every pair is still used once."""
    few = epoch_order(np.full(5, 10), seed=0, epoch=0, global_batch=8)  # 5 videos, batches of 8
    assert len(few.video) == 48 and max(_check(few, np.full(5, 10))) > 0
    heavy = np.array([60] + [1] * 100)  # 160 pairs, 20 batches of 8: the heavy video cannot fit once per batch
    order = epoch_order(heavy, seed=0, epoch=0, global_batch=8)
    repeats = _check(order, heavy)
    assert len(order.video) == 160 and sum(repeats) == 40  # it appears in every batch, its other 40 pairs as repeats


def test_distinct_batches_keep_permutation_order_when_nothing_collides() -> None:
    assert distinct_video_batches(np.arange(12), [4, 4, 4]).tolist() == list(range(12))
    # position 1 repeats video 0: it waits for the next batch, position 2 moves up
    assert distinct_video_batches(np.array([0, 0, 1, 2, 3, 4]), [3, 3]).tolist() == [0, 2, 3, 1, 4, 5]


def test_videos_stream_and_seeds() -> None:
    captions = np.array([1, 2, 3, 4, 5] * 20)
    a = epoch_order(captions, seed=3, epoch=0, global_batch=16, stream="videos")
    assert len(a.video) == 96 and len(set(a.video.tolist())) == 96 and (a.caption < captions[a.video]).all()
    b = epoch_order(captions, seed=3, epoch=1, global_batch=16, stream="videos")
    assert not np.array_equal(a.video, b.video) and not np.array_equal(a.aug, b.aug)
    again = epoch_order(captions, seed=3, epoch=0, global_batch=16, stream="videos")
    assert np.array_equal(a.video, again.video) and np.array_equal(a.caption, again.caption) and np.array_equal(a.aug, again.aug)
    negative = epoch_order(captions, seed=-1, epoch=0, global_batch=16)  # seed_everything allows any int
    assert len(negative.video) == 288
    with pytest.raises(ValueError, match="stream"):
        epoch_order(captions, seed=0, epoch=0, global_batch=16, stream="frames")


def test_rank_and_worker_shares() -> None:
    assert [rank_slice(slice(100, 132), r, 4) for r in range(4)] == [slice(100, 108), slice(108, 116), slice(116, 124), slice(124, 132)]
    assert list(worker_batches(10, 0, 1, 3)) == [1, 4, 7]
    assert list(worker_batches(10, 7, 0, 2)) == [7, 9] and list(worker_batches(10, 7, 1, 2)) == [8]
    assert list(worker_batches(5, 0, 0, 1)) == [0, 1, 2, 3, 4]
