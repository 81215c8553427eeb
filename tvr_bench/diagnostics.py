"""Retrieval by kind of text query: per-group t2v metrics, their bootstrap intervals and paired comparisons.

A test set may say what kind each caption is (the synthetic benchmark: `full`, `first`, `second`, `order`,
`objects`; data_cards/synthetic.md). The headline t2v R@1 mixes them; here each kind is scored alone, with the
same unit as every other interval of the suite (the video with all its captions of that kind, tvr_bench/stats.py),
so a method that only learnt objects, or only the first event, or never the order, shows it.

Pure numpy functions of :class:`tvr_bench.stats.PerQuery` rank sets carrying `t2v_group`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tvr_bench.stats import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    Direction,
    PerQuery,
    _check_same_queries,
    _chunks,
    bootstrap_intervals,
    direction_metrics,
    percentile_interval,
    permutation_pvalues_ratio,
    resample_counts,
)

#: The recalls reported per group (the issue's R@1 and R@5).
GROUP_KS: tuple[int, ...] = (1, 5)
GROUP_METRICS: tuple[str, ...] = tuple(f"t2v/R@{k}" for k in GROUP_KS)

__all__ = ["GROUP_KS", "GROUP_METRICS", "group_directions", "group_names", "group_metrics", "paired_group_comparison"]


def group_names(pq: PerQuery) -> list[str]:
    """The query groups of a rank set in first-seen order of its sorted caption keys (empty without groups)."""
    if pq.t2v_group is None:
        return []
    return list(dict.fromkeys(pq.sorted().t2v_group.tolist()))


def group_directions(pq: PerQuery) -> dict[str, Direction]:
    """One t2v :class:`Direction` per group over the run's video units (all groups share the units)."""
    if pq.t2v_group is None:
        raise ValueError("these ranks carry no query groups (t2v_group)")
    keys, t_units, _ = pq.units()
    return {g: Direction(pq.t2v_rank[pq.t2v_group == g], t_units[pq.t2v_group == g], len(keys)) for g in group_names(pq)}


def group_metrics(runs: Sequence[PerQuery], n_boot: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                  seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per group: number of queries, t2v R@1/R@5 (mean over the runs: seeds of one row) and the 95% bootstrap
    interval of that mean (videos resampled, shared by the seeds). Empty when a run carries no groups.

    Raises ValueError when the runs' queries or groups differ."""
    if not runs or any(pq.t2v_group is None for pq in runs):
        return {}
    sets = [pq.sorted() for pq in runs]
    for other in sets[1:]:
        _check_same_queries(sets[0], other, ("first run", "another run"))
        if not np.array_equal(sets[0].t2v_group, other.t2v_group):
            raise ValueError("the runs give the same captions different groups")
    per_run = [group_directions(pq) for pq in sets]
    out: dict[str, dict[str, Any]] = {}
    for group in per_run[0]:
        dirs = [d[group] for d in per_run]
        values = np.mean([direction_metrics(d, np.ones((1, d.n_units)), GROUP_KS)[0] for d in dirs], axis=0)
        entry: dict[str, Any] = {
            "queries": int(len(dirs[0].ranks)),
            "metrics": {name: float(values[i]) for i, name in enumerate(GROUP_METRICS)},
        }
        if n_boot > 0:
            bounds = bootstrap_intervals([{"t2v": d} for d in dirs], n_boot, level, seed, GROUP_KS)
            entry["intervals"] = {name: bounds[name] for name in GROUP_METRICS}
        out[group] = entry
    return out


def paired_group_comparison(a: PerQuery, b: PerQuery, n_boot: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                            seed: int = 0, names: tuple[str, str] = ("A", "B")) -> dict[str, dict[str, Any]]:
    """Per group and metric (t2v R@1, R@5): A, B, A - B, its paired-bootstrap interval (the same resampled videos
    for both) and the paired permutation p-value (tvr_bench/stats.py). Empty unless both runs carry groups.

    Raises KeyMismatchError unless both runs ranked the same queries, ValueError when their groups differ."""
    if a.t2v_group is None or b.t2v_group is None:
        return {}
    a, b = a.sorted(), b.sorted()
    _check_same_queries(a, b, names)
    if not np.array_equal(a.t2v_group, b.t2v_group):
        raise ValueError("the two runs give the same captions different groups")
    da, db = group_directions(a), group_directions(b)
    out: dict[str, dict[str, Any]] = {}
    for gi, group in enumerate(da):
        A, B = da[group], db[group]
        rng = np.random.default_rng(seed + gi)
        diffs = [direction_metrics(A, W, GROUP_KS) - direction_metrics(B, W, GROUP_KS)
                 for W in (resample_counts(A.n_units, size, rng) for size in _chunks(n_boot, A.n_units))]
        bounds = percentile_interval(np.concatenate(diffs), level)
        ones = np.ones((1, A.n_units))
        va, vb = direction_metrics(A, ones, GROUP_KS)[0], direction_metrics(B, ones, GROUP_KS)[0]
        hits = np.stack([A.per_unit(("hits", k)) - B.per_unit(("hits", k)) for k in GROUP_KS], axis=1)
        p = permutation_pvalues_ratio(hits, n_boot, seed + 101 + gi)
        out[group] = {
            name: {"a": float(va[i]), "b": float(vb[i]), "diff": float(va[i] - vb[i]),
                   "ci": [float(bounds[0, i]), float(bounds[1, i])], "p": float(p[i])}
            for i, name in enumerate(GROUP_METRICS)
        }
    return out
