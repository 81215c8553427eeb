"""The data sections of `tvr-bench perf`: `data` (loader speed) and `data-memory` (the training loader's peak memory).

**data**: clips/s of the shard DataModule (12 stored JPEGs per clip, 224 px) vs decoding the same mp4
files per item the reference way (PyAV decode, 1 fps frames, resize, crop, normalise, pick 12) vs the
bare JPEG-decode ceiling of the very frames the shards store. Rounds interleave the three.

**data-memory**: peak memory of the training DataModule (issues 12 and 23): `tvr-bench perf --sections data-memory`.

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

import numpy as np
import torch
from torch import Tensor

from tvr_bench.perf.harness import TARGETS, PerfSizes, _fmt, _mark, in_fresh_process, make_clips, median

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


# ================================================================================================ data
def prepare_clip_shards(clips: list[Path], root: Path, copies: int) -> Path:
    """Prepare the clips into shards (fps1_uniform, 12 frames, short side 224, the suite's defaults), then a
    `test` split holding `copies` copies of each sample under new keys (more clips per pass, same frames)."""
    return replicated_split(clips, root, "test", num_frames=12, sampling="fps1_uniform", videos=copies * len(clips),
                            per_shard=max(1, len(clips)))


def _clip_transform(image: Any, size: int) -> np.ndarray:
    """CLIP's eval transform of one PIL frame: short side to `size` (bicubic), centre crop -> uint8 [H, W, 3]."""
    from tvr_bench.data.video import resize_short_side

    image = resize_short_side(image, size)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)).convert("RGB"))


def decode_per_item(path: Path, num_frames: int = 12, size: int = 224, seek: bool = True) -> Tensor:
    """Per-item decoding the reference loaders' way -> normalised float [F, 3, size, size].

    One frame per second (CLIP4Clip's `RawVideoExtractorCV2` at `framerate=1`): with `seek` (the reference),
    a seek to each second's frame (`CAP_PROP_POS_FRAMES`: back to the previous key frame, decode forward);
    without, one sequential decode pass (cheaper than the reference). Every 1-fps frame is resized,
    centre-cropped and normalised, then `num_frames` are picked uniformly.
    """
    import av

    from tvr_bench.data.frames import fps1_uniform, uniform_pick
    from tvr_bench.data.transforms import normalize

    kept = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        wanted = fps1_uniform(stream.frames, fps, 10**9)  # every 1-fps frame
        if seek:
            tb, start = stream.time_base, stream.start_time or 0
            for index in wanted:
                target = start + int(round(index / fps / tb))
                container.seek(target, stream=stream, backward=True, any_frame=False)
                for frame in container.decode(stream):
                    if frame.pts is not None and frame.pts >= target:
                        kept.append(_clip_transform(frame.to_image(), size))
                        break
        else:
            want, last = set(wanted), max(wanted)
            for i, frame in enumerate(container.decode(stream)):
                if i in want:
                    kept.append(_clip_transform(frame.to_image(), size))
                if i >= last:
                    break
    clip = normalize(torch.from_numpy(np.ascontiguousarray(np.stack(kept).transpose(0, 3, 1, 2))))
    return clip[uniform_pick(len(kept), num_frames)]


def _stored_jpegs(root: Path) -> list[list[bytes]]:
    """The JPEG bytes of every sample of the `test` split, read into memory."""
    from tvr_bench.data.shards import iter_shard, parse_sample, read_index

    out = []
    for entry in read_index(root / "test")["shards"]:
        for raw in iter_shard(root / "test" / entry["file"]):
            out.append(parse_sample(raw)[1])
    return out


