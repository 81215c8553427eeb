"""Uncertainty of retrieval metrics from per-query ranks: bootstrap intervals and paired tests.

Everything here is a pure numpy function of 1-based ranks (as :func:`tvr_bench.metrics.query_ranks`
returns them) and of the *unit* each query belongs to.

Resampling unit
    The unit is the **video**. A text -> video query belongs to the video it describes, a video -> text
    query is the video itself. On a multi-caption test set (MSVD: ~41 captions per video, VATEX,
    MSR-VTT full) the captions of one video are not independent draws (they share the video's
    difficulty), so a bootstrap that resampled captions one by one would give intervals that are too
    narrow. Resampling videos with all their captions (a cluster bootstrap) keeps that dependence.
    With one caption per video the unit is the query itself and this is the ordinary bootstrap.

Intervals
    Percentile bootstrap: ``n_boot`` (10,000 by default) resamples of the units with replacement,
    every metric recomputed on each resample exactly as :func:`tvr_bench.metrics.rank_metrics` does
    (R@k and MnR as ratios of sums over the resampled queries, MdR as the ``np.median`` of the
    resampled multiset), and the 2.5 / 97.5 percentiles as the 95% interval. A resample is a vector of
    counts (how often each unit was drawn), so every statistic is a matrix product: vectorised, and
    chunked so the temporaries stay below ~64 MiB.

Paired comparison (two runs on the same queries)
    * interval of the difference: the same bootstrap resample applied to both runs (paired bootstrap);
    * p-value: a paired permutation test. Under the null hypothesis "both runs are equally good",
      the labels A/B are exchangeable within each unit, so each permutation swaps the two runs'
      ranks of a random half of the units (independently per unit, ``n_perm`` = 10,000 times) and
      recomputes the difference; p = (1 + #{|permuted difference| >= |observed difference|}) /
      (1 + n_perm), two-sided. It is valid at any sample size; with discrete metrics (R@k) it is
      slightly conservative.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 10_000
DEFAULT_LEVEL = 0.95
DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
#: memory for the temporaries of one chunk of resamples (counts matrix and products)
CHUNK_BYTES = 64 * 2**20
METRIC_NAMES = tuple(f"R@{k}" for k in DEFAULT_KS) + ("MdR", "MnR")
#: half-width (in distinct rank values) of the first window in which the bootstrap medians are searched
INITIAL_HALF_WINDOW = 8

__all__ = [
    "DEFAULT_LEVEL",
    "DEFAULT_RESAMPLES",
    "Direction",
    "KeyMismatchError",
    "PerQuery",
    "bootstrap_intervals",
    "bootstrap_ratio_intervals",
    "direction_metrics",
    "paired_comparison",
    "percentile_interval",
    "permutation_pvalues_ratio",
    "resample_counts",
]


class KeyMismatchError(ValueError):
    """Two per-query rank sets do not hold the same queries (a paired comparison is impossible)."""


# ---------------------------------------------------------------------------------------------- containers
@dataclass
class Direction:
    """The ranks of one retrieval direction: `ranks[i]` (1-based) of query i, which belongs to unit `units[i]`."""

    ranks: np.ndarray
    units: np.ndarray
    n_units: int
    _cache: dict[Any, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.ranks = np.asarray(self.ranks, dtype=np.int64)
        self.units = np.asarray(self.units, dtype=np.int64)
        if self.ranks.ndim != 1 or self.ranks.shape != self.units.shape:
            raise ValueError(f"ranks {self.ranks.shape} and units {self.units.shape} must be 1-D of one length")
        if self.ranks.size == 0:
            raise ValueError("no queries")
        if self.ranks.min() < 1:
            raise ValueError(f"ranks are 1-based, got a minimum of {self.ranks.min()}")
        if self.units.min() < 0 or self.units.max() >= self.n_units:
            raise ValueError(f"unit ids must lie in [0, {self.n_units - 1}]")

    def per_unit(self, what: Any) -> np.ndarray:
        """Per-unit sums (float64 `[n_units]`): `"count"`, `"ranksum"`, `("hits", k)` or `("le", value)`."""
        if what not in self._cache:
            if what == "count":
                weights = None
            elif what == "ranksum":
                weights = self.ranks.astype(np.float64)
            elif what[0] in ("hits", "le"):
                weights = (self.ranks <= what[1]).astype(np.float64)
            else:
                raise KeyError(what)
            self._cache[what] = np.bincount(self.units, weights=weights, minlength=self.n_units).astype(np.float64)
        return self._cache[what]

    def values(self) -> np.ndarray:
        """Sorted distinct rank values."""
        if "values" not in self._cache:
            self._cache["values"] = np.unique(self.ranks)
        return self._cache["values"]


@dataclass
class PerQuery:
    """Per-query ranks of one run: t2v (per caption, keyed by caption key and its video key) and v2t (per video).

    `dsl` holds the same two rank arrays after dual softmax when the run computed them. `t2v_group` names the
    kind of each text query when the test set defines one (the synthetic captions' type: full, first, second,
    order, objects; tvr_bench/diagnostics.py), else None.
    """

    t2v_rank: np.ndarray
    t2v_key: np.ndarray
    t2v_video: np.ndarray
    v2t_rank: np.ndarray
    v2t_key: np.ndarray
    dsl_t2v_rank: np.ndarray | None = None
    dsl_v2t_rank: np.ndarray | None = None
    t2v_group: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.t2v_rank = np.asarray(self.t2v_rank, dtype=np.int64)
        self.v2t_rank = np.asarray(self.v2t_rank, dtype=np.int64)
        self.t2v_key = np.asarray(self.t2v_key, dtype=str)
        self.t2v_video = np.asarray(self.t2v_video, dtype=str)
        self.v2t_key = np.asarray(self.v2t_key, dtype=str)
        if not (self.t2v_rank.shape == self.t2v_key.shape == self.t2v_video.shape):
            raise ValueError("t2v_rank, t2v_key and t2v_video must have one length")
        if self.v2t_rank.shape != self.v2t_key.shape:
            raise ValueError("v2t_rank and v2t_key must have one length")
        for name in ("dsl_t2v_rank", "dsl_v2t_rank"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, np.asarray(value, dtype=np.int64))
        if self.t2v_group is not None:
            self.t2v_group = np.asarray(self.t2v_group, dtype=str)
            if self.t2v_group.shape != self.t2v_rank.shape:
                raise ValueError("t2v_group must have one entry per t2v query")

    @classmethod
    def from_results(cls, per_query: dict[str, Any]) -> PerQuery:
        """From the evaluator's `last_per_query` (columns and keys, see `callbacks.evaluator.per_query_results`)."""
        video_keys = np.asarray(per_query["video_keys"], dtype=str)
        as_np = lambda name: None if per_query.get(name) is None else np.asarray(per_query[name])  # noqa: E731
        return cls(
            t2v_rank=as_np("t2v_rank"),
            t2v_key=np.asarray(per_query["caption_keys"], dtype=str),
            t2v_video=video_keys[np.asarray(per_query["text_to_video"])],
            v2t_rank=as_np("v2t_rank"),
            v2t_key=video_keys[np.asarray(per_query["v2t_video"])],
            dsl_t2v_rank=as_np("dsl_t2v_rank"),
            dsl_v2t_rank=as_np("dsl_v2t_rank"),
            t2v_group=as_np("caption_type"),
        )

    def units(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sorted unit = video keys, unit id of every t2v query, unit id of every v2t query)."""
        keys = np.unique(np.concatenate([self.t2v_video, self.v2t_key]))
        return keys, np.searchsorted(keys, self.t2v_video), np.searchsorted(keys, self.v2t_key)

    def directions(self, dsl: bool = False) -> dict[str, Direction]:
        """`{"t2v": Direction, "v2t": Direction}` over the shared video units (DSL ranks with `dsl`)."""
        keys, t_units, v_units = self.units()
        t_rank, v_rank = (self.dsl_t2v_rank, self.dsl_v2t_rank) if dsl else (self.t2v_rank, self.v2t_rank)
        if t_rank is None or v_rank is None:
            raise ValueError("this run has no DSL ranks")
        return {"t2v": Direction(t_rank, t_units, len(keys)), "v2t": Direction(v_rank, v_units, len(keys))}

    def sorted(self) -> PerQuery:
        """The same ranks with t2v queries sorted by caption key and v2t queries by video key."""
        t, v = np.argsort(self.t2v_key, kind="stable"), np.argsort(self.v2t_key, kind="stable")
        return PerQuery(
            self.t2v_rank[t], self.t2v_key[t], self.t2v_video[t], self.v2t_rank[v], self.v2t_key[v],
            None if self.dsl_t2v_rank is None else self.dsl_t2v_rank[t],
            None if self.dsl_v2t_rank is None else self.dsl_v2t_rank[v],
            None if self.t2v_group is None else self.t2v_group[t],
        )

    def save(self, path: str | Any) -> None:
        """Write the ranks and keys as a compressed `.npz` to a path or binary file (plain arrays: loads with
        `allow_pickle=False`)."""
        arrays = {k: getattr(self, k) for k in ("t2v_rank", "t2v_key", "t2v_video", "v2t_rank", "v2t_key")}
        arrays["t2v_rank"] = arrays["t2v_rank"].astype(np.int32)
        arrays["v2t_rank"] = arrays["v2t_rank"].astype(np.int32)
        for name in ("dsl_t2v_rank", "dsl_v2t_rank"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name).astype(np.int32)
        if self.t2v_group is not None:
            arrays["t2v_group"] = self.t2v_group
        if hasattr(path, "write"):
            np.savez_compressed(path, **arrays)
            return
        with open(path, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    @classmethod
    def load(cls, path: str) -> PerQuery:
        """Read a file written by :meth:`save` (never unpickles)."""
        with np.load(path, allow_pickle=False) as data:
            return cls(**{k: data[k] for k in data.files})


# ---------------------------------------------------------------------------------------------- resampling
def resample_counts(n_units: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` bootstrap resamples of `n_units` units as counts (float64 `[n, n_units]`, each row sums to `n_units`)."""
    draws = rng.integers(0, n_units, size=(n, n_units))
    draws += (np.arange(n) * n_units)[:, None]
    return np.bincount(draws.ravel(), minlength=n * n_units).reshape(n, n_units).astype(np.float64)


