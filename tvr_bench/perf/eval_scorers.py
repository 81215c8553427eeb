"""X-Pool, T-MASS and EMCL evaluation scorers: our exact blocked scorers vs the one-shot reference math.

Both methods pool the frames of every video conditioned on every text, so the one-shot reference math
materialises [n_text, n_video, D] tensors (the reference code does the same on CPU, perf anchor a/b):

* `fast`: `xpool_similarity_fast` / `tmass_similarity` under a memory budget (folded weights, per-video
  Gram matrices, T-MASS trials as batched matmuls; text chunks);
* `one_shot`: `xpool_similarity_reference` / `tmass_similarity_reference`, every pooled vector (and for
  T-MASS every radius and sample) in memory at once.

EMCL (`bench_emcl`): its reference grouping through the evaluator (`blocked_similarity` with the 32 x 32 blocks
of `eval_block_sizes`) vs `emcl_block_grid_scores` (every block batched at once), and its pairwise grouping
(blocked under the budget) vs all pairs batched at once, at a size where that one-shot fits in memory.

Each variant runs in a fresh process (spawn) so its peak resident memory (the VmHWM high-water mark of
`tvr_bench.perf.memory`, reset after the inputs are built; tracemalloc does not see torch's allocator)
can be read; the inputs are rebuilt there from the same seed. Inputs:
CLIP-like raw features (shared offset, per-video content, small per-frame changes), reference init
of the heads plus 0.02·N(0, 1) noise (as perf anchor a), one caption per video unless `n_text` differs.

Distance to the floor: every process also times one [1000, 512] x [512, 12000] float32 product before and
after its scorer (`product_seconds`); `fast_in_products` = fast seconds / product seconds. The folded
X-Pool scorer needs per pair two F·D dot products (attention logits, e) and K x K forms, i.e. about three
such products at 1000 x 1000 (two text-side, one video-side); T-MASS adds the text-frame cosines, the
radius, R ⊙ z and 3·M·D per pair for the trials (about ten).
"""

from __future__ import annotations

import statistics
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import torch
from torch import Tensor

from tvr_bench.functional.tmass import RadiusHead, counter_prior, tmass_similarity, tmass_similarity_reference
from tvr_bench.functional.xpool import TextConditionedPool, xpool_similarity_fast, xpool_similarity_reference
from tvr_bench.perf.drl_scorer import time_product
from tvr_bench.perf.memory import timed_calls

VARIANTS = ("fast", "one_shot")


def make_inputs(n_text: int, n_video: int, frames: int, d: int, heads: int, trials: int, seed: int = 0) -> dict[str, Any]:
    """Features, perturbed X-Pool / radius heads and per-text evaluation draws, deterministic in `seed`."""
    g = torch.Generator().manual_seed(seed)
    pool = TextConditionedPool(d, heads, 0.3).eval()
    radius = RadiusHead(frames, d)
    with torch.no_grad():
        for p in list(pool.parameters()) + list(radius.parameters()):
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    offset = 0.3 * torch.randn(d, generator=g)
    content = 0.45 * torch.randn(n_video, 1, d, generator=g)
    video = content + 0.2 * torch.randn(n_video, frames, d, generator=g) + offset
    text = content[torch.arange(n_text) % n_video, 0] + 0.3 * torch.randn(n_text, d, generator=g) + offset
    eps = counter_prior("uniform01", 1.0, seed, torch.arange(n_text), trials, d)
    return {"pool": pool, "radius": radius, "text": text, "frames": video, "eps": eps}


def run_variant(
    method: str, variant: str, n_text: int, n_video: int, frames: int, d: int, heads: int, trials: int,
    repeats: int, budget_mb: float, seed: int, threads: int | None,
) -> dict[str, Any]:  # fmt: skip
    """Time one scorer (1 warm-up + `repeats` runs) in this process; return times, peak memory and the matrix."""
    if threads:
        torch.set_num_threads(threads)
    x = make_inputs(n_text, n_video, frames, d, heads, trials, seed)
    budget = int(budget_mb * 2**20)
    fns = {
        ("xpool", "fast"): lambda: xpool_similarity_fast(x["pool"], x["text"], x["frames"], max_bytes=budget),
        ("xpool", "one_shot"): lambda: xpool_similarity_reference(x["pool"], x["text"], x["frames"]),
        ("tmass", "fast"): lambda: tmass_similarity(x["pool"], x["radius"], x["text"], x["frames"], None, x["eps"], max_bytes=budget),
        ("tmass", "one_shot"): lambda: tmass_similarity_reference(x["pool"], x["radius"], x["text"], x["frames"], None, x["eps"]),
    }
    fn = fns[(method, variant)]
    product = [time_product()]
    sim, times, base, peak = timed_calls(fn, repeats)
    product.append(time_product())
    return {
        "product_seconds": product,
        "seconds": statistics.median(times),
        "seconds_all": [round(t, 3) for t in times],
        "peak_rss_mib": peak / 2**20,
        "peak_extra_mib": max(0, peak - base) / 2**20,
        "threads": torch.get_num_threads(),
        "sim": sim,
    }


