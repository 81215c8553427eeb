"""Peak memory of the training DataModule (issues 12 and 23): `tvr-bench perf --sections data-memory`.

A training loader with 8 workers holds, per rank: the main process (with the epoch's order and the offsets
index: a few MB at MSR-VTT size); in every worker the JPEG bytes and the uint8 buffer of the batch it is
decoding (samples are read by offset: no pool of undecoded videos); and up to ``num_workers *
prefetch_factor`` decoded uint8 batches waiting in shared memory. The benchmark prepares shards of the perf
clips at 12 and 64 frames (segment_middle, short side 224), copies the samples to a split of
``4 x workers x batch`` videos, runs the default-configured loader in a fresh process and samples the
proportional set size (PSS: shared pages split between the processes sharing them, so forked workers are
not counted several times) of the process and its workers, summed, every 0.1 s. RSS summed over the
processes is reported beside it (an upper bound). Targets per rank (issue 23): <= 2 GiB at 12 frames,
<= 3 GiB at 64 frames.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from tvr_bench.perf.harness import TARGETS, in_fresh_process, make_clips

GIB = 2**30
MIB = 2**20


def _proc_kib(pid: int, field: str, name: str) -> int:
    """A ``field:  N kB`` line of ``/proc/<pid>/<name>`` in bytes (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def process_tree(pid: int | None = None) -> list[int]:
    """``pid`` (default: this process) and its descendants, from ``/proc/<pid>/task/*/children`` (Linux)."""
    root = os.getpid() if pid is None else pid
    out, todo = [], [root]
    while todo:
        current = todo.pop()
        out.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
    return out


def tree_memory() -> tuple[int, int]:
    """(PSS, RSS) in bytes, summed over this process and its descendants."""
    pids = process_tree()
    return sum(_proc_kib(p, "Pss", "smaps_rollup") for p in pids), sum(_proc_kib(p, "VmRSS", "status") for p in pids)


def replicated_split(clips: list[Path], root: Path, split: str, *, num_frames: int, sampling: str, videos: int,
                     per_shard: int) -> Path:
    """Shards of the clips (``sampling``, ``num_frames`` frames, short side 224, q95) under ``root/source``, then a
    ``split`` of ``videos`` samples in shards of ``per_shard`` (copies of the clips under new keys), unless a split
    of that size is already there."""
    from tvr_bench.data.prepare import PrepareConfig, VideoRecord, prepare
    from tvr_bench.data.shards import INDEX_FILE, SHARD_PATTERN, ShardFile, iter_shard, parse_sample, read_index, write_json_atomic

    if (root / split / INDEX_FILE).is_file() and read_index(root / split)["num_samples"] == videos:
        return root
    src = root / "source"
    if not (src / "clips" / INDEX_FILE).is_file():
        records = [VideoRecord(p.stem, p, [f"perf clip {p.stem}"], "clips") for p in clips]
        config = PrepareConfig(dataset="perf", num_frames=num_frames, sampling=sampling, short_side=224,
                               jpeg_quality=95, shard_size=len(records))  # fmt: skip
        prepare(records, src, config, workers=1, progress=False)
    samples = []
    for entry in read_index(src / "clips")["shards"]:
        for raw in iter_shard(src / "clips" / entry["file"]):
            samples.append({k: v for k, v in raw.items() if k == "__key__" or not k.startswith("__")})
    split_dir = root / f"{split}.tmp"
    shutil.rmtree(split_dir, ignore_errors=True)
    split_dir.mkdir(parents=True)
    infos = []
    for first in range(0, videos, per_shard):
        shard = ShardFile(split_dir / SHARD_PATTERN.format(len(infos)))
        for i in range(first, min(videos, first + per_shard)):
            sample = samples[i % len(samples)]
            meta, _ = parse_sample(sample)
            shard.write({**sample, "__key__": f"{sample['__key__']}-c{i}"}, len(meta["captions"]))
        infos.append(shard.finish().as_dict())
    index = read_index(src / "clips")
    index.update(split=split, shards=infos, num_shards=len(infos), num_samples=videos,
                 num_captions=sum(i["num_captions"] for i in infos))  # fmt: skip
    write_json_atomic(split_dir / INDEX_FILE, index)
    shutil.rmtree(root / split, ignore_errors=True)
    os.replace(split_dir, root / split)
    return root


def prepare_train_shards(clips: list[Path], root: Path, num_frames: int, videos: int, per_shard: int = 64) -> Path:
    """A ``train`` split of ``videos`` samples of the clips at ``num_frames`` frames (segment_middle)."""
    return replicated_split(clips, root, "train", num_frames=num_frames, sampling="segment_middle", videos=videos,
                            per_shard=per_shard)


def measure_loader_memory(root: str, num_frames: int, workers: int, batch_size: int, batches: int, **overrides: Any) -> dict[str, Any]:
    """Iterate ``batches`` training batches of a DataModule over ``root`` (defaults, or ``overrides`` of its init
    args) while sampling the summed PSS / RSS of this process and its workers; run it in a fresh process."""
    import multiprocessing

    from tvr_bench.data.datamodule import RetrievalDataModule

    # A process started by `spawn` (perf's fresh processes) inherits `spawn` as its default start method, so its
    # DataLoader workers would be spawned: each re-imports torch (measured: 1.69 GiB at 12 frames instead of 0.65).
    # A training run starts its workers with the platform's default (fork on Linux): measure that.
    multiprocessing.set_start_method(multiprocessing.get_all_start_methods()[0], force=True)
    args: dict[str, Any] = dict(root=root, dataset="perf", num_frames=num_frames, image_size=224, batch_size=batch_size,
                                num_workers=workers, val_split=None, train_stream="videos")  # fmt: skip
    dm = RetrievalDataModule(**{**args, **overrides})
    base_pss, base_rss = tree_memory()
    peak = {"pss": base_pss, "rss": base_rss}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            pss, rss = tree_memory()
            peak["pss"], peak["rss"] = max(peak["pss"], pss), max(peak["rss"], rss)
            done.wait(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    seen = 0
    for batch in dm.train_dataloader():
        seen += 1
        if seen >= batches:
            break
    seconds = time.perf_counter() - t0
    done.set()
    thread.join()
    batch_bytes = batch_size * num_frames * 3 * 224 * 224
    return {
        "frames": num_frames,
        "workers": workers,
        "batch_size": batch_size,
        "batches": seen,
        "seconds": round(seconds, 1),
        "baseline_pss_gib": base_pss / GIB,
        "peak_pss_gib": peak["pss"] / GIB,
        "peak_rss_sum_gib": peak["rss"] / GIB,
        "uint8_batch_mib": batch_bytes / MIB,
        "prefetch_factor": dm.prefetch_factor,
        "batches_in_flight_max": workers * dm.prefetch_factor + 1,  # prefetched per worker + the one handed out
    }


def memory_target_gib(num_frames: int) -> float:
    """Peak PSS per rank allowed with 8 workers and the defaults (issue 23): 2 GiB up to 12 frames, 3 GiB beyond."""
    return TARGETS["data_memory_gib_per_rank"] if num_frames <= 12 else TARGETS["data_memory_gib_per_rank_64_frames"]


def bench_data_memory(work: Path, sizes: Any, frames: tuple[int, ...] = (12, 64), workers: int = 8, batch_size: int = 16) -> dict[str, Any]:
    """Peak memory (PSS summed over the process and its workers) of the training DataModule at each frame count."""
    tag = f"{sizes.clips}x{sizes.clip_width}x{sizes.clip_height}@{sizes.clip_fps}x{sizes.clip_seconds}s"
    clips = make_clips(work / f"clips-{tag}", sizes)
    out: dict[str, Any] = {"runs": {}, "targets_met": {}, "targets_gib": {}}
    for f in frames:
        root = work / f"memory-{tag}-{f}f"
        per_frame = _jpeg_bytes_per_frame(clips, root, f)
        videos = 4 * workers * batch_size  # more than the 3 batches per worker iterated
        prepare_train_shards(clips, root, f, videos)
        run = in_fresh_process(measure_loader_memory, str(root), f, workers, batch_size, 3 * workers)
        run.update(videos=videos, jpeg_kib_per_frame=per_frame / 1024)
        out["runs"][f"{f}_frames"] = run
        out["targets_gib"][f"{f}_frames"] = memory_target_gib(f)
        out["targets_met"][f"{f}_frames"] = run["peak_pss_gib"] <= memory_target_gib(f)
    out["note"] = (
        "peak PSS of the process + its DataLoader workers (summed) while iterating 3 batches per worker of a "
        "default-configured training DataModule (samples read by offset, prefetch_factor 2), per rank; memory = "
        "main process + per worker the batch it decodes + uint8 batches in flight (<= prefetch_factor x workers + 1 "
        "batches of batch x frames x 3 x 224 x 224 bytes)."
    )
    return out


def _jpeg_bytes_per_frame(clips: list[Path], root: Path, num_frames: int) -> float:
    """Mean stored JPEG size of the clips prepared at ``num_frames`` (prepares the source split if needed)."""
    from tvr_bench.data.shards import read_index

    prepare_train_shards(clips, root, num_frames, len(clips))
    index = read_index(root / "source" / "clips")
    return sum(s["bytes"] for s in index["shards"]) / max(1, index["num_samples"] * num_frames)