def _chunks(total: int, n_units: int, columns: int = 8) -> list[int]:
    """Sizes of the resample chunks whose temporaries fit CHUNK_BYTES."""
    step = max(1, CHUNK_BYTES // (8 * n_units * (3 + columns)))
    return [min(step, total - s) for s in range(0, total, step)]


def percentile_interval(samples: np.ndarray, level: float = DEFAULT_LEVEL) -> np.ndarray:
    """Percentile interval of bootstrap samples along axis 0: `[2, ...]` (lower, upper)."""
    alpha = 100.0 * (1.0 - level) / 2.0
    return np.percentile(samples, [alpha, 100.0 - alpha], axis=0)


def _window(values: np.ndarray, center: float, half: int = 0) -> list[float]:
    """The rank values `_medians` evaluates first: the window around `center` and one value below it."""
    half = half or INITIAL_HALF_WINDOW
    mid = int(np.searchsorted(values, center))
    j0, j1 = max(0, mid - half), min(len(values) - 1, mid + half)
    return [float(v) for v in values[max(0, j0 - 1): j1 + 1]]


def _medians(M: np.ndarray, N: np.ndarray, values: np.ndarray, column: Callable[[float], tuple[float, np.ndarray]],
             center: float, precomputed: np.ndarray | None = None) -> np.ndarray:
    """`np.median` of each row's multiset when the count of queries with rank <= v is `base + M @ x` for
    `(base, x) = column(v)`, the row's size is `N`, and `values` are the possible ranks (sorted).

    Only the rank values around `center` are evaluated (one matrix product); the window widens until every
    row's two middle order statistics fall inside it, so the answer is exact."""
    k_lo = np.floor((N - 1) / 2.0)
    k_hi = np.floor(N / 2.0)
    mid = int(np.searchsorted(values, center))
    half = INITIAL_HALF_WINDOW
    while True:
        j0, j1 = max(0, mid - half), min(len(values) - 1, mid + half)
        first = max(0, j0 - 1)  # one column below the window: checks that no order statistic lies below it
        if half == INITIAL_HALF_WINDOW and precomputed is not None:
            C = precomputed
        else:
            pairs = [column(float(values[j])) for j in range(first, j1 + 1)]
            bases = np.array([b for b, _ in pairs])
            C = bases[None, :] + M @ np.stack([x for _, x in pairs], axis=1)  # [rows, window]: queries with rank <= v
        below, C = (C[:, 0], C[:, 1:]) if j0 > 0 else (None, C)
        ok_low = below is None or bool(np.all(below <= k_lo + 0.5))
        ok_high = j1 == len(values) - 1 or bool(np.all(C[:, -1] > k_hi + 0.5))
        if ok_low and ok_high:
            break
        half *= 4
    lo = values[j0 + np.minimum((C <= k_lo[:, None] + 0.5).sum(axis=1), j1 - j0)]
    hi = values[j0 + np.minimum((C <= k_hi[:, None] + 0.5).sum(axis=1), j1 - j0)]
    return (lo + hi) / 2.0


def direction_metrics(d: Direction, W: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> np.ndarray:
    """Metrics `[R@k..., MdR, MnR]` of the resamples `W` (`[n, n_units]` counts) of one direction: `[n, len(ks) + 2]`."""
    center = float(np.median(d.ranks))
    window = _window(d.values(), center)
    cols = [d.per_unit("count"), d.per_unit("ranksum"), *(d.per_unit(("hits", k)) for k in ks)]
    sums = W @ np.stack(cols + [d.per_unit(("le", v)) for v in window], axis=1)  # one product: W is read once
    N = sums[:, 0]
    median = _medians(W, N, d.values(), lambda v: (0.0, d.per_unit(("le", v))), center, sums[:, len(cols):])
    sums = sums[:, : len(cols)]
    return np.concatenate([100.0 * sums[:, 2:] / N[:, None], median[:, None], (sums[:, 1] / N)[:, None]], axis=1)


def bootstrap_intervals(directions: Sequence[dict[str, Direction]], n_boot: int = DEFAULT_RESAMPLES,
                        level: float = DEFAULT_LEVEL, seed: int = 0,
                        ks: Sequence[int] = DEFAULT_KS) -> dict[str, list[float]]:
    """95% percentile-bootstrap interval of every metric (`t2v/R@1` ... `v2t/MnR`), resampling the shared units.

    `directions` holds one `{"t2v": Direction, "v2t": Direction}` per seed of the same test set; with
    several, each resample's metric is the mean over the seeds (the interval of the seed mean, with the
    query sample shared by the seeds)."""
    if not directions:
        raise ValueError("no per-query ranks to resample")
    n_units = next(iter(directions[0].values())).n_units
    if any(d.n_units != n_units for ds in directions for d in ds.values()):
        raise ValueError("every seed must rank the same units (videos) to share a resample")
    names = [f"{direction}/{m}" for direction in directions[0] for m in (*(f"R@{k}" for k in ks), "MdR", "MnR")]
    rng = np.random.default_rng(seed)
    parts = []
    for size in _chunks(n_boot, n_units):
        W = resample_counts(n_units, size, rng)
        per_seed = [np.concatenate([direction_metrics(d, W, ks) for d in ds.values()], axis=1) for ds in directions]
        parts.append(np.mean(per_seed, axis=0))
    bounds = percentile_interval(np.concatenate(parts), level)
    return {name: [float(bounds[0, i]), float(bounds[1, i])] for i, name in enumerate(names)}


def bootstrap_ratio_intervals(values: np.ndarray, counts: np.ndarray, n_boot: int = DEFAULT_RESAMPLES,
                              level: float = DEFAULT_LEVEL, seed: int = 0) -> np.ndarray:
    """Bootstrap intervals `[m, 2]` of ratio statistics `sum(values[:, j]) / sum(counts)` over resampled units.

    `values` is `[n_units, m]` (per-unit sums of hits or ranks; m independent statistics share the resamples),
    `counts` `[n_units]` the queries per unit. R@k and MnR are such ratios."""
    values = np.asarray(values, dtype=np.float64)
    values = values[:, None] if values.ndim == 1 else values
    counts = np.asarray(counts, dtype=np.float64)
    rng = np.random.default_rng(seed)
    parts = []
    for size in _chunks(n_boot, values.shape[0], values.shape[1]):
        W = resample_counts(values.shape[0], size, rng)
        parts.append((W @ values) / (W @ counts)[:, None])
    return percentile_interval(np.concatenate(parts), level).T


# ---------------------------------------------------------------------------------------------- paired tests
def permutation_pvalues_ratio(diff: np.ndarray, n_perm: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """Two-sided paired permutation p-values `[m]` for `sum(diff[:, j]) == 0`, where `diff` `[n_units, m]` holds the
    per-unit differences A - B (swapping A and B in a unit flips the sign of its difference)."""
    diff = np.asarray(diff, dtype=np.float64)
    diff = diff[:, None] if diff.ndim == 1 else diff
    observed = np.abs(diff.sum(axis=0))
    tol = 1e-9 * (1.0 + np.abs(diff).sum(axis=0))
    rng = np.random.default_rng(seed)
    exceed = np.zeros(diff.shape[1])
    for size in _chunks(n_perm, diff.shape[0], diff.shape[1]):
        swap = rng.integers(0, 2, size=(size, diff.shape[0])).astype(np.float64)
        permuted = diff.sum(axis=0)[None, :] - 2.0 * (swap @ diff)
        exceed += (np.abs(permuted) >= observed[None, :] - tol[None, :]).sum(axis=0)
    return (1.0 + exceed) / (1.0 + n_perm)


def _check_same_queries(a: PerQuery, b: PerQuery, names: tuple[str, str]) -> None:
    """Raise KeyMismatchError naming the first differences when the two runs' queries differ."""
    problems = []
    for what, ka, kb in (("text queries (caption keys)", a.t2v_key, b.t2v_key), ("videos", a.v2t_key, b.v2t_key)):
        sa, sb = set(ka.tolist()), set(kb.tolist())
        if sa != sb:
            only_a, only_b = sorted(sa - sb), sorted(sb - sa)
            problems.append(
                f"{what}: {len(sa)} in {names[0]}, {len(sb)} in {names[1]}; "
                f"{len(only_a)} only in {names[0]} (e.g. {', '.join(only_a[:3]) or '-'}), "
                f"{len(only_b)} only in {names[1]} (e.g. {', '.join(only_b[:3]) or '-'})"
            )
    if not problems and not np.array_equal(a.t2v_video, b.t2v_video):
        problems.append("the caption keys map to different videos")
    if problems:
        raise KeyMismatchError(
            "cannot compare: the two runs were not tested on the same queries: " + "; ".join(problems)
        )


def paired_comparison(a: PerQuery, b: PerQuery, n_boot: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                      seed: int = 0, dsl: bool = False, names: tuple[str, str] = ("A", "B"),
                      ks: Sequence[int] = DEFAULT_KS) -> dict[str, dict[str, Any]]:
    """Every metric of A and B, their difference A - B, its paired-bootstrap interval and permutation p-value.

    Raises KeyMismatchError (naming the difference) unless both runs ranked exactly the same queries."""
    a, b = a.sorted(), b.sorted()
    _check_same_queries(a, b, names)
    da, db = a.directions(dsl), b.directions(dsl)
    n_units = da["t2v"].n_units
    metric_names = (*(f"R@{k}" for k in ks), "MdR", "MnR")
    rng = np.random.default_rng(seed)
    boot = []
    for size in _chunks(n_boot, n_units):
        W = resample_counts(n_units, size, rng)
        boot.append(np.concatenate([direction_metrics(da[d], W, ks) - direction_metrics(db[d], W, ks)
                                    for d in ("t2v", "v2t")], axis=1))
    bounds = percentile_interval(np.concatenate(boot), level)
    ones = np.ones((1, n_units))
    out: dict[str, dict[str, Any]] = {}
    for di, direction in enumerate(("t2v", "v2t")):
        A, B = da[direction], db[direction]
        value_a, value_b = direction_metrics(A, ones, ks)[0], direction_metrics(B, ones, ks)[0]
        ratio = [("hits", k) for k in ks] + [None, "ranksum"]
        diffs = np.stack([A.per_unit(r) - B.per_unit(r) for r in ratio if r is not None], axis=1)
        p_ratio = permutation_pvalues_ratio(diffs, n_boot, seed + 1 + di)
        p_median = _median_permutation_p(A, B, n_boot, seed + 11 + di)
        p_values = [*p_ratio[: len(ks)], p_median, p_ratio[len(ks)]]
        for mi, metric in enumerate(metric_names):
            col = di * len(metric_names) + mi
            out[f"{direction}/{metric}"] = {
                "a": float(value_a[mi]), "b": float(value_b[mi]), "diff": float(value_a[mi] - value_b[mi]),
                "ci": [float(bounds[0, col]), float(bounds[1, col])], "p": float(p_values[mi]),
            }
    return out


def _median_permutation_p(A: Direction, B: Direction, n_perm: int, seed: int) -> float:
    """Paired permutation p-value of the MdR difference (units' rank lists swapped between A and B)."""
    observed = abs(float(np.median(A.ranks)) - float(np.median(B.ranks)))
    values = np.union1d(A.values(), B.values())
    center = float(np.median(np.concatenate([A.ranks, B.ranks])))
    N_a, N_b = A.per_unit("count"), B.per_unit("count")
    rng = np.random.default_rng(seed)
    exceed = 0
    for size in _chunks(n_perm, A.n_units):
        S = rng.integers(0, 2, size=(size, A.n_units)).astype(np.float64)
        N_ap = N_a.sum() + S @ (N_b - N_a)
        N_bp = N_b.sum() + S @ (N_a - N_b)
        med_a = _medians(S, N_ap, values, lambda v: (A.per_unit(("le", v)).sum(),
                                                     B.per_unit(("le", v)) - A.per_unit(("le", v))), center)
        med_b = _medians(S, N_bp, values, lambda v: (B.per_unit(("le", v)).sum(),
                                                     A.per_unit(("le", v)) - B.per_unit(("le", v))), center)
        exceed += int((np.abs(med_a - med_b) >= observed - 1e-9).sum())
    return (1.0 + exceed) / (1.0 + n_perm)
