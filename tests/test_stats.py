"""Bootstrap intervals and paired tests (tvr_bench/stats.py) on simulated rank data with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tvr_bench.metrics import query_ranks, rank_metrics, retrieval_metrics
from tvr_bench.stats import (
    Direction,
    KeyMismatchError,
    PerQuery,
    bootstrap_intervals,
    bootstrap_ratio_intervals,
    direction_metrics,
    paired_comparison,
    permutation_pvalues_ratio,
    resample_counts,
)


def _multi_caption(seed: int = 0, n_video: int = 60, shift: float = 1.5):
    """A random multi-caption score matrix (1-6 captions per video) with its ranks as a PerQuery."""
    rng = np.random.default_rng(seed)
    caps = rng.integers(1, 7, size=n_video)
    t2v = torch.from_numpy(np.repeat(np.arange(n_video), caps))
    sim = torch.randn(len(t2v), n_video, generator=torch.Generator().manual_seed(seed))
    sim[torch.arange(len(t2v)), t2v] += shift
    sim[3, :5] = sim[3, int(t2v[3])]  # ties, resolved pessimistically like the metrics
    return sim, t2v, _per_query(sim, t2v)


def _per_query(sim: torch.Tensor, t2v: torch.Tensor) -> PerQuery:
    ranks = query_ranks(sim, t2v)
    vkeys = np.array([f"video{i:03d}" for i in range(sim.shape[1])])
    caption_keys = np.array([f"video{int(v):03d}#{j}" for j, v in enumerate(t2v)])
    return PerQuery(ranks["t2v"].numpy(), caption_keys, vkeys[t2v.numpy()], ranks["v2t"].numpy(),
                    vkeys[ranks["v2t_video"].numpy()])


def test_query_ranks_give_the_retrieval_metrics():
    sim, t2v, _ = _multi_caption()
    ranks = query_ranks(sim, t2v)
    metrics = retrieval_metrics(sim, t2v)
    for direction in ("t2v", "v2t"):
        assert {f"{direction}/{k}": v for k, v in rank_metrics(ranks[direction]).items()} == {
            k: v for k, v in metrics.items() if k.startswith(direction)}
    assert ranks["t2v"].shape == (len(t2v),) and ranks["v2t_video"].tolist() == sorted(set(t2v.tolist()))


def test_direction_metrics_on_every_resample_match_a_brute_force_recomputation():
    sim, t2v, pq = _multi_caption(seed=1)
    directions = pq.directions()
    ones = np.ones((1, directions["t2v"].n_units))
    for name, d in directions.items():
        expected = rank_metrics(torch.from_numpy(d.ranks))
        assert direction_metrics(d, ones)[0].tolist() == pytest.approx(list(expected.values()))
    W = resample_counts(directions["t2v"].n_units, 40, np.random.default_rng(2))
    assert (W.sum(axis=1) == W.shape[1]).all()
    got = direction_metrics(directions["t2v"], W)
    d = directions["t2v"]
    for b in range(len(W)):
        chosen = np.concatenate([np.flatnonzero(d.units == u) for u in np.repeat(np.arange(d.n_units), W[b].astype(int))])
        brute = rank_metrics(torch.from_numpy(d.ranks[chosen]))
        assert got[b].tolist() == pytest.approx(list(brute.values()))  # MdR: np.median of the resampled multiset


def test_rank_file_round_trip_without_pickle(tmp_path):
    _, _, pq = _multi_caption()
    pq.dsl_t2v_rank = pq.t2v_rank + 1
    pq.dsl_v2t_rank = pq.v2t_rank
    path = tmp_path / "ranks.npz"
    pq.save(str(path))
    with np.load(path, allow_pickle=False) as data:
        assert set(data.files) == {"t2v_rank", "t2v_key", "t2v_video", "v2t_rank", "v2t_key", "dsl_t2v_rank", "dsl_v2t_rank"}
    back = PerQuery.load(str(path))
    assert (back.t2v_rank == pq.t2v_rank).all() and (back.t2v_key == pq.t2v_key).all()
    assert (back.dsl_t2v_rank == pq.t2v_rank + 1).all() and (back.v2t_key == pq.v2t_key).all()


def test_interval_coverage_on_simulated_rates():
    """1,000 simulated test sets of 400 queries with a known hit rate: about 95% of the intervals contain it."""
    rng = np.random.default_rng(0)
    true_rate, n_sets, n_queries = 0.3, 1000, 400
    hits = (rng.random((n_queries, n_sets)) < true_rate).astype(np.float64)
    bounds = bootstrap_ratio_intervals(hits, np.ones(n_queries), n_boot=2000, seed=1)
    covered = (bounds[:, 0] <= true_rate) & (true_rate <= bounds[:, 1])
    assert 0.93 <= covered.mean() <= 0.97, covered.mean()


def test_cluster_bootstrap_covers_multi_caption_sets_where_captions_are_correlated():
    """Captions of one video share its difficulty: resampling videos keeps coverage near 95%; resampling
    captions one by one (the naive bootstrap) gives intervals that are too narrow."""
    rng = np.random.default_rng(1)
    n_sets, n_videos, caps = 1000, 200, rng.integers(1, 12, size=200)
    difficulty = rng.beta(1.0, 1.5, size=(n_videos, n_sets))  # per-video hit probability, mean 0.4
    true_rate = 1.0 / (1.0 + 1.5)
    hits_per_video = rng.binomial(caps[:, None], difficulty).astype(np.float64)  # correlated within a video
    cluster = bootstrap_ratio_intervals(hits_per_video, caps, n_boot=2000, seed=2)
    covered = (cluster[:, 0] <= true_rate) & (true_rate <= cluster[:, 1])
    assert 0.93 <= covered.mean() <= 0.97, covered.mean()
    # naive: every caption its own unit (expanded from the same data)
    unit = np.repeat(np.arange(n_videos), caps)
    per_caption = np.zeros((len(unit), n_sets))
    for v in range(n_videos):
        rows = np.flatnonzero(unit == v)
        per_caption[rows] = (np.arange(len(rows))[:, None] < hits_per_video[v][None, :]).astype(np.float64)
    naive = bootstrap_ratio_intervals(per_caption, np.ones(len(unit)), n_boot=2000, seed=2)
    naive_cov = ((naive[:, 0] <= true_rate) & (true_rate <= naive[:, 1])).mean()
    assert naive_cov < 0.9, naive_cov


def test_full_metric_intervals_contain_the_point_estimate_and_shrink_with_more_queries():
    widths = []
    for n_video in (40, 400):
        sim, t2v, pq = _multi_caption(seed=3, n_video=n_video)
        intervals = bootstrap_intervals([pq.directions()], n_boot=2000)
        metrics = retrieval_metrics(sim, t2v)
        assert set(intervals) == set(metrics)
        for key, (lo, hi) in intervals.items():
            assert lo <= metrics[key] + 1e-9 and metrics[key] <= hi + 1e-9, key
        widths.append(intervals["t2v/R@1"][1] - intervals["t2v/R@1"][0])
    assert widths[1] < widths[0] / 2


def test_seed_mean_interval_uses_the_shared_query_sample():
    sim, t2v, pq = _multi_caption(seed=4)
    sim2 = sim + 0.3 * torch.randn(sim.shape, generator=torch.Generator().manual_seed(9))
    pq2 = _per_query(sim2, t2v)
    joint = bootstrap_intervals([pq.directions(), pq2.directions()], n_boot=2000)
    one, two = bootstrap_intervals([pq.directions()], n_boot=2000), bootstrap_intervals([pq2.directions()], n_boot=2000)
    mean = (retrieval_metrics(sim, t2v)["t2v/R@1"] + retrieval_metrics(sim2, t2v)["t2v/R@1"]) / 2
    assert joint["t2v/R@1"][0] <= mean <= joint["t2v/R@1"][1]
    assert min(one["t2v/R@1"][0], two["t2v/R@1"][0]) <= joint["t2v/R@1"][0] <= max(one["t2v/R@1"][0], two["t2v/R@1"][0]) + 1.0


def test_paired_permutation_false_positive_rate_is_five_percent():
    """1,000 pairs of equally good simulated methods (independent ranks from one distribution): p < 0.05 in ~5%."""
    rng = np.random.default_rng(5)
    n_pairs, n_queries = 1000, 300
    a = (rng.random((n_queries, n_pairs)) < 0.4).astype(np.float64)
    b = (rng.random((n_queries, n_pairs)) < 0.4).astype(np.float64)
    p = permutation_pvalues_ratio(a - b, n_perm=2000, seed=6)
    rate = float((p < 0.05).mean())
    assert 0.03 <= rate <= 0.065, rate
    # a real difference is found
    better = (rng.random((n_queries, 200)) < 0.55).astype(np.float64)
    assert (permutation_pvalues_ratio(better - b[:, :200], n_perm=2000, seed=7) < 0.05).mean() > 0.9


def test_paired_comparison_of_two_runs():
    sim, t2v, pq = _multi_caption(seed=6, n_video=150)
    better = _per_query(sim + 3.0 * torch.nn.functional.one_hot(t2v, sim.shape[1]).float(), t2v)
    result = paired_comparison(better, pq, n_boot=2000, names=("better", "base"))
    r1 = result["t2v/R@1"]
    assert r1["diff"] == pytest.approx(r1["a"] - r1["b"]) and r1["diff"] > 0
    assert r1["ci"][0] > 0 and r1["p"] < 0.01
    same = paired_comparison(pq, pq, n_boot=500)
    assert all(v["diff"] == 0 and v["p"] == 1.0 and v["ci"] == [0.0, 0.0] for v in same.values())
    shuffled = PerQuery(*(x[::-1] for x in (pq.t2v_rank, pq.t2v_key, pq.t2v_video)), pq.v2t_rank[::-1], pq.v2t_key[::-1])
    assert paired_comparison(shuffled, pq, n_boot=200)["t2v/R@1"]["diff"] == 0  # order of the file does not matter


def test_paired_comparison_refuses_different_queries():
    _, _, pq = _multi_caption(seed=7)
    fewer = PerQuery(pq.t2v_rank[:-3], pq.t2v_key[:-3], pq.t2v_video[:-3], pq.v2t_rank, pq.v2t_key)
    with pytest.raises(KeyMismatchError, match=r"text queries .*3 only in A .*0 only in B"):
        paired_comparison(pq, fewer)
    renamed = PerQuery(pq.t2v_rank, pq.t2v_key, pq.t2v_video, pq.v2t_rank, np.char.add(pq.v2t_key, "x"))
    with pytest.raises(KeyMismatchError, match="videos"):
        paired_comparison(pq, renamed)


def test_direction_rejects_bad_ranks():
    with pytest.raises(ValueError, match="1-based"):
        Direction(np.array([0, 1]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="unit ids"):
        Direction(np.array([1, 1]), np.array([0, 2]), 2)


def test_medians_stay_exact_when_the_first_window_is_too_narrow(monkeypatch):
    import tvr_bench.stats as stats

    monkeypatch.setattr(stats, "INITIAL_HALF_WINDOW", 1)  # forces the widening path on most resamples
    _, _, pq = _multi_caption(seed=8, n_video=80, shift=0.3)
    d = pq.directions()["t2v"]
    W = resample_counts(d.n_units, 30, np.random.default_rng(3))
    got = direction_metrics(d, W)[:, 3]
    for b in range(len(W)):
        chosen = np.concatenate([np.flatnonzero(d.units == u) for u in np.repeat(np.arange(d.n_units), W[b].astype(int))])
        assert got[b] == np.median(d.ranks[chosen])