def _bench(
    method: str, n: int, n_text: int | None, n_video: int | None, frames: int, d: int, heads: int, trials: int,
    repeats: int, budget_mb: float, seed: int, threads: int | None, variants: tuple[str, ...],
    fast_repeats: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    n_text, n_video = n_text or n, n_video or n
    fast_reps = max(repeats, fast_repeats or 0)
    out: dict[str, Any] = {
        "method": method, "n_text": n_text, "n_video": n_video, "frames": frames, "d": d, "heads": heads,
        "budget_mb": budget_mb, "repeats": repeats, "fast_repeats": fast_reps,
        "note": "median of `repeats` (the fast scorer: `fast_repeats`) after 1 warm-up; each variant in its own "
                "process; peak_extra_mib = RSS growth over the inputs; peak_rss_mib includes python + torch (~0.3 GiB) "
                "and the inputs",
    }  # fmt: skip
    if method == "tmass":
        out["trials"] = trials
    sims: dict[str, Tensor] = {}
    for variant in variants:
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as ex:
            reps = fast_reps if variant == "fast" else repeats
            args = (method, variant, n_text, n_video, frames, d, heads, trials, reps, budget_mb, seed, threads)
            res = ex.submit(run_variant, *args).result()
        sims[variant] = res.pop("sim")
        out[variant] = res
    products = [p for v in variants for p in out[v]["product_seconds"]]
    out["product_seconds"] = statistics.median(products)
    if "fast" in out:
        out["fast_in_products"] = out["fast"]["seconds"] / out["product_seconds"]
    if "fast" in sims and "one_shot" in sims:
        out["max_abs_diff"] = float((sims["fast"] - sims["one_shot"]).abs().max())
        out["speedup_fast_vs_one_shot"] = out["one_shot"]["seconds"] / out["fast"]["seconds"]
        # each side in the product units of its own process: steadier when neighbours slow one process and not the other
        fast_units = out["fast"]["seconds"] / statistics.median(out["fast"]["product_seconds"])
        one_shot_units = out["one_shot"]["seconds"] / statistics.median(out["one_shot"]["product_seconds"])
        out["speedup_in_own_products"] = one_shot_units / fast_units
        out["memory_ratio_fast_vs_one_shot"] = out["fast"]["peak_extra_mib"] / max(1e-9, out["one_shot"]["peak_extra_mib"])
    return out


def bench_xpool(
    n: int = 1000, d: int = 512, frames: int = 12, heads: int = 1, n_text: int | None = None,
    n_video: int | None = None, repeats: int = 3, budget_mb: float = 512.0, seed: int = 0,
    threads: int | None = None, variants: tuple[str, ...] = VARIANTS,
) -> dict[str, Any]:  # fmt: skip
    """Time and measure the peak memory of X-Pool's fast scorer vs the one-shot reference math; max |diff|."""
    return _bench("xpool", n, n_text, n_video, frames, d, heads, 1, repeats, budget_mb, seed, threads, variants)


def bench_tmass(
    n: int = 1000, d: int = 512, frames: int = 12, heads: int = 1, trials: int = 20, n_text: int | None = None,
    n_video: int | None = None, repeats: int = 3, budget_mb: float = 512.0, seed: int = 0,
    threads: int | None = None, variants: tuple[str, ...] = VARIANTS, fast_repeats: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Time and measure the peak memory of T-MASS's fast M-sample scorer vs the one-shot reference math.

    `fast_repeats` times the (cheap) fast scorer more often than the minutes-long one-shot math: its median
    is then less exposed to a moment of load on a shared machine."""
    return _bench("tmass", n, n_text, n_video, frames, d, heads, trials, repeats, budget_mb, seed, threads, variants, fast_repeats)


# ------------------------------------------------------------------------------------------------ EMCL
class EMCLScorer:
    """EMCL's scorer as the evaluator sees it (the module's `similarity` / `eval_block_sizes` / `pair_cost_bytes`)
    on given features, without a backbone."""

    def __init__(self, bases: Tensor, grouping: str, block: int = 32, budget_mb: float = 512.0) -> None:
        self.bases, self.grouping, self.block, self.budget = bases, grouping, block, int(budget_mb * 2**20)

    def eval_block_sizes(self) -> tuple[int, int] | None:
        """(block, block) for the reference grouping, None for pairwise scores."""
        return (self.block, self.block) if self.grouping == "reference" else None

    def similarity(self, text: dict[str, Tensor], video: dict[str, Tensor]) -> Tensor:
        """EM over the given block (reference) or over every pair alone (pair)."""
        from tvr_bench.functional.emcl import emcl_block_scores, emcl_pair_scores

        t, f, m = text["embeds"], video["frames"], video["frame_mask"]
        if self.grouping == "reference":
            return emcl_block_scores(t, f, m, self.bases)[0]
        return emcl_pair_scores(t, f, m, self.bases, max_bytes=self.budget)

    def pair_cost_bytes(self, text: dict[str, Tensor], video: dict[str, Tensor]) -> int:
        """Bytes per pair of the pairwise EM."""
        from tvr_bench.functional.emcl import pair_bytes

        return pair_bytes(video["frames"].shape[2], self.bases.shape[-1], video["frames"].shape[1])


def run_emcl_variant(variant: str, n: int, frames: int, d: int, bases: int, repeats: int, budget_mb: float, seed: int,
                     threads: int | None) -> dict[str, Any]:  # fmt: skip
    """Time one EMCL scorer (1 warm-up + `repeats` runs) at n x n in this process: `blocked` / `one_shot` = the
    reference's 32 x 32 grouping through the evaluator / every block batched at once; `pair_blocked` /
    `pair_one_shot` = EM on each pair alone through the evaluator / all pairs batched at once."""
    from tvr_bench.callbacks.evaluator import blocked_similarity
    from tvr_bench.functional.emcl import REFERENCE_BLOCK, em_pairs, emcl_block_grid_scores, init_bases, pool_videos

    if threads:
        torch.set_num_threads(threads)
    x = make_inputs(n, n, frames, d, 1, 1, seed)
    mask = torch.ones(n, frames, dtype=torch.bool)
    c = init_bases(bases, torch.Generator().manual_seed(seed))
    text, video = {"embeds": x["text"], "index": torch.arange(n)}, {"frames": x["frames"], "frame_mask": mask, "index": torch.arange(n)}

    def pair_one_shot() -> Tensor:
        pooled = pool_videos(x["text"], x["frames"], mask)
        return em_pairs(pooled.reshape(n * n, d), x["text"][:, None].expand(n, n, d).reshape(-1, d), c).view(n, n)

    fns = {
        "blocked": lambda: blocked_similarity(EMCLScorer(c, "reference"), text, video, budget_mb),
        "one_shot": lambda: emcl_block_grid_scores(x["text"], x["frames"], mask, c, (REFERENCE_BLOCK, REFERENCE_BLOCK)),
        "pair_blocked": lambda: blocked_similarity(EMCLScorer(c, "pair", budget_mb=budget_mb), text, video, budget_mb),
        "pair_one_shot": pair_one_shot,
    }
    fn = fns[variant]
    sim, times, base, peak = timed_calls(fn, repeats)
    return {"seconds": statistics.median(times), "seconds_all": [round(t, 3) for t in times], "peak_rss_mib": peak / 2**20,
            "peak_extra_mib": max(0, peak - base) / 2**20, "threads": torch.get_num_threads(), "sim": sim}  # fmt: skip


def bench_emcl(
    n: int = 1000, pair_n: int = 64, d: int = 512, frames: int = 12, bases: int = 32, repeats: int = 1,
    budget_mb: float = 512.0, seed: int = 0, threads: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """EMCL's evaluation scorers vs their one-shot math, each variant in a fresh process: the reference grouping
    (32 x 32 blocks through the evaluator vs all blocks batched, [n, n, D] twice in memory) at n x n, and the
    pairwise grouping (blocked under `budget_mb` vs all pairs batched: [pairs, D, K] temporaries) at pair_n x pair_n,
    where the one-shot still fits in memory (at n = 1000 it would need 3 x 64 GiB)."""
    out: dict[str, Any] = {
        "method": "emcl", "n_text": n, "n_video": n, "pair_n": pair_n, "frames": frames, "d": d, "bases": bases,
        "budget_mb": budget_mb, "repeats": repeats,
        "note": "median of `repeats` after 1 warm-up; each variant in its own process; peak_extra_mib = RSS growth over "
                "the inputs. blocked/one_shot: reference grouping at n x n; pair_blocked/pair_one_shot: pairwise at pair_n x pair_n",
    }  # fmt: skip
    sims: dict[str, Tensor] = {}
    for variant in ("blocked", "one_shot", "pair_blocked", "pair_one_shot"):
        size = pair_n if variant.startswith("pair") else n
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as ex:
            res = ex.submit(run_emcl_variant, variant, size, frames, d, bases, repeats, budget_mb, seed, threads).result()
        sims[variant] = res.pop("sim")
        out[variant] = res
    out["max_abs_diff"] = float((sims["blocked"] - sims["one_shot"]).abs().max())
    out["speedup_blocked_vs_one_shot"] = out["one_shot"]["seconds"] / out["blocked"]["seconds"]
    out["memory_ratio_blocked_vs_one_shot"] = out["blocked"]["peak_extra_mib"] / max(1e-9, out["one_shot"]["peak_extra_mib"])
    out["pair_max_abs_diff"] = float((sims["pair_blocked"] - sims["pair_one_shot"]).abs().max())
    out["pair_speedup_blocked_vs_one_shot"] = out["pair_one_shot"]["seconds"] / out["pair_blocked"]["seconds"]
    out["pair_memory_ratio"] = out["pair_blocked"]["peak_extra_mib"] / max(1e-9, out["pair_one_shot"]["peak_extra_mib"])
    out["pair_seconds_per_million_pairs"] = out["pair_blocked"]["seconds"] / (pair_n * pair_n) * 1e6
    return out


if __name__ == "__main__":
    import json

    print(json.dumps({"xpool": bench_xpool(), "tmass": bench_tmass()}, indent=2))
