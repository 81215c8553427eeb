"""`make perf` section `intervals`: time of the 95% bootstrap intervals of every metric on an MSVD-sized test
set (27,763 text queries x 670 videos, 10,000 resamples of the videos with all their captions), and of the
paired comparison of two runs on it. Target: intervals under 2 s."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

TARGET_SECONDS = 2.0


def simulated_ranks(n_text: int = 27_763, n_video: int = 670, seed: int = 0) -> Any:
    """Per-query ranks of a plausible run: captions spread over the videos, per-video difficulty, ranks <= n_video."""
    from tvr_bench.stats import PerQuery

    rng = np.random.default_rng(seed)
    caps = rng.multinomial(n_text - n_video, np.ones(n_video) / n_video) + 1
    video = np.repeat(np.arange(n_video), caps)
    difficulty = rng.uniform(0.05, 0.6, size=n_video)
    t2v = np.minimum(rng.geometric(difficulty[video]), n_video)
    v2t = np.minimum(rng.geometric(difficulty), n_video)
    keys = np.array([f"video{v:04d}" for v in range(n_video)])
    captions = np.array([f"{keys[v]}#{j}" for j, v in enumerate(video)])
    return PerQuery(t2v, captions, keys[video], v2t, keys)


def bench_intervals(quick: bool = False) -> dict[str, Any]:
    """Median wall time (after one warm-up) of `bootstrap_intervals` and `paired_comparison` at MSVD size."""
    from tvr_bench.stats import DEFAULT_RESAMPLES, bootstrap_intervals, paired_comparison

    a, b = simulated_ranks(seed=0), simulated_ranks(seed=1)
    b.t2v_key, b.t2v_video, b.v2t_key = a.t2v_key, a.t2v_video, a.v2t_key  # same queries, other ranks
    repeats = 1 if quick else 3
    times: dict[str, list[float]] = {"intervals": [], "compare": []}
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        bootstrap_intervals([a.directions()], DEFAULT_RESAMPLES)
        t1 = time.perf_counter()
        if i:
            times["intervals"].append(t1 - t0)
    for i in range(2 if quick else 3):
        t0 = time.perf_counter()
        paired_comparison(a, b, DEFAULT_RESAMPLES)
        if i:
            times["compare"].append(time.perf_counter() - t0)
    intervals = float(np.median(times["intervals"]))
    return {
        "texts": int(len(a.t2v_rank)),
        "videos": int(len(a.v2t_rank)),
        "resamples": DEFAULT_RESAMPLES,
        "intervals_seconds": intervals,
        "compare_seconds": float(np.median(times["compare"])),
        "seconds_all": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "target_seconds": TARGET_SECONDS,
        "targets_met": {"intervals": intervals < TARGET_SECONDS},
        "note": "10 metrics (R@1/5/10, MdR, MnR both ways), percentile bootstrap over videos; compare = paired "
                "bootstrap intervals + permutation p-values of the 10 differences. Median after 1 warm-up.",
    }


def render(x: dict[str, Any]) -> list[str]:
    """Markdown lines of the section."""
    mark = "✓" if x["targets_met"]["intervals"] else "✗"
    return [
        f"## Confidence intervals ({x['texts']:,} texts × {x['videos']} videos, {x['resamples']:,} resamples)",
        "",
        f"95% bootstrap intervals of all 10 metrics: **{x['intervals_seconds']:.2f} s** (target < {x['target_seconds']:.0f} s "
        f"{mark}); `tvr-bench compare` of two such runs (paired intervals + permutation p-values): "
        f"{x['compare_seconds']:.2f} s.",
        "",
    ]
