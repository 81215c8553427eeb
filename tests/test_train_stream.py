"""Training order on a real prepared many-caption split (tests/stream_fixtures.py: 320 videos x 20 captions):
every pair exactly once per epoch, batches of distinct videos, the same global batches with 0 and 2 workers on 1
and 2 ranks (the order of tvr_bench.data.order, read by offset), dropped or kept last batch, the ``videos``
stream, per-sample augmentation, exact resume (also on another number of ranks), the deprecated options."""

from __future__ import annotations

from collections import Counter
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from tests.data_fixtures import tiny_root  # noqa: F401 - pytest fixture
from tests.stream_fixtures import CAPTIONS, VIDEOS, many_captions_root  # noqa: F401 - pytest fixture
from tvr_bench.data.datamodule import RetrievalDataModule
from tvr_bench.data.order import epoch_order, epoch_rng

#: Global batch of these tests: 6,400 pairs = 66 full batches of 96 and 64 pairs left (a last batch to drop or keep).
GLOBAL = 96


def _dm(root: Path, **kw: Any) -> RetrievalDataModule:
    args: dict[str, Any] = dict(root=str(root), dataset="synthetic", num_frames=1, image_size=32, batch_size=GLOBAL,
                                num_workers=0, val_split=None, seed=0, train_stream="pairs")  # fmt: skip
    args.update(kw)
    return RetrievalDataModule(**args)


def _rank_batches(root: Path, epoch: int, rank: int, world: int, state: dict | None = None, **kw: Any) -> list[dict[str, Any]]:
    """One rank's batches of an epoch, iterated as a run does (keys, captions, and the frames when asked)."""
    dm = _dm(root, **kw)
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, current_epoch=epoch)
    if state is not None:
        dm.load_state_dict({"train_stream": state})
    loader = dm.train_dataloader()
    out = [{"video_key": b["video_key"], "captions": b["captions"], "frames": b["frames"]} for b in loader]
    assert loader.state_dict()["batches"] == len(loader)
    return out


