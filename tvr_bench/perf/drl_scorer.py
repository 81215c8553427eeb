"""DRL evaluation scorer benchmark: our blocked WTI scorer vs one-shot and vs the reference's loop.

Three ways to compute the same [n, n] WTI score matrix from cached features:

* `blocked`: token weights once per text / video, features normalised once, then
  `wti_similarity_blocked` under a memory budget (length-sorted chunks, one matmul per chunk);
* `one_shot`: the same math in one [n, L, n, F] tensor (`wti_similarity`);
* `reference_loop`: the reference's `_run_on_single_gpu` pattern re-implemented: 32 x 32 blocks,
  each recomputing both weight MLPs, the normalisation and the masked einsum of its block.

Each run is a fresh process (spawn) so its peak resident memory can be read; the inputs are
rebuilt there from the same seed, and rounds interleave the variants. Inputs follow perf anchor (c): text lengths uniform in
[5, words], all frames real.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import torch
from torch import Tensor, nn

from tvr_bench.functional.drl import (
    normalise_masked,
    token_weights,
    weight_mlp,
    wti_similarity,
    wti_similarity_blocked,
)
from tvr_bench.perf.memory import peak_rss_bytes, reset_peak_rss

VARIANTS = ("blocked", "one_shot", "reference_loop")


def make_inputs(n: int, words: int, frames: int, d: int, seed: int = 0) -> dict[str, Any]:
    """Random token/frame features, masks and two perturbed weight MLPs (deterministic in `seed`)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min(5, words), words + 1, (n,), generator=g)
    text_mask = torch.arange(words)[None] < lengths[:, None]
    video_mask = torch.ones(n, frames, dtype=torch.bool)
    torch.manual_seed(seed)
    mlps = []
    for _ in range(2):
        mlp = weight_mlp(d)
        with torch.no_grad():
            for p in mlp.parameters():
                p.normal_(0.0, 0.3 / d**0.5, generator=g)
        mlps.append(mlp.eval())
    return {
        "text": torch.randn(n, words, d, generator=g),
        "text_mask": text_mask,
        "video": torch.randn(n, frames, d, generator=g),
        "video_mask": video_mask,
        "text_mlp": mlps[0],
        "video_mlp": mlps[1],
    }


def score_blocked(x: dict[str, Any], max_bytes: int) -> Tensor:
    """Weights and normalisation once, then the memory-bounded chunked scorer."""
    tw = token_weights(x["text"], x["text_mask"], x["text_mlp"])
    vw = token_weights(x["video"], x["video_mask"], x["video_mlp"])
    return wti_similarity_blocked(
        normalise_masked(x["text"], x["text_mask"]), tw, x["text_mask"],
        normalise_masked(x["video"], x["video_mask"]), vw, x["video_mask"], max_bytes=max_bytes,
    )


def score_one_shot(x: dict[str, Any]) -> Tensor:
    """The same math materialising the whole [n, L, n, F] cosine tensor."""
    tw = token_weights(x["text"], x["text_mask"], x["text_mlp"])
    vw = token_weights(x["video"], x["video_mask"], x["video_mlp"])
    return wti_similarity(x["text"], x["text_mask"], x["video"], x["video_mask"], tw, vw)


def _masked_softmax_weights(mlp: nn.Module, feats: Tensor, mask: Tensor) -> Tensor:
    logits = mlp(feats).squeeze(-1).masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1)


