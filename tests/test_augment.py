"""uint8 frame transport and train augmentation.

* ``normalize_batch`` / the DataModule's ``on_after_batch_transfer`` give bitwise the float frames the
  loaders produced at e54bdc9 (worker-side numpy normalisation, kept here as the reference), for eval and
  train batches, with and without resizing, with padded frames;
* ``augment: clip_train`` = X-Pool's RandomResizedCrop(scale 0.5-1, ratio 3/4-4/3) + horizontal flip,
  one box per clip, seeded; eval batches never augmented.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.data_fixtures import tiny_root  # noqa: F401 - pytest fixture
from tvr_bench.data.datamodule import RetrievalDataModule
from tvr_bench.data.frames import stored_frame_plan
from tvr_bench.data.shards import iter_shard, parse_sample
from tvr_bench.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    decode_clip_into,
    normalize_batch,
    normalize_frames,
    random_resized_crop_box,
    resized_crop,
)

# ------------------------------------------------------------------ reference: the loaders at e54bdc9
_REF_SCALE = np.array([1.0 / (255.0 * s) for s in CLIP_STD], dtype=np.float32).reshape(3, 1, 1)
_REF_SHIFT = np.array([m / s for m, s in zip(CLIP_MEAN, CLIP_STD)], dtype=np.float32).reshape(3, 1, 1)


def _ref_normalise(clips: list[np.ndarray], mask: np.ndarray) -> torch.Tensor:
    """e54bdc9 ``normalize_clips`` + ``batch_frames``: float32 multiply into the batch, subtract, zero padding."""
    out = np.empty((len(clips), *clips[0].shape), dtype=np.float32)
    for i, clip in enumerate(clips):
        for j in range(clip.shape[0]):
            np.multiply(clip[j], _REF_SCALE, out=out[i, j])
            out[i, j] -= _REF_SHIFT
    if not mask.all():
        out[~mask] = 0.0
    return torch.from_numpy(out)


def _ref_clip(jpegs: list[bytes], num_frames: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """e54bdc9 ``decode_clip``: PIL decode (draft), short side to ``size`` (torch bicubic antialiased), centre crop."""
    picked, pad = stored_frame_plan(len(jpegs), num_frames)
    frames = []
    for i in picked:
        with Image.open(io.BytesIO(jpegs[i]), formats=("JPEG",)) as img:
            if min(img.size) >= 2 * size:
                img.draft("RGB", (size, size))
            frames.append(np.asarray(img.convert("RGB")))
    x = torch.from_numpy(np.ascontiguousarray(np.stack(frames).transpose(0, 3, 1, 2)))
    h, w = x.shape[-2:]
    if min(h, w) != size:
        scale = size / min(h, w)
        h, w = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True).round_().clamp_(0, 255).to(torch.uint8)
    top, left = (h - size) // 2, (w - size) // 2
    clip = np.zeros((num_frames, 3, size, size), dtype=np.uint8)
    clip[: len(picked)] = x[..., top : top + size, left : left + size].numpy()
    mask = np.arange(num_frames) < len(picked)
    return clip, mask


def _samples(root: Path, split: str) -> dict[str, list[bytes]]:
    out = {}
    for shard in sorted((root / split).glob("shard-*.tar")):
        for sample in iter_shard(shard):
            out[sample["__key__"]] = parse_sample(sample)[1]
    return out


def _dm(root: Path, **kw: object) -> RetrievalDataModule:
    args = dict(root=str(root), dataset="synthetic", num_frames=12, image_size=64, batch_size=8, eval_batch_size=5, num_workers=0)
    args.update(kw)
    dm = RetrievalDataModule(**args)  # type: ignore[arg-type]
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=0)
    return dm


# ------------------------------------------------------------------ bitwise normalisation
def test_normalize_frames_bitwise_equal_to_the_worker_normalisation() -> None:
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (3, 4, 3, 16, 16), generator=g, dtype=torch.uint8)
    mask = torch.tensor([[True] * 4, [True, True, False, False], [True] * 4])
    frames[1, 2:] = 0
    expected = _ref_normalise([f.numpy() for f in frames], mask.numpy())
    got = normalize_frames(frames, mask)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    # every uint8 value of every channel, through the numpy (CPU) path and the torch path the device uses
    every = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, 16, 16).expand(1, 1, 3, 16, 16).contiguous()
    ref = _ref_normalise([every[0].numpy()], np.ones((1, 1), dtype=bool))
    assert torch.equal(normalize_frames(every), ref)
    scale, shift = torch.from_numpy(_REF_SCALE), torch.from_numpy(_REF_SHIFT)
    assert torch.equal(every.to(torch.float32).mul_(scale).sub_(shift), ref)  # the non-CPU branch's two kernels
    batch = {"frames": frames, "frame_mask": mask, "video_key": ["a", "b", "c"]}
    out = normalize_batch(batch)
    assert torch.equal(out["frames"], expected) and out["video_key"] == batch["video_key"] and batch["frames"].dtype == torch.uint8
    assert normalize_batch(out) is out  # float frames pass through


@pytest.mark.parametrize(("size", "num_frames"), [(64, 12), (32, 5)])
def test_eval_and_train_batches_equal_the_e54bdc9_loader_bitwise(tiny_root: Path, size: int, num_frames: int) -> None:  # noqa: F811
    """64 px: stored size, crop only; 32 px: bicubic resize; 5 of 12 frames: uniform subsampling."""
    for split in ("val", "train"):
        stored = _samples(tiny_root, split)
        dm = _dm(tiny_root, image_size=size, num_frames=num_frames)
        loader = dm.eval_dataloader(split) if split == "val" else dm.train_dataloader()
        for batch in list(loader)[:2]:
            refs = [_ref_clip(stored[k], num_frames, size) for k in batch["video_key"]]
            expected = _ref_normalise([c for c, _ in refs], np.stack([m for _, m in refs]))
            assert batch["frames"].dtype == torch.uint8
            assert torch.equal(dm.on_after_batch_transfer(batch, 0)["frames"], expected)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_centre_crop_planes_equal_the_decoded_frame_cropped(mode: str) -> None:
    """The plane-by-plane crop equals decode + centre crop + HWC -> CHW, for colour and grey JPEGs; other short
    sides are refused without touching the destination."""
    from tvr_bench.data.transforms import decode_center_crop_into, decode_jpeg

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 45, 3) if mode == "RGB" else (32, 45), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buf, format="JPEG", quality=90)
    full = decode_jpeg(buf.getvalue())
    out = np.zeros((3, 32, 32), dtype=np.uint8)
    assert decode_center_crop_into(buf.getvalue(), 32, out)
    left = (45 - 32) // 2
    assert np.array_equal(out, full[:, left : left + 32].transpose(2, 0, 1))
    untouched = np.full((3, 24, 24), 9, dtype=np.uint8)
    assert not decode_center_crop_into(buf.getvalue(), 24, untouched) and (untouched == 9).all()


def test_padded_frames_are_zero_after_normalisation() -> None:
    jpegs = []
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(np.full((40, 48, 3), 40 * i, dtype=np.uint8)).save(buf, format="JPEG")
        jpegs.append(buf.getvalue())
    picked, pad = stored_frame_plan(3, 5)
    out = np.full((5, 3, 32, 32), 7, dtype=np.uint8)
    decode_clip_into(out, jpegs, picked, 32)
    out[3:] = 0
    mask = torch.tensor([[True] * 3 + [False] * 2])
    frames = normalize_frames(torch.from_numpy(out)[None], mask)
    assert torch.count_nonzero(frames[0, 3:]) == 0 and torch.count_nonzero(frames[0, :3]) > 0


# ------------------------------------------------------------------ clip_train
def test_random_resized_crop_box_matches_x_pool_parameters() -> None:
    rng = random.Random(0)
    boxes = [random_resized_crop_box(rng, 224, 298) for _ in range(2000)]
    areas = np.array([b.height * b.width / (224 * 298) for b in boxes])
    ratios = np.array([b.width / b.height for b in boxes])
    assert areas.min() >= 0.5 - 0.01 and areas.max() <= 1.0
    assert ratios.min() >= 0.75 - 0.02 and ratios.max() <= 4 / 3 + 0.02
    assert 0.6 < areas.mean() < 0.75  # uniform over [0.5, 1] before the tries that do not fit are redrawn
    assert 0.45 < np.mean([b.flip for b in boxes]) < 0.55
    assert all(0 <= b.top <= 224 - b.height and 0 <= b.left <= 298 - b.width for b in boxes)
    assert len({(b.top, b.left) for b in boxes}) > 1000  # positions vary
    again = random.Random(0)
    assert [repr(b) for b in boxes[:20]] == [repr(random_resized_crop_box(again, 224, 298)) for _ in range(20)]


def test_clip_train_same_crop_and_flip_for_every_frame() -> None:
    rows = np.linspace(0, 255, 60).astype(np.uint8)[:, None, None] * np.ones((1, 80, 3), dtype=np.uint8)
    grad = np.ascontiguousarray(rows + (np.arange(80, dtype=np.uint8)[None, :, None] // 2))
    jpegs = []
    for shift in range(4):
        buf = io.BytesIO()
        Image.fromarray(np.roll(grad, shift, axis=1)).save(buf, format="JPEG", quality=95)
        jpegs.append(buf.getvalue())
    out = np.zeros((4, 3, 32, 32), dtype=np.uint8)
    decode_clip_into(out, jpegs, [0, 1, 2, 3], 32, augment_seed=123)
    box = random_resized_crop_box(random.Random(123), 60, 80)
    for f, data in enumerate(jpegs):
        frame = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        crop = torch.from_numpy(np.ascontiguousarray(frame[box.top : box.top + box.height, box.left : box.left + box.width].transpose(2, 0, 1)))
        assert torch.equal(torch.from_numpy(out[f]), resized_crop(crop[None], 32, box.flip)[0])
    again = np.zeros_like(out)
    decode_clip_into(again, jpegs, [0, 1, 2, 3], 32, augment_seed=123)
    assert np.array_equal(out, again)
    other = np.zeros_like(out)
    decode_clip_into(other, jpegs, [0, 1, 2, 3], 32, augment_seed=124)
    assert not np.array_equal(out, other)


def test_clip_train_changes_train_batches_only(tiny_root: Path) -> None:  # noqa: F811
    plain = next(iter(_dm(tiny_root).train_dataloader()))
    augmented = next(iter(_dm(tiny_root, augment="clip_train").train_dataloader()))
    assert plain["video_key"] == augmented["video_key"] and plain["captions"] == augmented["captions"]
    assert augmented["frames"].shape == plain["frames"].shape and augmented["frames"].dtype == torch.uint8
    assert not torch.equal(plain["frames"], augmented["frames"])
    assert torch.equal(next(iter(_dm(tiny_root, augment="clip_train").val_dataloader()))["frames"],
                       next(iter(_dm(tiny_root).val_dataloader()))["frames"])  # fmt: skip
    epochs = []
    for epoch in (0, 1):
        dm = _dm(tiny_root, augment="clip_train", seed=5)
        dm.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=epoch)
        epochs.append(next(iter(dm.train_dataloader())))
    dm = _dm(tiny_root, augment="clip_train", seed=5)
    assert torch.equal(next(iter(dm.train_dataloader()))["frames"], epochs[0]["frames"])  # seeded
    assert not torch.equal(epochs[0]["frames"], epochs[1]["frames"])
