"""X-CLIP evaluation scorer benchmark: the blocked scorer vs the one-shot math.

Two ways to compute the same [n, n] X-CLIP score matrix from cached (unit-length) features:

* `blocked`: `xclip_similarity_blocked` under a memory budget (cache-sized steps on CPU; with the default
  padding 'masked', items sorted by length and each step cut to its longest member);
* `one_shot`: `xclip_similarity`, the differentiable training math, which holds the whole [n, W, n, F]
  word-frame tensor and the AOSM's copies of it at once (what scoring the test set in one call costs).

The one-shot math at n = 1000, W = 32, F = 12 needs several 1.5 GB copies of that tensor; `one_shot_rows` runs it
on the first rows only (its memory and time grow linearly with the rows, so both are scaled to all rows and marked as
estimates; the measured figures stay in the result).

Distance to the floor: the word-frame products need (real tokens) x (real frames) x D multiply-adds in all
(`work_macs`); each process also times one [1000, 512] x [512, 12000] float32 product and `work_ratio` = blocked
seconds / (work_macs / product rate). Every AOSM pass over the word-frame block adds elementwise work on top of that.

Each run is a fresh process (spawn) so its peak resident memory can be read (`tvr_bench.perf.memory`); the inputs are
rebuilt there from the same seed, and rounds interleave the variants. Inputs: text lengths uniform in [5, words],
all frames real (as the DRL benchmark), AOSM matrices = identity + 0.02 N(0, 1).
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import torch
from torch import Tensor

from tvr_bench.functional.xclip import AOSMWeights, normalise, video_level, xclip_similarity, xclip_similarity_blocked
from tvr_bench.perf.drl_scorer import time_product
from tvr_bench.perf.memory import peak_rss_bytes, reset_peak_rss

VARIANTS = ("blocked", "one_shot")


def make_inputs(n: int, words: int, frames: int, d: int, seed: int = 0) -> dict[str, Any]:
    """Unit-length sentence, word, video and frame features with masks, and perturbed AOSM matrices (seeded)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min(5, words), words + 1, (n,), generator=g)
    word_mask = torch.arange(words)[None] < lengths[:, None]
    frame_mask = torch.ones(n, frames, dtype=torch.bool)
    weights = AOSMWeights(d, words, frames)
    with torch.no_grad():
        for p in weights.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    content = torch.randn(n, 1, d, generator=g)
    frame_feats = normalise(content + 0.5 * torch.randn(n, frames, d, generator=g))
    word_feats = normalise(content + torch.randn(n, words, d, generator=g))
    return {
        "sentence": normalise(content[:, 0] + 0.5 * torch.randn(n, d, generator=g)),
        "words": word_feats,
        "word_mask": word_mask,
        "video": video_level(frame_feats, frame_mask),
        "frames": frame_feats,
        "frame_mask": frame_mask,
        "weights": weights,
    }


def _args(x: dict[str, Any], rows: int | None = None) -> tuple[Tensor, ...]:
    t = slice(None, rows)
    return (x["sentence"][t], x["words"][t], x["word_mask"][t], x["video"], x["frames"], x["frame_mask"])


def work_macs(x: dict[str, Any]) -> float:
    """Multiply-adds of the word-frame products: (real tokens) x (real frames) x D over all text-video pairs."""
    return float(x["word_mask"].sum()) * float(x["frame_mask"].sum()) * x["words"].shape[-1]


