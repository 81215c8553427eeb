"""What every `tvr-bench perf` section shares: the report's schema and targets, the run sizes, the machine and load
readers, fresh-process runs, the median, the generated mp4 clips and the Markdown number formatting.

It imports no other perf module (sections import it; perf/run.py, the registry and CLI, imports the sections).
"""

from __future__ import annotations

import os
import platform
import statistics
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

SCHEMA = "tvr-bench/perf/v1"

#: Targets of issue 8 (ratios; see docs/scaling.md) and of the sections that read them from here; the search and
#: post-processing sections keep their own (perf/run.py merges them into the report's `targets`).
TARGETS = {
    "data_vs_per_item_decoder": 20.0,  # at least 20x the per-item mp4 decoder
    "data_vs_jpeg_ceiling": 0.8,  # at least 0.8 of the bare JPEG-decode ceiling (issue 15 item 1; was 0.5)
    "data_2_vs_1_worker": 1.7,  # 2 workers at least 1.7x the 1-worker rate (issue 15 item 1)
    "data_memory_gib_per_rank": 2.0,  # training DataModule with 8 workers under 2 GiB per rank at 12 frames (issues 12, 23)
    "data_memory_gib_per_rank_64_frames": 3.0,  # ... and under 3 GiB at 64 frames (issue 23)
    "train_order_first_decile_vs_uniform": 0.9,  # train-order section (issue 23): videos seen in the first 10 % of batches
    "train_order_spread": 0.95,  # within-batch spread of video ids (uniform = 1)
    "train_order_abs_correlation": 0.1,  # |r| of consecutive batches' mean video id
    "train_order_distinct_per_128": 127,  # distinct videos in every batch of 128
    "eval_max_abs_diff": 1e-5,
    "eval_memory_ratio": 1 / 8,  # blocked peak memory at most 1/8 of the one-shot peak
    "eval_speed_ratio": 1.0,  # blocked no slower than one-shot
    "eval_fast_vs_one_shot": 50.0,  # X-Pool and T-MASS fast scorers at least 50x the one-shot math (issue 15 item 2)
    "drl_work_ratio": 1.3,  # DRL token-wise scoring within 1.3x of its work at the same run's product rate
    "drl_memory_vs_reference_loop": 1.0,  # DRL blocked peak memory at most the reference loop's
    "train_overhead": 0.05,  # Lightning at most 5% slower per step than a plain loop
}


@dataclass(frozen=True)
class PerfSizes:
    """Sizes of one perf run (`full` is the issue's definition, `quick` a smoke version)."""

    clips: int = 8
    clip_width: int = 640
    clip_height: int = 360
    clip_fps: int = 30
    clip_seconds: int = 15
    copies: int = 16
    data_rounds: int = 3
    eval_n: int = 1000
    eval_repeats: int = 2
    tmass_repeats: int = 1  # its one-shot oracle takes minutes at N = 1000: 1 warm-up + 1 timed run
    drl_reference_loop: bool = False
    metrics_n: int = 1000
    metrics_repeats: int = 5
    train_batch: int = 16
    train_steps: int = 24
    train_warmup: int = 3


FULL = PerfSizes()
QUICK = PerfSizes(
    clips=4, clip_width=480, clip_height=270, clip_fps=30, clip_seconds=12, copies=8, data_rounds=2, eval_n=250,
    eval_repeats=1, tmass_repeats=1, metrics_n=1000, metrics_repeats=3, train_batch=8, train_steps=8,
    train_warmup=2,
)  # fmt: skip


def _cpu_name() -> str:
    """The CPU model name (Linux /proc/cpuinfo), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU, cores, torch threads, accelerator and versions of this machine."""
    import lightning

    info: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return info


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where unavailable)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def in_fresh_process(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run `fn(*args)` in a new spawned process (its own peak RSS) and return its result."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def median(xs: list[float]) -> float:
    """Median of a non-empty list."""
    return float(statistics.median(xs))


def make_clips(out_dir: Path, sizes: PerfSizes, seed: int = 0) -> list[Path]:
    """Encode `sizes.clips` H.264 mp4s unless they exist: a scrolling smooth texture under a gradient, three
    moving textured boxes and mild sensor noise, x264 `veryfast` CRF 23 with its default GOP (web-like)."""
    import av
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    w, h, fps = sizes.clip_width, sizes.clip_height, sizes.clip_fps
    n_frames = fps * sizes.clip_seconds
    paths = []
    for i in range(sizes.clips):
        path = out_dir / f"clip{i:03d}.mp4"
        paths.append(path)
        if path.is_file():
            continue
        rng = np.random.default_rng([seed, i])
        coarse = (rng.random((h // 16 + 3, (w + 2 * n_frames) // 16 + 3, 3)) * 255).astype(np.uint8)
        size = (coarse.shape[1] * 16, coarse.shape[0] * 16)
        texture = np.asarray(Image.fromarray(coarse).resize(size, Image.BICUBIC), dtype=np.float32)[:h]
        ramp = np.linspace(0, 200, w, dtype=np.float32)[None, :, None] * rng.uniform(0.2, 1.0, 3).astype(np.float32)
        noise = [rng.normal(0, 2.5, (h, w, 1)).astype(np.float32) for _ in range(8)]
        bw, bh = w // 5, h // 4
        boxes = [(rng.uniform(0, w - bw), rng.uniform(0, h - bh), rng.uniform(-4, 4), rng.uniform(-3, 3),
                  rng.uniform(0, 255, 3).astype(np.float32)) for _ in range(3)]  # fmt: skip
        tmp = path.with_name(path.stem + ".tmp.mp4")
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            stream.options = {"preset": "veryfast", "crf": "23"}
            for f in range(n_frames):
                img = 0.7 * texture[:, 2 * f : 2 * f + w] + 0.3 * ramp + noise[f % 8]
                for x0, y0, dx, dy, colour in boxes:
                    x, y = int((x0 + dx * f) % (w - bw)), int((y0 + dy * f) % (h - bh))
                    img[y : y + bh, x : x + bw] = colour - 40 + 0.3 * texture[y : y + bh, x : x + bw]
                frame = av.VideoFrame.from_ndarray(np.clip(img, 0, 255).astype(np.uint8), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    return paths


# ================================================================================================ Markdown
def _fmt(x: float | None, digits: int = 2) -> str:
    """A number for the Markdown table."""
    if x is None:
        return "n/a"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}f}"


def _mark(ok: bool | None) -> str:
    """✓ / ✗ for a target."""
    return "n/a" if ok is None else ("✓" if ok else "✗")