def bench_data(work: Path, sizes: PerfSizes) -> dict[str, Any]:
    """Clips/s: shard DataModule (0 and 2 workers) vs per-item mp4 decoding vs the bare JPEG-decode ceiling."""
    from tvr_bench.data.datamodule import RetrievalDataModule
    from tvr_bench.data.transforms import decode_jpeg

    start = time.perf_counter()
    tag = f"{sizes.clips}x{sizes.clip_width}x{sizes.clip_height}@{sizes.clip_fps}x{sizes.clip_seconds}s"
    clips = make_clips(work / f"clips-{tag}", sizes)
    root = prepare_clip_shards(clips, work / f"shards-{tag}-x{sizes.copies}", sizes.copies)
    setup_seconds = time.perf_counter() - start
    jpegs = _stored_jpegs(root)

    def datamodule(workers: int) -> float:
        dm = RetrievalDataModule(root=str(root), dataset="perf", num_frames=12, image_size=224,
                                 eval_batch_size=16, num_workers=workers)  # fmt: skip
        t0 = time.perf_counter()
        n = sum(len(batch["video_key"]) for batch in dm.test_dataloader())
        assert n == len(jpegs), f"the DataModule yielded {n} clips, the split holds {len(jpegs)}"
        return n / (time.perf_counter() - t0)

    def train_loader() -> float:
        """The training loader (0 workers) over the same samples: global order, reads by offset (issue 23)."""
        dm = RetrievalDataModule(root=str(root), dataset="perf", num_frames=12, image_size=224, batch_size=16,
                                 num_workers=0, train_split="test", val_split=None, train_stream="videos",
                                 last_batch="keep")  # fmt: skip
        t0 = time.perf_counter()
        n = sum(len(batch["video_key"]) for batch in dm.train_dataloader())
        assert n == len(jpegs), f"the training loader yielded {n} clips, the split holds {len(jpegs)}"
        return n / (time.perf_counter() - t0)

    def per_item(seek: bool) -> float:
        t0 = time.perf_counter()
        for path in clips:
            out = decode_per_item(path, seek=seek)
            assert out.shape == (12, 3, 224, 224), out.shape
        return len(clips) / (time.perf_counter() - t0)

    def ceiling() -> float:
        t0 = time.perf_counter()
        for frames in jpegs:
            for data in frames:
                decode_jpeg(data)
        return len(jpegs) / (time.perf_counter() - t0)

    names = ("per_item_decoder", "per_item_sequential", "jpeg_ceiling", "datamodule_0_workers", "datamodule_1_worker",
             "datamodule_2_workers", "datamodule_train_0_workers")  # fmt: skip
    runs: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(sizes.data_rounds):
        runs["per_item_decoder"].append(per_item(seek=True))
        runs["per_item_sequential"].append(per_item(seek=False))
        runs["jpeg_ceiling"].append(ceiling())
        runs["datamodule_0_workers"].append(datamodule(0))
        runs["datamodule_1_worker"].append(datamodule(1))
        runs["datamodule_2_workers"].append(datamodule(2))
        runs["datamodule_train_0_workers"].append(train_loader())
    rate = {k: median(v) for k, v in runs.items()}
    dm0, dm1, dm2 = rate["datamodule_0_workers"], rate["datamodule_1_worker"], rate["datamodule_2_workers"]
    ratios = {
        "datamodule_vs_per_item": dm0 / rate["per_item_decoder"],
        "datamodule_vs_per_item_sequential": dm0 / rate["per_item_sequential"],
        "datamodule_vs_ceiling": dm0 / rate["jpeg_ceiling"],
        "datamodule_2w_vs_per_item": dm2 / rate["per_item_decoder"],
        "datamodule_2w_vs_ceiling": dm2 / rate["jpeg_ceiling"],
        "datamodule_2w_vs_1w": dm2 / dm1,
        "datamodule_train_vs_ceiling": rate["datamodule_train_0_workers"] / rate["jpeg_ceiling"],
    }
    return {
        "clips_per_s": rate,
        "clips_per_s_all": {k: [round(x, 2) for x in v] for k, v in runs.items()},
        "ratios": ratios,
        "targets_met": {
            "vs_per_item_decoder": ratios["datamodule_vs_per_item"] >= TARGETS["data_vs_per_item_decoder"],
            "vs_jpeg_ceiling": ratios["datamodule_vs_ceiling"] >= TARGETS["data_vs_jpeg_ceiling"],
            "2_vs_1_worker": ratios["datamodule_2w_vs_1w"] >= TARGETS["data_2_vs_1_worker"],
        },
        "setup": {"clips": len(clips), "samples_in_split": len(jpegs), "copies": sizes.copies,
                  "clip": tag, "setup_seconds": round(setup_seconds, 1), "work_dir": str(root)},  # fmt: skip
        "note": "median clips/s over interleaved rounds, every figure from one process (DataModule also with 2 "
                "workers). per_item_decoder: the reference loaders' way (CLIP4Clip RawVideoExtractorCV2, "
                "framerate 1): PyAV seek to each second's frame and decode forward from the key frame before it, "
                "PIL bicubic resize + centre crop of every 1-fps frame, normalise, pick 12 uniformly. "
                "per_item_sequential: the same with one sequential decode pass instead of seeks (cheaper than the "
                "reference). datamodule: RetrievalDataModule test loader over shards of the same clips (12 JPEGs "
                "at short side 224, fps1_uniform, q95; each clip stored `copies` times), batches of 16 uint8 "
                "[12,3,224,224] clips (normalised on the device by on_after_batch_transfer, not timed here), incl. tar "
                "reading and worker start-up; 0, 1 and 2 workers. datamodule_train_0_workers: the training loader "
                "over the same split (videos stream, the epoch's order computed, each sample read by its byte "
                "offset). jpeg_ceiling: PIL decode of the "
                "same stored JPEGs from memory (no crop, no normalisation).",
    }  # fmt: skip


