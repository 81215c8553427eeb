"""Retrieval by caption type: the per-group metrics and intervals, the paired comparison per group, the ranks file
that carries the groups, the synthetic datamodule's caption types and `tvr-bench compare`'s per-type table."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from tests.data_fixtures import tiny_root  # noqa: F401 - pytest fixture
from tvr_bench.compare import compare_main, compare_runs
from tvr_bench.data import synth
from tvr_bench.data.benchmarks.synthetic import SyntheticDataModule
from tvr_bench.diagnostics import group_metrics, group_names, paired_group_comparison
from tvr_bench.results import SCHEMA, diagnostic_columns
from tvr_bench.stats import PerQuery


def _runs(n_videos: int = 40, seed: int = 0, shift: int = 0) -> PerQuery:
    """Two captions per video (types `a`, `b`); type `a` ranks well, type `b` badly (`shift` worsens `a`)."""
    rng = np.random.default_rng(seed)
    videos = [f"v{i:03d}" for i in range(n_videos)]
    keys = [f"{v}#{j}" for v in videos for j in range(2)]
    groups = ["a", "b"] * n_videos
    ranks = np.where(np.array(groups) == "a", 1 + rng.integers(0, 2, 2 * n_videos) * shift, rng.integers(1, 20, 2 * n_videos))
    return PerQuery(t2v_rank=ranks, t2v_key=keys, t2v_video=[k.split("#")[0] for k in keys],
                    v2t_rank=rng.integers(1, 5, n_videos), v2t_key=videos, t2v_group=groups)


def test_group_metrics_on_known_ranks() -> None:
    pq = _runs()
    stats = group_metrics([pq], n_boot=300)
    assert group_names(pq) == ["a", "b"] and list(stats) == ["a", "b"]
    assert stats["a"] == {"queries": 40, "metrics": {"t2v/R@1": 100.0, "t2v/R@5": 100.0},
                          "intervals": {"t2v/R@1": [100.0, 100.0], "t2v/R@5": [100.0, 100.0]}}
    b = pq.t2v_rank[pq.t2v_group == "b"]
    assert stats["b"]["metrics"]["t2v/R@1"] == pytest.approx(100 * np.mean(b <= 1))
    assert stats["b"]["metrics"]["t2v/R@5"] == pytest.approx(100 * np.mean(b <= 5))
    lo, hi = stats["b"]["intervals"]["t2v/R@5"]
    assert lo < stats["b"]["metrics"]["t2v/R@5"] < hi
    # two seeds: the mean, and the interval of the mean
    two = group_metrics([pq, _runs(shift=1)], n_boot=300)
    assert two["a"]["metrics"]["t2v/R@1"] == pytest.approx((100 + group_metrics([_runs(shift=1)], 0)["a"]["metrics"]["t2v/R@1"]) / 2)
    assert "intervals" not in group_metrics([pq], n_boot=0)["a"]
    assert group_metrics([PerQuery(pq.t2v_rank, pq.t2v_key, pq.t2v_video, pq.v2t_rank, pq.v2t_key)]) == {}


def test_paired_comparison_by_group() -> None:
    a, b = _runs(), _runs(shift=5)
    same = paired_group_comparison(a, a, n_boot=200)
    assert same["a"]["t2v/R@1"]["diff"] == 0.0 and same["a"]["t2v/R@1"]["p"] == 1.0
    diff = paired_group_comparison(a, b, n_boot=500)
    r1 = diff["a"]["t2v/R@1"]
    assert r1["a"] == 100.0 and r1["diff"] == pytest.approx(100.0 - r1["b"]) and r1["diff"] > 20
    assert r1["ci"][0] > 0 and r1["p"] < 0.01
    assert diff["b"]["t2v/R@1"]["diff"] == 0.0  # group b is identical in both runs
    other = _runs(n_videos=39)
    with pytest.raises(ValueError, match="not tested on the same queries"):
        paired_group_comparison(a, other)


def test_ranks_file_keeps_the_groups() -> None:
    pq = _runs()
    buf = io.BytesIO()
    pq.save(buf)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as data:
        back = PerQuery(**{k: data[k] for k in data.files})
    assert np.array_equal(back.t2v_group, pq.t2v_group)
    assert np.array_equal(back.sorted().t2v_group, pq.sorted().t2v_group)
    with pytest.raises(ValueError, match="one entry per t2v query"):
        PerQuery(pq.t2v_rank, pq.t2v_key, pq.t2v_video, pq.v2t_rank, pq.v2t_key, t2v_group=["a"])


def test_synthetic_caption_types_come_from_the_shards(tiny_root: Path) -> None:
    dm = SyntheticDataModule(size="tiny", root=str(tiny_root), num_workers=0)
    types = dm.caption_types("test")
    assert len(types) == 16 * 5
    assert [types[f"test-00003#{j}"] for j in range(5)] == list(synth.CAPTION_TYPES)
    assert SyntheticDataModule(size="tiny", root=str(tiny_root), caption_mode="paragraph").caption_types("test") is None


def _write_run(folder: Path, name: str, pq: PerQuery) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pq.save(str(folder / f"{name}.ranks.npz"))
    result = {"schema": SCHEMA, "method": name, "dataset": "synthetic", "backbone": "tiny", "seed": 0,
              "per_query": {"file": f"{name}.ranks.npz"}}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(result))
    return path


def test_compare_reports_each_caption_type(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a, b = _write_run(tmp_path, "good", _runs()), _write_run(tmp_path, "worse", _runs(shift=5))
    comparison = compare_runs(a, b, n_boot=300)
    assert set(comparison["by_caption_type"]) == {"a", "b"}
    assert comparison["by_caption_type"]["a"]["t2v/R@1"]["p"] < 0.05
    assert compare_main([str(a), str(b), "--resamples", "300"]) == 0
    out = capsys.readouterr().out
    assert "t2v by caption type" in out and "t2v/R@5" in out


def test_flat_columns_of_diagnostics() -> None:
    result = {
        "diagnostics": {"caption_types": {"order": {"queries": 5, "metrics": {"t2v/R@1": 20.0, "t2v/R@5": 60.0},
                                                    "intervals": {"t2v/R@1": [0.0, 40.0]}}}},
        "probes": {"probes": {"reversed": {"metrics": {"t2v/R@1": 10.0, "v2t/R@1": 9.0},
                                           "drop": {"t2v/R@1": {"value": 5.0, "ci": [1.0, 9.0], "p": 0.01}},
                                           "caption_types": {"order": {"metrics": {"t2v/R@1": 0.0}}}}}},
    }
    assert diagnostic_columns(result) == {
        "types/order/t2v/R@1": 20.0, "types/order/t2v/R@5": 60.0,
        "types/order/t2v/R@1_ci_lo": 0.0, "types/order/t2v/R@1_ci_hi": 40.0,
        "probe/reversed/t2v/R@1": 10.0, "probe/reversed/drop/t2v/R@1": 5.0,
        "probe/reversed/drop/t2v/R@1_ci_lo": 1.0, "probe/reversed/drop/t2v/R@1_ci_hi": 9.0,
        "probe/reversed/v2t/R@1": 9.0, "probe/reversed/types/order/t2v/R@1": 0.0,
    }
