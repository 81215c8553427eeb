"""Training stream on a real prepared many-caption split (tests/stream_fixtures.py): batches of distinct
videos (``train_stream: pairs`` / ``videos``) with 0 and 2 workers and 2 simulated ranks, epoch coverage,
epoch lengths, exact resume, the deprecated ``train_captions`` alias."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.data_fixtures import tiny_root  # noqa: F401 - pytest fixture
from tests.stream_fixtures import CAPTIONS, VIDEOS, many_captions_root  # noqa: F401 - pytest fixture
from tvr_bench.data.datamodule import RetrievalDataModule

BATCH = 128


def _dm(root: Path, **kw: Any) -> RetrievalDataModule:
    args: dict[str, Any] = dict(root=str(root), dataset="synthetic", num_frames=1, image_size=32, batch_size=BATCH,
                                num_workers=0, val_split=None, seed=0)  # fmt: skip
    args.update(kw)
    return RetrievalDataModule(**args)


def _epoch(root: Path, epoch: int, rank: int = 0, world: int = 1, **kw: Any) -> list[dict[str, Any]]:
    dm = _dm(root, **kw)
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, current_epoch=epoch)
    loader = dm.train_dataloader()
    batches = [{"video_key": b["video_key"], "captions": b["captions"]} for b in loader]
    assert len(batches) == len(loader)
    return batches


def _distinct(batches: list[dict[str, Any]]) -> list[int]:
    return [len(set(b["video_key"])) for b in batches]


@pytest.mark.parametrize("stream", ["pairs", "videos"])
@pytest.mark.parametrize(("workers", "world"), [(0, 1), (2, 1), (0, 2)])
def test_batches_hold_distinct_videos(many_captions_root: Path, stream: str, workers: int, world: int) -> None:
    """Mean distinct videos per batch of 128 at 20 captions per video >= 126, the first batch of every epoch
    included (issue 12 item 1); with 2 workers and with 2 ranks."""
    for epoch in (0, 1):
        per_rank = [_epoch(many_captions_root, epoch, rank, world, num_workers=workers, train_stream=stream) for rank in range(world)]
        distinct = [n for batches in per_rank for n in _distinct(batches)]
        assert sum(distinct) / len(distinct) >= 126, distinct
        firsts = [n for batches in per_rank for n in _distinct(batches[: max(1, workers)])]  # every worker's first batch
        assert min(firsts) >= 126, firsts


def test_pairs_epoch_uses_every_pair_once(many_captions_root: Path) -> None:
    """pairs: epoch = pairs / (world x batch) batches; every (video, caption) pair once in an epoch except
    at most one batch per slot at the end of its block (the pool's tail: fewer videos left than a batch,
    the next pass joins), no pair three times; the 2 ranks' blocks hold disjoint videos."""
    per_rank = [_epoch(many_captions_root, 0, rank, 2, train_stream="pairs") for rank in (0, 1)]
    assert all(len(b) == VIDEOS * CAPTIONS // (2 * BATCH) for b in per_rank)
    pairs = [p for batches in per_rank for b in batches for p in zip(b["video_key"], b["captions"])]
    counts = Counter(pairs)
    assert max(counts.values()) <= 2 and sum(n == 2 for n in counts.values()) <= 2 * BATCH
    assert len(counts) >= VIDEOS * CAPTIONS - 2 * BATCH  # at most one batch per slot missed
    first_pass = [{k for b in batches[: len(batches) - 1] for k in b["video_key"]} for batches in per_rank]
    assert not first_pass[0] & first_pass[1]
    # one epoch on one rank: same coverage, a fresh order every epoch
    one, two = _epoch(many_captions_root, 0, train_stream="pairs"), _epoch(many_captions_root, 1, train_stream="pairs")
    assert len(one) == VIDEOS * CAPTIONS // BATCH
    assert max(Counter(p for b in one for p in zip(b["video_key"], b["captions"])).values()) <= 2
    assert [b["video_key"] for b in one] != [b["video_key"] for b in two]


def test_videos_epoch_visits_every_video_once_with_a_random_caption(many_captions_root: Path) -> None:
    """videos: epoch = videos / batch; each video once, its caption drawn per visit (varies across epochs)."""
    epochs = [_epoch(many_captions_root, e, train_stream="videos", batch_size=32) for e in (0, 1)]
    assert len(epochs[0]) == VIDEOS // 32
    keys = [k for b in epochs[0] for k in b["video_key"]]
    assert len(keys) == len(set(keys)) == VIDEOS
    drawn = [dict(p for b in batches for p in zip(b["video_key"], b["captions"])) for batches in epochs]
    assert sum(drawn[0][k] != drawn[1][k] for k in drawn[0]) > VIDEOS // 2
    assert len(set(drawn[0].values())) == VIDEOS  # caption j of video i names its video: one per video


def test_train_stream_resumes_exactly_mid_epoch(many_captions_root: Path) -> None:
    """A loader restored at batch 7 of epoch 1 continues with the uninterrupted run's batch 7 (2 workers)."""
    def keys(state: dict[str, int] | None) -> list[list[str]]:
        dm = _dm(many_captions_root, num_workers=2, batch_size=16, augment="clip_train")
        dm.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=1)
        if state is not None:
            dm.load_state_dict({"train_stream": state})
        return [b["video_key"] + [float(b["frames"].float().mean())] for b in dm.train_dataloader()]

    full = keys(None)
    assert keys({"epoch": 1, "batches": 7, "num_batches": len(full)}) == full[7:]  # same videos and same crops


def test_train_captions_alias_and_bad_values(tiny_root: Path) -> None:  # noqa: F811
    assert _dm(tiny_root, train_captions="random").train_stream == "videos"
    assert _dm(tiny_root, train_captions="all").train_stream == "pairs"
    assert _dm(tiny_root).train_stream == "videos"  # both unset: today's default
    dm = _dm(tiny_root, train_captions="random", train_stream="pairs")
    assert dm.train_stream == "pairs" and dm.train_captions == "all" and dm.hparams["train_stream"] == "pairs"
    for bad in (dict(train_stream="all"), dict(train_captions="some"), dict(augment="flip")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            _dm(tiny_root, **bad)
