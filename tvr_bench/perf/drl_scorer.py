"""DRL evaluation scorer benchmark: our blocked WTI scorer vs one-shot and vs the reference's loop.

Three ways to compute the same [n, n] WTI score matrix from cached features:

* `blocked`: token weights once per text / video, then `wti_similarity_blocked` under a memory budget
  (length-sorted cache-sized chunks, each normalised when used, one matmul per chunk);
* `one_shot`: the same math in one [n, L, n, F] tensor (`wti_similarity`);
* `reference_loop`: the reference's `_run_on_single_gpu` pattern re-implemented: 32 x 32 blocks,
  each recomputing both weight MLPs, the normalisation and the masked einsum of its block (optionally only
  its first `reference_rows` texts against every video: its peak memory is reached in the first row of
  blocks, its time is then scaled to all rows and marked as an estimate).

Distance to the floor: the token-wise scores need (real tokens) x (real frames) x D multiply-adds in all
(`work_macs`); each process also times one [1000, 512] x [512, 12000] float32 product, and
`work_ratio` = scoring seconds / (work_macs / product rate), the scoring being `wti_similarity_blocked`
on prepared features (weights and normalisation are per item, timed apart as `prepare_seconds`).

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


#: Items per weight-MLP call when preparing features (the MLP's [items·L, D] hidden layer stays small).
PREPARE_ITEMS = 128


def prepare_blocked(x: dict[str, Any]) -> dict[str, Tensor]:
    """Token weights once per text and video (the weight MLP in item chunks, so its hidden layer stays small)."""

    def weights(feats: Tensor, mask: Tensor, mlp: nn.Module) -> Tensor:
        return torch.cat([token_weights(f, m, mlp) for f, m in zip(feats.split(PREPARE_ITEMS), mask.split(PREPARE_ITEMS))])

    return {"text_w": weights(x["text"], x["text_mask"], x["text_mlp"]), "video_w": weights(x["video"], x["video_mask"], x["video_mlp"])}


def score_prepared(x: dict[str, Any], p: dict[str, Tensor], max_bytes: int) -> Tensor:
    """The memory-bounded chunked token-wise scorer (it normalises each chunk when it uses it)."""
    return wti_similarity_blocked(
        x["text"], p["text_w"], x["text_mask"], x["video"], p["video_w"], x["video_mask"], max_bytes=max_bytes
    )


def score_blocked(x: dict[str, Any], max_bytes: int) -> Tensor:
    """Weights and normalisation once, then the memory-bounded chunked scorer."""
    return score_prepared(x, prepare_blocked(x), max_bytes)


def work_macs(x: dict[str, Any]) -> float:
    """Multiply-adds the token-wise scores need: (real tokens) x (real frames) x D over all text-video pairs."""
    return float(x["text_mask"].sum()) * float(x["video_mask"].sum()) * x["text"].shape[-1]


def time_product(repeats: int = 3) -> float:
    """Median seconds of one [1000, 512] x [512, 12000] float32 product (the floor's unit), after a warm-up."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, 512, generator=g), torch.randn(512, 12000, generator=g)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def score_one_shot(x: dict[str, Any]) -> Tensor:
    """The same math materialising the whole [n, L, n, F] cosine tensor."""
    tw = token_weights(x["text"], x["text_mask"], x["text_mlp"])
    vw = token_weights(x["video"], x["video_mask"], x["video_mlp"])
    return wti_similarity(x["text"], x["text_mask"], x["video"], x["video_mask"], tw, vw)


def _masked_softmax_weights(mlp: nn.Module, feats: Tensor, mask: Tensor) -> Tensor:
    logits = mlp(feats).squeeze(-1).masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1)