def score_reference_loop(x: dict[str, Any], mini_batch: int = 32) -> Tensor:
    """The reference's evaluation pattern: square mini-batches, everything recomputed per block."""
    rows = []
    for t, tm in zip(x["text"].split(mini_batch), x["text_mask"].split(mini_batch)):
        row = []
        for v, vm in zip(x["video"].split(mini_batch), x["video_mask"].split(mini_batch)):
            tw = _masked_softmax_weights(x["text_mlp"], t, tm)
            vw = _masked_softmax_weights(x["video_mlp"], v, vm)
            tn = t / t.norm(dim=-1, keepdim=True)
            vn = v / v.norm(dim=-1, keepdim=True)
            a = torch.einsum("atd,bvd->abtv", tn, vn)
            a = a * tm[:, None, :, None] * vm[None, :, None, :]
            t2v = torch.einsum("abt,at->ab", a.amax(dim=-1), tw)
            v2t = torch.einsum("abv,bv->ab", a.amax(dim=-2), vw)
            row.append(0.5 * (t2v + v2t))
        rows.append(torch.cat(row, dim=1))
    return torch.cat(rows, dim=0)


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process since start or the last reset (see tvr_bench/perf/memory.py)."""
    return peak_rss_bytes()


def _head(x: dict[str, Any], k: int) -> dict[str, Any]:
    """The first k texts and videos of an input set (same weight MLPs)."""
    return {key: (v[:k] if isinstance(v, Tensor) else v) for key, v in x.items()}


def run_variant(
    variant: str, n: int, words: int, frames: int, d: int, budget_mb: float, seed: int, threads: int | None
) -> dict[str, Any]:
    """Warm up on 64 items, then time one full run of `variant` in this process; return time, peak memory, matrix."""
    if threads:
        torch.set_num_threads(threads)
    x = make_inputs(n, words, frames, d, seed)
    fns = {
        "blocked": lambda z: score_blocked(z, int(budget_mb * 2**20)),
        "one_shot": score_one_shot,
        "reference_loop": score_reference_loop,
    }
    fn = fns[variant]
    with torch.no_grad():
        fn(_head(x, min(n, 64)))
        base = reset_peak_rss()  # high-water mark reset: import/input peaks do not hide the call's own
        start = time.perf_counter()
        sim = fn(x)
        seconds = time.perf_counter() - start
    peak = _peak_rss_bytes()
    return {
        "seconds": seconds,
        "peak_rss_mib": peak / 2**20,
        "peak_extra_mib": max(0, peak - base) / 2**20,
        "threads": torch.get_num_threads(),
        "sim": sim,
    }


def bench_drl(
    n: int = 1000,
    words: int = 32,
    frames: int = 12,
    d: int = 512,
    repeats: int = 3,
    budget_mb: float = 1024.0,
    seed: int = 0,
    threads: int | None = None,
    variants: tuple[str, ...] = VARIANTS,
) -> dict[str, Any]:
    """Time the blocked DRL scorer vs one-shot vs the reference-style loop on CPU; peak memory and max |diff|.

    Rounds are interleaved (every variant once per round, each in a fresh process) so that a
    noisy machine slows all variants alike; the median over rounds is reported.
    """
    out: dict[str, Any] = {
        "n": n, "words": words, "frames": frames, "d": d, "budget_mb": budget_mb, "repeats": repeats,
        "note": "median over interleaved rounds, each variant in a fresh process after a 64-item warm-up; "
                "peak_extra_mib = RSS growth over the inputs; text lengths uniform in [5, words], all frames real",
    }
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    sims: dict[str, Tensor] = {}
    for _ in range(repeats):
        for variant in variants:
            with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                res = pool.submit(run_variant, variant, n, words, frames, d, budget_mb, seed, threads).result()
            sims[variant] = res.pop("sim")
            runs[variant].append(res)
    ref = sims.get("one_shot", next(iter(sims.values())))
    for variant, rs in runs.items():
        out[variant] = {
            "seconds": statistics.median(r["seconds"] for r in rs),
            "seconds_all": [round(r["seconds"], 3) for r in rs],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
            "peak_extra_mib": max(r["peak_extra_mib"] for r in rs),
            "threads": rs[0]["threads"],
            "max_abs_diff_vs_one_shot": float((sims[variant] - ref).abs().max()),
        }
    if "blocked" in out and "reference_loop" in out:
        out["speedup_blocked_vs_reference_loop"] = out["reference_loop"]["seconds"] / out["blocked"]["seconds"]
    if "blocked" in out and "one_shot" in out:
        out["speedup_blocked_vs_one_shot"] = out["one_shot"]["seconds"] / out["blocked"]["seconds"]
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(bench_drl(), indent=2))
