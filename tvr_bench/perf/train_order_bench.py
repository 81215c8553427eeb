"""`make perf` section `train-order` (issue 23): how the training DataLoader orders an epoch, beside a uniform
random permutation of the same pairs computed in the same run.

A train split of 9,000 videos x 20 captions (MSR-VTT's training size; ``--quick``: 900 x 20) is written in shards
of 200 videos in video order (so any locality of the loader would show), one small JPEG frame per video. One
epoch of the training DataModule is iterated exactly as a run does (global batch 128, ``train_stream: pairs``,
``last_batch: drop``) with 0, 2 and 8 workers on one rank and on 2 simulated ranks x 2 workers (the global batch
of a step = the ranks' batches of that step, concatenated). For each, and for the first 1,406 batches of 128 of
a uniform permutation (``numpy`` ``permutation`` of all pairs, the last incomplete batch dropped):

* videos seen in the first 10 % of batches (coverage early in the epoch);
* the batch in which the last video first appears;
* spread of the video ids within a batch: the standard deviation of the batch's video indices (shard order)
  over that of all indices, averaged over batches (1 = spread like the whole split; a local shuffle is < 1);
* correlation of consecutive batches' mean video id (a stream that walks through the shards is near 1);
* pairs never seen / seen twice in the epoch, and the fewest distinct videos in a batch.

Targets (issue 23): never seen = only the dropped last batch's pairs, twice = 0; >= 127 distinct videos in every
batch of 128; first-decile coverage >= 0.9 x the uniform permutation's; spread >= 0.95; |r| <= 0.1.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

GLOBAL_BATCH = 128
CAPTIONS = 20
PER_SHARD = 200
FRAME_SIZE = 32


def build_split(root: Path, videos: int, captions: int = CAPTIONS, per_shard: int = PER_SHARD) -> Path:
    """A ``train`` split of ``videos`` samples (one small JPEG each, ``captions`` captions) in shards written in video
    order, with index.json and offsets.json; kept when a split of that size is already there."""
    from PIL import Image

    from tvr_bench.data.offsets import write_offsets
    from tvr_bench.data.shards import FORMAT_VERSION, INDEX_FILE, SHARD_PATTERN, ShardFile, encode_sample, read_index, write_json_atomic

    split = root / "train"
    if (split / INDEX_FILE).is_file() and read_index(split)["num_samples"] == videos and (split / "offsets.json").is_file():
        return root
    split.mkdir(parents=True, exist_ok=True)
    for old in split.glob("*"):
        old.unlink()
    rng = np.random.default_rng(0)
    frames = []
    for shade in range(16):  # a few distinct frames, reused: the decode cost is what matters, not the pixels
        pixels = (rng.integers(0, 64, size=(FRAME_SIZE, FRAME_SIZE, 3)) + shade * 12).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=80)
        frames.append(buffer.getvalue())
    infos = []
    for first in range(0, videos, per_shard):
        shard = ShardFile(split / SHARD_PATTERN.format(len(infos)))
        for v in range(first, min(videos, first + per_shard)):
            key = f"v{v:05d}"
            meta = {"format_version": FORMAT_VERSION, "video_id": key, "key": key, "dataset": "perf", "split": "train",
                    "captions": [f"caption {j} of video {v}" for j in range(captions)], "num_frames": 1}  # fmt: skip
            shard.write(encode_sample(key, [frames[v % len(frames)]], meta), captions)
        infos.append(shard.finish().as_dict())
    index = {"format_version": FORMAT_VERSION, "dataset": "perf", "split": "train", "num_frames": 1,
             "sampling": "segment_middle", "short_side": FRAME_SIZE, "num_samples": videos,
             "num_captions": videos * captions, "num_shards": len(infos), "shards": infos}  # fmt: skip
    write_json_atomic(split / INDEX_FILE, index)
    write_offsets(split, index)
    return root


def loader_epoch(root: Path, workers: int, world: int, seed: int = 0) -> dict[str, Any]:
    """One epoch of the training DataModule on ``world`` simulated ranks: global batches as arrays of
    (video index, caption index), and the wall time."""
    from tvr_bench.data.datamodule import RetrievalDataModule

    t0 = time.perf_counter()
    per_rank = []
    for rank in range(world):
        dm = RetrievalDataModule(root=str(root), dataset="perf", num_frames=1, image_size=FRAME_SIZE, batch_size=GLOBAL_BATCH // world,
                                 num_workers=workers, val_split=None, train_stream="pairs", last_batch="drop", seed=seed)  # fmt: skip
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, current_epoch=0)
        batches = []
        for batch in dm.train_dataloader():
            videos = [int(k[1:]) for k in batch["video_key"]]
            captions = [int(c.split(" ", 2)[1]) for c in batch["captions"]]
            batches.append(np.stack([videos, captions], axis=1))
        per_rank.append(batches)
    seconds = time.perf_counter() - t0
    steps = [np.concatenate(step) for step in zip(*per_rank)]
    return {"batches": steps, "seconds": seconds}


def uniform_epoch(videos: int, captions: int = CAPTIONS, seed: int = 0) -> list[np.ndarray]:
    """The reference: a uniform permutation of all pairs cut into batches of 128, the incomplete last one dropped."""
    perm = np.random.default_rng(seed).permutation(videos * captions)
    full = len(perm) // GLOBAL_BATCH * GLOBAL_BATCH
    pairs = np.stack([perm[:full] // captions, perm[:full] % captions], axis=1)
    return list(pairs.reshape(-1, GLOBAL_BATCH, 2))


def order_statistics(batches: list[np.ndarray], videos: int, captions: int = CAPTIONS) -> dict[str, Any]:
    """The section's rows for one epoch of global batches (arrays of (video, caption) rows)."""
    n = len(batches)
    first_decile = {int(v) for b in batches[: max(1, round(0.1 * n))] for v in b[:, 0]}
    first_seen = np.full(videos, -1)
    for j in range(n - 1, -1, -1):
        first_seen[batches[j][:, 0]] = j
    whole_std = np.sqrt((videos**2 - 1) / 12.0)  # std of the indices 0 .. videos-1
    spread = float(np.mean([b[:, 0].std() for b in batches]) / whole_std)
    means = np.array([b[:, 0].mean() for b in batches])
    r = float(np.corrcoef(means[:-1], means[1:])[0, 1]) if n > 2 else float("nan")
    pair_ids = np.concatenate([b[:, 0] * captions + b[:, 1] for b in batches])
    counts = np.bincount(pair_ids, minlength=videos * captions)
    distinct = [len(np.unique(b[:, 0])) for b in batches]
    return {
        "batches": n,
        "videos_in_first_10pct": len(first_decile),
        "batch_last_video_first_seen": int(first_seen.max()) + 1 if (first_seen >= 0).all() else None,
        "videos_never_seen": int((first_seen < 0).sum()),
        "spread": spread,
        "consecutive_mean_corr": r,
        "pairs_never_seen": int((counts == 0).sum()),
        "pairs_seen_twice_or_more": int((counts >= 2).sum()),
        "min_distinct_per_batch": int(min(distinct)),
        "mean_distinct_per_batch": float(np.mean(distinct)),
        "batch_sizes": sorted({len(b) for b in batches}),
    }


