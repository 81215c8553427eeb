"""RetrievalDataModule: training batches, exact evaluation across simulated ranks/workers, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.data_fixtures import tiny_root  # noqa: F401 - pytest fixture
from tvr_bench.data.datamodule import RetrievalDataModule
from tvr_bench.data.shards import ShardError, ShardFile, encode_sample, iter_shard, parse_sample, read_index
from tvr_bench.data.transforms import CLIP_MEAN, CLIP_STD, normalize_batch


def _dm(root: Path, **kw: object) -> RetrievalDataModule:
    args = dict(root=str(root), dataset="synthetic", num_frames=12, image_size=64, batch_size=8, eval_batch_size=5, num_workers=0)
    args.update(kw)
    return RetrievalDataModule(**args)  # type: ignore[arg-type]


def _captions_by_key(root: Path, split: str) -> dict[str, list[str]]:
    out = {}
    for shard in sorted((root / split).glob("shard-*.tar")):
        for sample in iter_shard(shard):
            out[sample["__key__"]] = parse_sample(sample)[0]["captions"]
    return out


def _fake_trainer(rank: int, world: int, epoch: int = 0) -> SimpleNamespace:
    return SimpleNamespace(global_rank=rank, world_size=world, current_epoch=epoch)


def test_train_batches_shapes_dtypes_normalisation(tiny_root: Path) -> None:
    dm = _dm(tiny_root)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 48 // 8
    batch = batches[0]
    assert set(batch) == {"frames", "frame_mask", "captions", "video_key"}
    assert batch["frames"].shape == (8, 12, 3, 64, 64) and batch["frames"].dtype == torch.uint8  # uint8 transport
    assert batch["frame_mask"].shape == (8, 12) and batch["frame_mask"].dtype == torch.bool and batch["frame_mask"].all()
    captions = _captions_by_key(tiny_root, "train")
    for key, caption in zip(batch["video_key"], batch["captions"]):
        assert caption in captions[key]
    # the DataModule's on_after_batch_transfer normalises on the device, as normalize_batch does
    batch = dm.on_after_batch_transfer(batch, 0)
    assert batch["frames"].dtype == torch.float32 and torch.equal(batch["frames"], normalize_batch(batches[0])["frames"])
    # CLIP normalisation: values span the normalised range of 0..255 pixels
    lo = torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)]).view(1, 1, 3, 1, 1)
    hi = torch.tensor([(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]).view(1, 1, 3, 1, 1)
    assert (batch["frames"] >= lo - 1e-4).all() and (batch["frames"] <= hi + 1e-4).all()
    assert batch["frames"].min() < -1.0 and batch["frames"].max() > 1.0


def test_train_shuffling_is_seeded_per_epoch(tiny_root: Path) -> None:
    def order(seed: int, epoch: int) -> list[tuple[str, str]]:
        dm = _dm(tiny_root, seed=seed)
        dm.trainer = _fake_trainer(0, 1, epoch)
        return [pair for b in dm.train_dataloader() for pair in zip(b["video_key"], b["captions"])]

    first = order(0, 0)
    assert first == order(0, 0)  # reproducible
    assert first != order(0, 1)  # reshuffled each epoch (videos and drawn captions)
    assert first != order(1, 0)
    keys = [k for k, _ in first]
    assert keys != sorted(keys)


def test_train_equal_batches_on_every_rank_and_all_captions(tiny_root: Path) -> None:
    for rank in (0, 1):
        dm = _dm(tiny_root, batch_size=4, num_workers=2)
        dm.trainer = _fake_trainer(rank, 2)
        loader = dm.train_dataloader()
        assert len(loader) == 48 // (2 * 4) == sum(1 for _ in loader)
    dm = _dm(tiny_root, batch_size=16, train_captions="all")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 240 // 16
    pairs = [pair for b in batches for pair in zip(b["video_key"], b["captions"])]
    assert len(set(pairs)) > 200  # all-captions expansion: mostly distinct (video, caption) pairs


def _eval_items(dm: RetrievalDataModule, split: str) -> tuple[list[str], list[str], list[dict]]:
    videos, caption_keys, batches = [], [], []
    loader = dm.eval_dataloader(split)
    for batch in loader:
        batches.append(batch)
        videos += batch["video_key"]
        caption_keys += batch["caption_key"]
        for key, v in zip(batch["caption_key"], batch["caption_video"].tolist()):
            assert key.split("#")[0] == batch["video_key"][v]
    assert len(batches) == len(loader)
    return videos, caption_keys, batches


def test_eval_every_video_and_caption_once_in_order(tiny_root: Path) -> None:
    dm = _dm(tiny_root)
    videos, caption_keys, batches = _eval_items(dm, "val")
    captions = _captions_by_key(tiny_root, "val")
    assert videos == sorted(captions) and len(batches) == 4  # 16 videos / 5
    assert caption_keys == [f"{k}#{j}" for k in videos for j in range(len(captions[k]))]
    first = batches[0]
    assert first["captions"][:5] == captions[first["video_key"][0]]
    assert first["frames"].shape == (5, 12, 3, 64, 64) and first["caption_video"].dtype == torch.long
    assert _eval_items(_dm(tiny_root), "val")[:2] == (videos, caption_keys)
    assert dm.eval_size("val") == (16, 80)


def test_eval_exact_over_two_ranks_two_workers_uneven_shards(tiny_root: Path) -> None:
    # train split: 48 samples in 3 shards of 16, read by 2 ranks x 2 workers = 4 slots of 12
    everything = _captions_by_key(tiny_root, "train")
    runs = []
    for _ in range(2):
        seen_videos, seen_captions = [], []
        for rank in (0, 1):
            dm = _dm(tiny_root, num_workers=2, eval_batch_size=5)
            dm.trainer = _fake_trainer(rank, 2)
            videos, caption_keys, _ = _eval_items(dm, "train")
            seen_videos += videos
            seen_captions += caption_keys
        runs.append((seen_videos, seen_captions))
    seen_videos, seen_captions = runs[0]
    assert runs[0] == runs[1]  # deterministic
    assert sorted(seen_videos) == sorted(everything) and len(seen_videos) == 48
    assert len(seen_captions) == len(set(seen_captions)) == 240


def test_paragraph_mode(tiny_root: Path) -> None:
    dm = _dm(tiny_root, caption_mode="paragraph")
    captions = _captions_by_key(tiny_root, "test")
    batch = next(iter(dm.test_dataloader()))
    assert len(batch["captions"]) == len(batch["video_key"]) == 5
    assert batch["caption_video"].tolist() == list(range(5))
    assert batch["captions"][0] == " ".join(captions[batch["video_key"][0]])
    assert batch["caption_key"][0] == f"{batch['video_key'][0]}#0"
    assert dm.eval_size("test") == (16, 16)
    train = next(iter(_dm(tiny_root, caption_mode="paragraph").train_dataloader()))
    assert all(c == " ".join(captions_) for c, captions_ in zip(train["captions"], [_captions_by_key(tiny_root, "train")[k] for k in train["video_key"]]))


def test_more_frames_than_prepared_are_refused_fewer_subsampled(tiny_root: Path) -> None:
    with pytest.raises(ValueError) as info:
        _dm(tiny_root, num_frames=16, image_size=32).val_dataloader()
    message = str(info.value)
    assert str(tiny_root / "val") in message and "prepared with 12 frames" in message and "num_frames=16" in message
    assert "tvr-bench prepare synthetic" in message and "--frames 16" in message
    batch = next(iter(_dm(tiny_root, num_frames=4).val_dataloader()))
    assert batch["frames"].shape == (5, 4, 3, 64, 64) and batch["frame_mask"].all()


def test_missing_directory_error_names_dir_and_card(tmp_path: Path) -> None:
    dm = _dm(tmp_path / "nowhere", dataset="msrvtt")
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("fit")
    assert str(tmp_path / "nowhere" / "train") in str(info.value) and "data_cards/msrvtt.md" in str(info.value)


def _copy_split(tiny_root: Path, dest: Path) -> Path:
    shutil.copytree(tiny_root / "val", dest / "val")
    return dest


def test_truncated_shard_error_names_shard(tiny_root: Path, tmp_path: Path) -> None:
    root = _copy_split(tiny_root, tmp_path)
    shard = root / "val" / "shard-00000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 700])
    with pytest.raises(ShardError) as info:
        list(_dm(root).val_dataloader())
    assert "shard-00000.tar" in str(info.value) and "truncated" in str(info.value)


def test_sample_missing_frames_error_names_key(tiny_root: Path, tmp_path: Path) -> None:
    root = _copy_split(tiny_root, tmp_path)
    shard = root / "val" / "shard-00000.tar"
    samples = list(iter_shard(shard))
    shard.unlink()
    writer = ShardFile(shard)
    for i, sample in enumerate(samples):
        meta, frames = parse_sample(sample)
        if i == 3:
            frames = frames[:7]  # json still says 12
        writer.write(encode_sample(sample["__key__"], frames, meta), len(meta["captions"]))
    info = writer.finish()
    index = read_index(root / "val")
    index["shards"][0].update(sha256=info.sha256, bytes=info.bytes)
    (root / "val" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError) as err:
        list(_dm(root, num_workers=1).val_dataloader())
    message = str(err.value)
    assert "shard-00000.tar" in message and samples[3]["__key__"] in message and "frames missing" in message


def test_persistent_eval_workers_repeat_the_same_pass(tiny_root: Path) -> None:
    # val: 16 videos read by 2 persistent workers, three passes over one loader (three evaluations)
    dm = _dm(tiny_root, num_workers=2, persistent_workers=True)
    loader = dm.eval_dataloader("val")
    passes = [[(b["video_key"], b["caption_key"], b["frames"]) for b in loader] for _ in range(3)]
    fresh = [(b["video_key"], b["caption_key"], b["frames"]) for b in _dm(tiny_root, num_workers=2).eval_dataloader("val")]
    assert loader.loader.pipeline[0].persistent_workers  # the WebLoader's DataLoader
    for batches in passes:
        assert [b[:2] for b in batches] == [b[:2] for b in fresh]
        assert all(torch.equal(a[2], b[2]) for a, b in zip(batches, fresh))
    assert sorted(k for b in fresh for k in b[0]) == sorted(_captions_by_key(tiny_root, "val"))


def test_persistent_workers_refused_for_the_epoch_seeded_training_stream() -> None:
    from tvr_bench.data.streams import StreamState, make_loader

    with pytest.raises(ValueError, match="first epoch's shuffle"):
        make_loader([], num_workers=2, num_batches=1, state=StreamState(), epoch_seeded=True, persistent_workers=True)  # type: ignore[arg-type]


def test_every_datamodule_passes_the_loader_settings_through() -> None:
    """A benchmark or the synthetic set accepts every loader and stream setting of the base datamodule (a method's
    DATA_PROTOCOL `last_batch`, a remote root's `cache_dir`, ...), except what it fixes itself."""
    import inspect

    from tvr_bench.data.benchmarks.common import BenchmarkDataModule
    from tvr_bench.data.benchmarks.synthetic import SyntheticDataModule
    from tvr_bench.data.datamodule import RetrievalDataModule

    fixed = {"self", "root", "dataset", "train_split"}
    base = set(inspect.signature(RetrievalDataModule.__init__).parameters) - fixed
    for cls in (BenchmarkDataModule, SyntheticDataModule):
        missing = base - set(inspect.signature(cls.__init__).parameters)
        assert not missing, f"{cls.__name__} does not accept {sorted(missing)}"
    dm = SyntheticDataModule(size="tiny", last_batch="drop", cache_dir="/tmp/x", prefetch_factor=3)
    assert (dm.hparams.last_batch, dm.hparams.cache_dir, dm.hparams.prefetch_factor) == ("drop", "/tmp/x", 3)
