"""`tvr-bench perf` section `metrics`: `tvr_bench.metrics.retrieval_metrics` vs torchmetrics' retrieval metrics
on one matrix."""

from __future__ import annotations

import time
from typing import Any

import torch

from tvr_bench.perf.harness import _fmt, median


def bench_metrics(n: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    """`retrieval_metrics` (10 metrics, both directions) vs torchmetrics R@1/5/10 + MRR (both directions)."""
    import torchmetrics.retrieval as tmr

    from tvr_bench.metrics import retrieval_metrics

    g = torch.Generator().manual_seed(seed)
    sim = torch.rand(n, n, generator=g) + 0.5 * torch.eye(n)  # positive scores: torchmetrics counts <= 0 as a miss
    t2v = torch.arange(n)
    target = torch.eye(n, dtype=torch.bool)
    indexes = torch.arange(n)[:, None].expand(n, n)
    tm = {f"R@{k}": tmr.RetrievalRecall(top_k=k) for k in (1, 5, 10)}
    tm["MRR"] = tmr.RetrievalMRR()

    def ours() -> dict[str, float]:
        return retrieval_metrics(sim, t2v)

    def theirs() -> dict[str, float]:
        out = {}
        for direction, s in (("t2v", sim), ("v2t", sim.t())):
            for name, metric in tm.items():
                out[f"{direction}/{name}"] = float(metric(s.flatten(), target.flatten(), indexes=indexes.flatten()))
        return out

    times: dict[str, list[float]] = {"ours": [], "torchmetrics": []}
    results: dict[str, dict[str, float]] = {}
    for i in range(repeats + 1):
        for name, fn in (("ours", ours), ("torchmetrics", theirs)):
            t0 = time.perf_counter()
            results[name] = fn()
            if i:
                times[name].append(time.perf_counter() - t0)
    agree = max(abs(results["ours"][f"{d}/R@{k}"] - 100 * results["torchmetrics"][f"{d}/R@{k}"])
                for d in ("t2v", "v2t") for k in (1, 5, 10))  # fmt: skip
    return {
        "n": n,
        "ours_seconds": median(times["ours"]),
        "torchmetrics_seconds": median(times["torchmetrics"]),
        "speedup": median(times["torchmetrics"]) / median(times["ours"]),
        "seconds_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "recall_max_abs_diff_percent": agree,
        "note": "ours: R@1/5/10, MdR, MnR in both directions (10 numbers); torchmetrics: R@1/5/10 and MRR in both "
                "directions (8 numbers; it has no median/mean rank). Median after 1 warm-up.",
    }  # fmt: skip


def render(x: dict[str, Any]) -> list[str]:
    """Markdown lines of the metrics section."""
    return [
        f"## Metrics ({x['n']} × {x['n']})",
        "",
        f"`retrieval_metrics` (R@1/5/10, MdR, MnR, both directions) {x['ours_seconds'] * 1000:.1f} ms vs "
        f"torchmetrics (R@1/5/10 + MRR, both directions) {x['torchmetrics_seconds'] * 1000:.1f} ms: "
        f"**{_fmt(x['speedup'], 1)}× faster**; recalls agree within {x['recall_max_abs_diff_percent']:.1e} points.",
        "",
    ]
