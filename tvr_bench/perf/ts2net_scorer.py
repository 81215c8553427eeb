"""TS2-Net evaluation scorer benchmark: the module's blocked scorer vs one-shot computations of the same matrix.

TS2-Net scores a (text, video) pair by a softmax-weighted sum over the video's F frame cosines, so a whole score
matrix holds [n_text, n_video, F] arrays (cosines, weights and their product). Three ways to the same [n, n]:

* `blocked`: the module's `similarity` through the evaluator's `blocked_similarity` under the module's default
  budget (1 GiB): `frame_weighted_similarity_blocked`, cache-sized text x video chunks on CPU;
* `one_shot`: `frame_weighted_similarity` on everything at once (three [n, n, F] arrays);
* `reference_math`: the reference's own op sequence (`get_frame_selectedcls_similarity`, modeling.py L575-607:
  a [V, F, 1, T] einsum, the per-frame softmax over the single text token, then the frame weights) at once.

Each variant runs in a fresh process (spawn) so that its peak resident memory (VmHWM from a reset mark,
`tvr_bench.perf.memory`) is its own; the inputs are rebuilt there from the same seed, and rounds interleave the
variants so that a noisy machine slows them alike (median over rounds). Inputs: CLIP-like features (shared
offset, per-video content, small per-frame changes), 12 frames with a quarter of the videos padded to 6-11.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tvr_bench.functional.ts2net import FRAME_SOFTMAX_SCALE, frame_weighted_similarity
from tvr_bench.perf.memory import peak_rss_bytes, reset_peak_rss

VARIANTS = ("blocked", "one_shot", "reference_math")


def make_inputs(n: int, frames: int, d: int, seed: int = 0) -> dict[str, Tensor]:
    """Text embeddings [n, d], frame features [n, frames, d] and a frame mask, deterministic in `seed`."""
    g = torch.Generator().manual_seed(seed)
    offset = 0.3 * torch.randn(d, generator=g)
    content = 0.45 * torch.randn(n, 1, d, generator=g)
    video = content + 0.2 * torch.randn(n, frames, d, generator=g) + offset
    text = content[:, 0] + 0.3 * torch.randn(n, d, generator=g) + offset
    lengths = torch.full((n,), frames)
    padded = torch.rand(n, generator=g) < 0.25
    lengths[padded] = torch.randint(max(1, frames // 2), frames, (int(padded.sum()),), generator=g)
    mask = torch.arange(frames)[None] < lengths[:, None]
    return {"text": text, "frames": video, "mask": mask}


def reference_math(text: Tensor, frames: Tensor, mask: Tensor) -> Tensor:
    """The reference's op sequence on the whole matrix (modeling.py L575-607), unscaled: [T, V]."""
    t = (text / text.norm(dim=-1, keepdim=True)).unsqueeze(1)  # [T, 1, D]
    v = frames / frames.norm(dim=-1, keepdim=True)
    m = mask.bool().unsqueeze(-1)  # [V, F, 1]
    sim = torch.einsum("mjk,nlk->mjln", v, t)  # [V, F, 1, T]
    w = torch.softmax(FRAME_SOFTMAX_SCALE * F.normalize(sim, dim=2), dim=2)
    sim = (w * sim).sum(2)  # [V, F, T]
    w = sim * m
    w = (w / w.norm(dim=1, keepdim=True)).masked_fill(~m, -1e18)
    w = torch.softmax(FRAME_SOFTMAX_SCALE * w, dim=1)
    return (w * sim).sum(1).t()


def _scorer(budget_mb: float) -> Any:
    """TS2Net's own `similarity` / `pair_cost_bytes` on a stand-in holding only the evaluation budget."""
    from tvr_bench.methods.ts2net import TS2Net

    shim = SimpleNamespace(hparams=SimpleNamespace(eval_memory_mb=budget_mb))
    shim.similarity = lambda text, video: TS2Net.similarity(shim, text, video)
    shim.pair_cost_bytes = lambda text, video: TS2Net.pair_cost_bytes(shim, text, video)
    return shim