#: Loader configurations of the section: (column, workers, ranks).
CONFIGS: tuple[tuple[str, int, int], ...] = (("0 workers", 0, 1), ("2 workers", 2, 1), ("8 workers", 8, 1), ("2 ranks x 2 workers", 2, 2))


def bench_train_order(work: Path, quick: bool = False, videos: int | None = None,
                      configs: tuple[tuple[str, int, int], ...] = CONFIGS) -> dict[str, Any]:  # fmt: skip
    """The five rows (and distinctness) for 0, 2 and 8 workers, 2 ranks x 2 workers, and a uniform permutation."""
    from tvr_bench.perf.harness import TARGETS

    videos = videos or (900 if quick else 9000)
    t0 = time.perf_counter()
    root = build_split(work / f"train-order-{videos}x{CAPTIONS}", videos)
    setup = time.perf_counter() - t0
    dropped = videos * CAPTIONS % GLOBAL_BATCH
    uniform = order_statistics(uniform_epoch(videos), videos)
    runs: dict[str, Any] = {"uniform permutation": {**uniform, "seconds": None}}
    for name, workers, world in configs:
        epoch = loader_epoch(root, workers, world)
        stats = order_statistics(epoch["batches"], videos)
        stats.update(seconds=round(epoch["seconds"], 1), pairs_per_s=round(sum(len(b) for b in epoch["batches"]) / epoch["seconds"], 1))
        runs[name] = stats
    targets = {}
    for name, s in runs.items():
        if name == "uniform permutation":
            continue
        targets[name] = {
            "pairs_once": s["pairs_never_seen"] == dropped and s["pairs_seen_twice_or_more"] == 0,
            "distinct": s["min_distinct_per_batch"] >= TARGETS["train_order_distinct_per_128"],
            "first_decile": s["videos_in_first_10pct"] >= TARGETS["train_order_first_decile_vs_uniform"] * uniform["videos_in_first_10pct"],
            "spread": s["spread"] >= TARGETS["train_order_spread"],
            "correlation": abs(s["consecutive_mean_corr"]) <= TARGETS["train_order_abs_correlation"],
        }
    return {
        "videos": videos,
        "captions": CAPTIONS,
        "global_batch": GLOBAL_BATCH,
        "pairs_in_dropped_last_batch": dropped,
        "runs": runs,
        "targets_met": targets,
        "setup_seconds": round(setup, 1),
        "note": f"{videos:,} videos x {CAPTIONS} captions in shards of {PER_SHARD} written in video order, one "
                f"{FRAME_SIZE} px JPEG frame each; one epoch of the training DataModule (pairs, global batch "
                f"{GLOBAL_BATCH}, last batch dropped) per column, iterated as a run does (2 ranks: two loaders with "
                f"rank 0 and 1 of 2, batch 64 each, their step-wise batches concatenated); the uniform permutation "
                f"is numpy's, computed in the same run. The correlation's standard error is about 1/sqrt(batches) "
                f"({1 / np.sqrt(max(1, videos * CAPTIONS // GLOBAL_BATCH)):.3f} here): judge |r| <= 0.1 at full size.",
    }