def score_reference_loop(x: dict[str, Any], mini_batch: int = 32, max_rows: int | None = None) -> Tensor:
    """The reference's evaluation pattern: square mini-batches, everything recomputed per block (the first
    `max_rows` texts only when given)."""
    rows = []
    texts, masks = x["text"][:max_rows], x["text_mask"][:max_rows]
    for t, tm in zip(texts.split(mini_batch), masks.split(mini_batch)):
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
    variant: str, n: int, words: int, frames: int, d: int, budget_mb: float, seed: int, threads: int | None,
    reference_rows: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Warm up on 64 items, then time one full run of `variant` in this process; return time, peak memory, matrix,
    and the product time measured in this process before and after."""
    if threads:
        torch.set_num_threads(threads)
    x = make_inputs(n, words, frames, d, seed)
    budget = int(budget_mb * 2**20)
    rows = None if reference_rows is None or reference_rows >= n else reference_rows
    product = [time_product()]
    extra: dict[str, Any] = {}
    with torch.no_grad():
        if variant == "blocked":
            score_blocked(_head(x, min(n, 64)), budget)
            base = reset_peak_rss()  # high-water mark reset: import/input peaks do not hide the call's own
            start = time.perf_counter()
            prepared = prepare_blocked(x)
            mid = time.perf_counter()
            sim = score_prepared(x, prepared, budget)
            seconds = time.perf_counter() - start
            extra = {"prepare_seconds": mid - start, "scoring_seconds": time.perf_counter() - mid}
        else:
            fn = score_one_shot if variant == "one_shot" else lambda z: score_reference_loop(z, max_rows=rows)
            fn(_head(x, min(n, 64)))
            base = reset_peak_rss()
            start = time.perf_counter()
            sim = fn(x)
            seconds = time.perf_counter() - start
            if variant == "reference_loop" and rows:
                extra = {"rows_run": rows, "seconds_measured": seconds, "seconds_estimated_from_rows": True}
                seconds *= n / rows
    peak = _peak_rss_bytes()
    product.append(time_product())
    return {
        "seconds": seconds,
        **extra,
        "peak_rss_mib": peak / 2**20,
        "peak_extra_mib": max(0, peak - base) / 2**20,
        "threads": torch.get_num_threads(),
        "product_seconds": product,
        "work_macs": work_macs(x),
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
    reference_rows: int | None = None,
) -> dict[str, Any]:
    """Time the blocked DRL scorer vs one-shot vs the reference-style loop on CPU; peak memory, max |diff| and the
    blocked scoring's distance to its floor (work at the product rate measured in the same processes).

    Rounds are interleaved (every variant once per round, each in a fresh process) so that a
    noisy machine slows all variants alike; the median over rounds is reported.
    """
    out: dict[str, Any] = {
        "n": n, "words": words, "frames": frames, "d": d, "budget_mb": budget_mb, "repeats": repeats,
        "note": "median over interleaved rounds, each variant in a fresh process after a 64-item warm-up; "
                "peak_extra_mib = RSS growth over the inputs; text lengths uniform in [5, words], all frames real",
    }  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    sims: dict[str, Tensor] = {}
    for _ in range(repeats):
        for variant in variants:
            with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                args = (variant, n, words, frames, d, budget_mb, seed, threads, reference_rows)
                res = pool.submit(run_variant, *args).result()
            sims[variant] = res.pop("sim")
            runs[variant].append(res)
    ref = sims.get("one_shot", next(iter(sims.values())))
    products: list[float] = []
    for variant, rs in runs.items():
        out[variant] = {
            "seconds": statistics.median(r["seconds"] for r in rs),
            "seconds_all": [round(r["seconds"], 3) for r in rs],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
            "peak_extra_mib": max(r["peak_extra_mib"] for r in rs),
            "threads": rs[0]["threads"],
        }
        for key in ("prepare_seconds", "scoring_seconds", "seconds_measured", "rows_run", "seconds_estimated_from_rows"):
            if key in rs[0]:
                out[variant][key] = statistics.median(r[key] for r in rs) if "seconds" in key and key != "seconds_estimated_from_rows" else rs[0][key]
        if sims[variant].shape == ref.shape:
            out[variant]["max_abs_diff_vs_one_shot"] = float((sims[variant] - ref).abs().max())
        else:  # a partial reference loop: its rows
            out[variant]["max_abs_diff_vs_one_shot"] = float((sims[variant] - ref[: sims[variant].shape[0]]).abs().max())
        products += [p for r in rs for p in r["product_seconds"]]
        out["work_macs"] = rs[0]["work_macs"]
    out["product_seconds"] = statistics.median(products)
    out["product_seconds_all"] = [round(p, 4) for p in products]
    rate = 1000 * 512 * 12000 / out["product_seconds"]
    out["work_floor_seconds"] = out["work_macs"] / rate
    if "blocked" in out:
        out["work_ratio"] = out["blocked"]["scoring_seconds"] / out["work_floor_seconds"]
        out["work_ratio_with_prepare"] = out["blocked"]["seconds"] / out["work_floor_seconds"]
    if "blocked" in out and "reference_loop" in out:
        out["speedup_blocked_vs_reference_loop"] = out["reference_loop"]["seconds"] / out["blocked"]["seconds"]
        out["memory_vs_reference_loop"] = out["blocked"]["peak_extra_mib"] / max(1e-9, out["reference_loop"]["peak_extra_mib"])
    if "blocked" in out and "one_shot" in out:
        out["speedup_blocked_vs_one_shot"] = out["one_shot"]["seconds"] / out["blocked"]["seconds"]
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(bench_drl(), indent=2))