def render(d: dict[str, Any]) -> list[str]:
    """Markdown lines of the data section."""
    r, c = d["ratios"], d["clips_per_s"]
    return [
        f"## Data ({d['setup']['clip']} mp4 clips → 12 frames at 224 px)",
        "",
        "| loader | clips/s | ratio |",
        "|---|---|---|",
        f"| per-item mp4 decoder, reference way (seek per 1-fps frame) | {_fmt(c['per_item_decoder'])} | 1 |",
        f"| per-item mp4 decoder, one sequential pass | {_fmt(c['per_item_sequential'])} | "
        f"{_fmt(c['per_item_sequential'] / c['per_item_decoder'], 1)}× |",
        f"| **shard DataModule, 0 workers** | {_fmt(c['datamodule_0_workers'])} | **{_fmt(r['datamodule_vs_per_item'], 1)}×** "
        f"({_fmt(r['datamodule_vs_per_item_sequential'], 1)}× the sequential pass) |",
        f"| shard DataModule, 1 worker | {_fmt(c.get('datamodule_1_worker'))} | "
        f"{_fmt(c['datamodule_1_worker'] / c['per_item_decoder'], 1) if 'datamodule_1_worker' in c else '–'}× |",
        f"| shard DataModule, 2 workers | {_fmt(c['datamodule_2_workers'])} | {_fmt(r['datamodule_2w_vs_per_item'], 1)}×; "
        f"**{_fmt(r.get('datamodule_2w_vs_1w'))}×** the 1-worker rate |",
        f"| training loader, 0 workers (global order, reads by offset) | {_fmt(c.get('datamodule_train_0_workers'))} | "
        f"{_fmt(r.get('datamodule_train_vs_ceiling'))} of the ceiling |",
        f"| bare JPEG-decode ceiling (same frames, from memory) | {_fmt(c['jpeg_ceiling'])} | "
        f"{_fmt(c['jpeg_ceiling'] / c['per_item_decoder'], 1)}×; DataModule (0 workers) = **{_fmt(r['datamodule_vs_ceiling'])}** of it |",
        "",
        f"Targets: ≥ 20× the per-item decoder {_mark(d['targets_met']['vs_per_item_decoder'])}; "
        f"≥ {TARGETS['data_vs_jpeg_ceiling']} of the ceiling {_mark(d['targets_met']['vs_jpeg_ceiling'])}; "
        f"2 workers ≥ {TARGETS['data_2_vs_1_worker']}× 1 worker {_mark(d['targets_met'].get('2_vs_1_worker'))} "
        f"(a 2-core machine shared with other jobs cannot show 2× unless idle: see the load average).",
        "",
    ]


def render_memory(m: dict[str, Any]) -> list[str]:
    """Markdown lines of the data-memory section."""
    lines = ["## Data memory (training DataModule, 8 workers, per rank)", "",
             "| frames | batch | peak PSS GiB | summed RSS GiB | uint8 batch MiB | batches in flight | target |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in m["runs"].items():
        target = m.get("targets_gib", {}).get(name, TARGETS["data_memory_gib_per_rank"])
        lines.append(f"| {r['frames']} | {r['batch_size']} | {_fmt(r['peak_pss_gib'])} | {_fmt(r['peak_rss_sum_gib'])} | "
                     f"{_fmt(r['uint8_batch_mib'], 0)} | ≤ {r.get('batches_in_flight_max', '?')} | ≤ {_fmt(target, 0)} GiB "
                     f"{_mark(m['targets_met'][name])} |")  # fmt: skip
    return lines + ["", m["note"], ""]