_ROWS = (
    ("videos seen in the first 10 % of batches", "videos_in_first_10pct", "{:,}"),
    ("batch in which the last video first appears", "batch_last_video_first_seen", "{}"),
    ("spread of video ids within a batch (uniform = 1)", "spread", "{:.3f}"),
    ("correlation of consecutive batches' mean video id", "consecutive_mean_corr", "{:+.3f}"),
    ("pairs never seen / seen twice in the epoch", None, ""),
    ("fewest distinct videos in a batch of 128 (mean)", None, ""),
    ("pairs/s through the loader", "pairs_per_s", "{:,.0f}"),
)


def _cell(s: dict[str, Any], key: str | None, fmt: str, label: str) -> str:
    """One table cell."""
    if label.startswith("pairs never"):
        return f"{s['pairs_never_seen']:,} / {s['pairs_seen_twice_or_more']:,}"
    if label.startswith("fewest"):
        return f"{s['min_distinct_per_batch']} ({s['mean_distinct_per_batch']:.1f})"
    value = s.get(key or "")
    return "–" if value is None else fmt.format(value)


def render(x: dict[str, Any]) -> list[str]:
    """Markdown lines of the section."""
    names = list(x["runs"])
    lines = [
        f"## Training order ({x['videos']:,} videos × {x['captions']} captions, global batch {x['global_batch']})",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for label, key, fmt in _ROWS:
        lines.append(f"| {label} | " + " | ".join(_cell(x["runs"][n], key, fmt, label) for n in names) + " |")
    checks = []
    for name, t in x["targets_met"].items():
        failed = [k for k, ok in t.items() if not ok]
        checks.append(f"{name} {'✓' if not failed else '✗ (' + ', '.join(failed) + ')'}")
    lines += [
        "",
        f"Targets: pairs never seen = the {x['pairs_in_dropped_last_batch']} of the dropped last batch, none twice; ≥ 127 "
        f"distinct videos in every batch; first-decile coverage ≥ 0.9 × the uniform permutation's; spread ≥ 0.95; "
        f"|r| ≤ 0.1 — " + "; ".join(checks) + ".",
        "",
        x["note"],
        "",
    ]
    return lines