def run_variant(
    variant: str, n: int, words: int, frames: int, d: int, budget_mb: float, padding: str, seed: int,
    threads: int | None, one_shot_rows: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Warm up on 32 items, then time one full run of `variant` in this process; time, peak memory, the matrix and
    the product time measured in this process before and after."""
    if threads:
        torch.set_num_threads(threads)
    x = make_inputs(n, words, frames, d, seed)
    budget = int(budget_mb * 2**20)
    rows = None if one_shot_rows is None or one_shot_rows >= n else one_shot_rows
    w = x["weights"]
    fns = {
        "blocked": lambda k=None: xclip_similarity_blocked(*_args(x, k), w, padding, max_bytes=budget),
        "one_shot": lambda k=None: xclip_similarity(*_args(x, k), w, padding),
    }
    fn = fns[variant]
    product = [time_product()]
    extra: dict[str, Any] = {}
    with torch.no_grad():
        warm = {k: (v[:32] if isinstance(v, Tensor) else v) for k, v in x.items()}
        (xclip_similarity_blocked if variant == "blocked" else xclip_similarity)(*_args(warm), w, padding)
        base = reset_peak_rss()  # high-water mark reset: import/input peaks do not hide the call's own
        start = time.perf_counter()
        sim = fn(rows if variant == "one_shot" else None)
        seconds = time.perf_counter() - start
        peak = peak_rss_bytes()
    peak_extra = max(0, peak - base)
    if variant == "one_shot" and rows:
        extra = {"rows_run": rows, "seconds_measured": seconds, "peak_extra_mib_measured": peak_extra / 2**20,
                 "estimated_from_rows": True}  # fmt: skip
        seconds *= n / rows
        peak_extra = int(peak_extra * n / rows)
    product.append(time_product())
    return {
        "seconds": seconds,
        **extra,
        "peak_rss_mib": peak / 2**20,
        "peak_extra_mib": peak_extra / 2**20,
        "threads": torch.get_num_threads(),
        "product_seconds": product,
        "work_macs": work_macs(x),
        "sim": sim,
    }


def bench_xclip(
    n: int = 1000,
    words: int = 32,
    frames: int = 12,
    d: int = 512,
    repeats: int = 2,
    budget_mb: float = 1024.0,
    padding: str = "masked",
    seed: int = 0,
    threads: int | None = None,
    variants: tuple[str, ...] = VARIANTS,
    one_shot_rows: int | None = None,
) -> dict[str, Any]:
    """Time the blocked X-CLIP scorer vs the one-shot math on CPU: seconds, peak memory, max |diff| and the blocked
    scorer's distance to its floor (word-frame work at the product rate measured in the same processes).

    Rounds interleave the variants (each in a fresh process) so that a noisy machine slows both alike; the median
    over rounds is reported.
    """
    out: dict[str, Any] = {
        "n": n, "words": words, "frames": frames, "d": d, "budget_mb": budget_mb, "repeats": repeats, "padding": padding,
        "note": "median over interleaved rounds, each variant in a fresh process after a 32-item warm-up; "
                "peak_extra_mib = RSS growth over the inputs; text lengths uniform in [5, words], all frames real",
    }  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    sims: dict[str, Tensor] = {}
    for _ in range(repeats):
        for variant in variants:
            with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                args = (variant, n, words, frames, d, budget_mb, padding, seed, threads, one_shot_rows)
                res = pool.submit(run_variant, *args).result()
            sims[variant] = res.pop("sim")
            runs[variant].append(res)
    products: list[float] = []
    for variant, rs in runs.items():
        out[variant] = {
            "seconds": statistics.median(r["seconds"] for r in rs),
            "seconds_all": [round(r["seconds"], 3) for r in rs],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
            "peak_extra_mib": max(r["peak_extra_mib"] for r in rs),
            "threads": rs[0]["threads"],
        }
        for key in ("rows_run", "seconds_measured", "peak_extra_mib_measured", "estimated_from_rows"):
            if key in rs[0]:
                out[variant][key] = rs[0][key] if key in ("rows_run", "estimated_from_rows") else statistics.median(r[key] for r in rs)
        products += [p for r in rs for p in r["product_seconds"]]
        out["work_macs"] = rs[0]["work_macs"]
    if "blocked" in sims and "one_shot" in sims:
        rows = sims["one_shot"].shape[0]
        out["max_abs_diff"] = float((sims["blocked"][:rows] - sims["one_shot"]).abs().max())
        out["speedup_blocked_vs_one_shot"] = out["one_shot"]["seconds"] / out["blocked"]["seconds"]
        out["memory_ratio_blocked_vs_one_shot"] = out["blocked"]["peak_extra_mib"] / max(1e-9, out["one_shot"]["peak_extra_mib"])
    out["product_seconds"] = statistics.median(products)
    rate = 1000 * 512 * 12000 / out["product_seconds"]
    out["work_floor_seconds"] = out["work_macs"] / rate
    if "blocked" in out:
        out["work_ratio"] = out["blocked"]["seconds"] / out["work_floor_seconds"]
        out["blocked_within_budget"] = out["blocked"]["peak_extra_mib"] <= budget_mb
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(bench_xclip(), indent=2))