def run_variant(variant: str, n: int, frames: int, d: int, budget_mb: float, seed: int, threads: int | None) -> dict[str, Any]:
    """Time one variant once (after a small warm-up) in this process; its peak memory and the matrix."""
    from tvr_bench.callbacks.evaluator import blocked_similarity

    if threads:
        torch.set_num_threads(threads)
    x = make_inputs(n, frames, d, seed)
    text, video = {"embeds": x["text"]}, {"frames": x["frames"], "frame_mask": x["mask"]}
    fns = {
        "blocked": lambda t, v: blocked_similarity(_scorer(budget_mb), t, v, budget_mb),
        "one_shot": lambda t, v: frame_weighted_similarity(t["embeds"], v["frames"], v["frame_mask"]),
        "reference_math": lambda t, v: reference_math(t["embeds"], v["frames"], v["frame_mask"]),
    }
    fn = fns[variant]
    with torch.no_grad():
        warm = min(n, 64)
        fn({"embeds": x["text"][:warm]}, {k: v[:warm] for k, v in video.items()})
        base = reset_peak_rss()
        start = time.perf_counter()
        sim = fn(text, video)
        seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    return {"seconds": seconds, "peak_extra_mib": max(0, peak - base) / 2**20, "peak_rss_mib": peak / 2**20,
            "threads": torch.get_num_threads(), "sim": sim}  # fmt: skip


def bench_ts2net(n: int = 1000, frames: int = 12, d: int = 512, repeats: int = 2, budget_mb: float = 1024.0,
                 seed: int = 0, threads: int | None = None, variants: tuple[str, ...] = VARIANTS) -> dict[str, Any]:  # fmt: skip
    """Time and measure the peak memory of TS2-Net's blocked scorer vs the one-shot computations; max |diff|."""
    out: dict[str, Any] = {
        "n": n, "frames": frames, "d": d, "budget_mb": budget_mb, "repeats": repeats,
        "note": "median over interleaved rounds, each variant in a fresh process after a 64-item warm-up; "
                "peak_extra_mib = RSS growth over the inputs; a quarter of the videos padded",
    }  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    sims: dict[str, Tensor] = {}
    for _ in range(max(1, repeats)):
        for variant in variants:
            with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
                res = pool.submit(run_variant, variant, n, frames, d, budget_mb, seed, threads).result()
            sims[variant] = res.pop("sim")
            runs[variant].append(res)
    ref = sims.get("one_shot", next(iter(sims.values())))
    for variant, rs in runs.items():
        out[variant] = {
            "seconds": statistics.median(r["seconds"] for r in rs),
            "seconds_all": [round(r["seconds"], 4) for r in rs],
            "peak_extra_mib": max(r["peak_extra_mib"] for r in rs),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
            "threads": rs[0]["threads"],
            "max_abs_diff_vs_one_shot": float((sims[variant] - ref).abs().max()),
        }
    if "blocked" in out and "one_shot" in out:
        out["max_abs_diff"] = out["blocked"]["max_abs_diff_vs_one_shot"]
        out["speedup_blocked_vs_one_shot"] = out["one_shot"]["seconds"] / out["blocked"]["seconds"]
        out["memory_ratio_blocked_vs_one_shot"] = out["blocked"]["peak_extra_mib"] / max(1e-9, out["one_shot"]["peak_extra_mib"])
    if "blocked" in out and "reference_math" in out:
        out["speedup_blocked_vs_reference_math"] = out["reference_math"]["seconds"] / out["blocked"]["seconds"]
        out["memory_ratio_blocked_vs_reference_math"] = out["blocked"]["peak_extra_mib"] / max(1e-9, out["reference_math"]["peak_extra_mib"])
    return out