def _global_batches(root: Path, epoch: int, world: int, **kw: Any) -> list[list[tuple[str, str]]]:
    """The global batches of an epoch on ``world`` simulated ranks: the ranks' shares of each step, concatenated."""
    kw.setdefault("batch_size", GLOBAL // world)
    per_rank = [_rank_batches(root, epoch, rank, world, **kw) for rank in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # every rank yields the same number of batches
    return [[p for b in step for p in zip(b["video_key"], b["captions"])] for step in zip(*per_rank)]


@lru_cache(maxsize=None)
def _epoch_one(root: str) -> list[list[tuple[str, str]]]:
    """Epoch 1 on one process, 0 workers (the resume tests' uninterrupted run, computed once)."""
    return _global_batches(Path(root), 1, 1)


def _caption_text(key: str, j: int) -> str:
    return f"caption {j} of video {int(key[1:])}"


@pytest.mark.parametrize(("workers", "world", "last"), [(0, 1, "drop"), (2, 1, "keep"), (0, 2, "keep"), (2, 2, "drop")])
def test_pairs_epoch_is_one_global_order_on_any_ranks_and_workers(many_captions_root: Path, workers: int, world: int, last: str) -> None:
    """Every pair exactly once except those of a dropped last batch, every batch of distinct videos (the last ones
    included), and exactly the global batches of the order computed for one process (0 and 2 workers, 1 and 2
    ranks): W processes train on the batches of one process with the same global batch."""
    batches = _global_batches(many_captions_root, 0, world, num_workers=workers, last_batch=last)
    full, rest = divmod(VIDEOS * CAPTIONS, GLOBAL)
    assert len(batches) == full + (last == "keep")
    assert [len(b) for b in batches] == [GLOBAL] * full + ([rest] if last == "keep" else [])
    assert all(len({k for k, _ in b}) == len(b) for b in batches)  # distinct videos in every batch
    counts = Counter(p for b in batches for p in b)
    assert max(counts.values()) == 1  # no pair twice
    order = epoch_order(np.full(VIDEOS, CAPTIONS), seed=0, epoch=0, global_batch=GLOBAL, last_batch=last)
    expected = [[(f"v{v:04d}", _caption_text(f"v{v:04d}", c)) for v, c in zip(order.video[order.batch(j)], order.caption[order.batch(j)])]
                for j in range(order.num_batches)]  # fmt: skip
    assert batches == expected
    unseen = {(f"v{v:04d}", _caption_text(f"v{v:04d}", j)) for v in range(VIDEOS) for j in range(CAPTIONS)} - set(counts)
    if last == "keep":
        assert not unseen
    else:  # the pairs never seen are exactly the permutation's last `rest`: the dropped last batch
        perm = epoch_rng(0, 0, "pairs").permutation(VIDEOS * CAPTIONS)[-rest:]
        assert unseen == {(f"v{p // CAPTIONS:04d}", _caption_text(f"v{p // CAPTIONS:04d}", p % CAPTIONS)) for p in perm}


def test_order_is_uniform_and_fresh_every_epoch(many_captions_root: Path) -> None:
    """A new order every epoch and seed; the first batch of an epoch already spans the split (no shard locality):
    its videos come from every shard of 40."""
    def first_batches(epoch: int, seed: int = 0) -> list[list[str]]:
        dm = _dm(many_captions_root, batch_size=128, seed=seed)
        dm.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=epoch)
        return [b["video_key"] for _, b in zip(range(2), dm.train_dataloader())]

    one, two, other_seed = first_batches(0), first_batches(1), first_batches(0, seed=1)
    assert one != two and one != other_seed and one == first_batches(0)
    assert len({int(k[1:]) // 40 for k in one[0]}) == VIDEOS // 40 and len(set(one[0])) == 128


def test_videos_stream_visits_every_video_once_with_a_caption_drawn_per_visit(many_captions_root: Path) -> None:
    """videos: epoch = videos / global batch; each video once, its caption drawn per visit (varies across epochs),
    the same on 2 ranks x 2 workers as on one process."""
    epochs = [_global_batches(many_captions_root, e, 1, train_stream="videos", batch_size=32) for e in (0, 1)]
    assert len(epochs[0]) == VIDEOS // 32
    keys = [k for b in epochs[0] for k, _ in b]
    assert len(keys) == len(set(keys)) == VIDEOS
    drawn = [dict(p for b in batches for p in b) for batches in epochs]
    assert sum(drawn[0][k] != drawn[1][k] for k in drawn[0]) > VIDEOS // 2
    assert _global_batches(many_captions_root, 0, 2, train_stream="videos", batch_size=16, num_workers=2) == epochs[0]


def test_augmentation_is_seeded_per_sample_not_per_rank_or_worker(tiny_root: Path) -> None:  # noqa: F811
    """clip_train crops: the frames of every global batch are the same on 1 process (0 workers) and on 2 ranks x
    2 workers (each sample's crop and flip come from its position in the epoch's order), also after a resume at
    global batch 5 on 2 ranks."""
    def frames(world: int, workers: int, state: dict | None = None) -> list[torch.Tensor]:
        per_rank = [_rank_batches(tiny_root, 0, rank, world, state=state, batch_size=16 // world, num_workers=workers,
                                  num_frames=2, image_size=48, augment="clip_train") for rank in range(world)]  # fmt: skip
        return [torch.cat([b["frames"] for b in step]) for step in zip(*per_rank)]

    one, two = frames(1, 0), frames(2, 2)
    assert len(one) == len(two) == 240 // 16
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    resumed = frames(2, 0, {"epoch": 0, "batches": 5, "num_batches": 15, "global_batch": 16})
    assert len(resumed) == 10 and all(torch.equal(a, b) for a, b in zip(one[5:], resumed))
    plain = _rank_batches(tiny_root, 0, 0, 1, batch_size=16, num_frames=2, image_size=48)
    assert not torch.equal(plain[0]["frames"], one[0])  # the crops did something


@pytest.mark.parametrize(("resumed_world", "workers"), [(1, 2), (2, 2), (2, 0)])
def test_resume_mid_epoch_continues_with_the_same_global_batches(
    many_captions_root: Path, resumed_world: int, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A position saved at global batch 7 of epoch 1 (it counts global batches, whatever number of ranks saved it)
    resumes on 1 or 2 ranks with the same global batch with the uninterrupted run's batch 7 onwards; without
    workers, no sample of the skipped batches is even read."""
    from tvr_bench.data.offsets import SampleReader

    full = _epoch_one(str(many_captions_root))
    state = {"epoch": 1, "batches": 7, "num_batches": len(full), "global_batch": GLOBAL}
    reads = Counter()
    real = SampleReader.raw
    monkeypatch.setattr(SampleReader, "raw", lambda self, i: reads.update([1]) or real(self, i))
    per_rank = [_rank_batches(many_captions_root, 1, rank, resumed_world, state=state, batch_size=GLOBAL // resumed_world,
                              num_workers=workers) for rank in range(resumed_world)]  # fmt: skip
    resumed = [[p for b in step for p in zip(b["video_key"], b["captions"])] for step in zip(*per_rank)]
    assert resumed == full[7:]
    if workers == 0:
        assert reads[1] == sum(len(b) for b in full[7:])


def test_resume_with_another_global_batch_warns_and_restarts_the_epoch(tiny_root: Path) -> None:  # noqa: F811
    full = _rank_batches(tiny_root, 1, 0, 1, batch_size=16)
    with pytest.warns(UserWarning, match="cannot restore the data position"):
        again = _rank_batches(tiny_root, 1, 0, 1, batch_size=16,
                              state={"epoch": 1, "batches": 7, "num_batches": len(full), "global_batch": 8})  # fmt: skip
    assert [b["video_key"] for b in again] == [b["video_key"] for b in full]


def test_train_captions_alias_bad_values_and_deprecated_pool_options(tiny_root: Path) -> None:  # noqa: F811
    assert _dm(tiny_root, train_captions="random", train_stream=None).train_stream == "videos"
    assert _dm(tiny_root, train_captions="all", train_stream=None).train_stream == "pairs"
    assert _dm(tiny_root, train_stream=None).train_stream == "videos"  # both unset: today's default
    dm = _dm(tiny_root, train_captions="random", train_stream="pairs")
    assert dm.train_stream == "pairs" and dm.train_captions == "all" and dm.hparams["train_stream"] == "pairs"
    assert _dm(tiny_root).last_batch == "drop" == _dm(tiny_root).hparams["last_batch"]
    for bad in (dict(train_stream="all"), dict(train_captions="some"), dict(augment="flip"), dict(last_batch="pad")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            _dm(tiny_root, **bad)
    with pytest.warns(UserWarning, match="deprecated and ignored"):
        _dm(tiny_root, shuffle_buffer=64)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _dm(tiny_root, batch_size=300).train_dataloader()
