"""`tvr-bench compare`: paired comparison of two runs from their result files or run directories."""

from __future__ import annotations

import json


from tests.leaderboard_toys import ranked_result, write_results
from tvr_bench.cli import TOOL_COMMANDS, main
from tvr_bench.compare import compare_main, compare_runs, verdict
from tvr_bench.stats import PerQuery


def _two_runs(tmp_path, quality_b: float = 0.5):
    a, pa = ranked_result("xpool", "synthetic", 0, quality=3.0, noise_seed=1, n_video=120)
    b, pb = ranked_result("clip4clip", "synthetic", 0, quality=quality_b, noise_seed=2, n_video=120)
    write_results(tmp_path, [a, b], ranks={id(a): pa, id(b): pb})
    return tmp_path / "results" / "xpool__synthetic__tiny__seed0.json", tmp_path / "results" / "clip4clip__synthetic__tiny__seed0.json"


def test_compare_is_a_tool_command():
    assert TOOL_COMMANDS["compare"] == "tvr_bench.compare:compare_main"


def test_compare_two_result_files(tmp_path, capsys):
    a, b = _two_runs(tmp_path)
    out_json = tmp_path / "cmp.json"
    assert main(["compare", str(a), str(b), "--resamples", "2000", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "t2v/R@1" in out and "95% paired interval" in out and "significant at the 5% level" in out
    data = json.loads(out_json.read_text())
    r1 = data["metrics"]["t2v/R@1"]
    assert r1["diff"] > 0 and r1["ci"][0] > 0 and r1["p"] < 0.01
    assert set(data["metrics"]) == {f"{d}/{m}" for d in ("t2v", "v2t") for m in ("R@1", "R@5", "R@10", "MdR", "MnR")}
    assert data["verdict"].startswith("On the 240 text queries") and "xpool (seed 0) retrieves better" in data["verdict"]


def test_verdict_says_when_the_test_set_cannot_tell_runs_apart(tmp_path):
    a, b = _two_runs(tmp_path, quality_b=3.0)
    comparison = compare_runs(a, b, n_boot=2000)
    text = verdict(comparison)
    if comparison["metrics"]["t2v/R@1"]["p"] >= 0.05:
        assert "is not significant at the 5% level" in text
    assert "not training randomness" in text


def test_compare_run_directories(tmp_path):
    a, b = _two_runs(tmp_path)
    for name, src in (("run_a", a), ("run_b", b)):
        run = tmp_path / name / "tvr-bench" / "abc123"
        run.mkdir(parents=True)
        result = json.loads(src.read_text())
        (run / "result.ranks.npz").write_bytes((src.parent / result["per_query"]["file"]).read_bytes())
        result["per_query"]["file"] = "result.ranks.npz"
        (run / "result.json").write_text(json.dumps(result))
    comparison = compare_runs(tmp_path / "run_a", tmp_path / "run_b", n_boot=500)
    assert comparison["metrics"]["t2v/R@1"]["diff"] > 0


def test_compare_refuses_different_queries_naming_the_difference(tmp_path, capsys):
    a, b = _two_runs(tmp_path)
    result = json.loads(b.read_text())
    ranks = tmp_path / "results" / result["per_query"]["file"]
    pq = PerQuery.load(str(ranks))
    PerQuery(pq.t2v_rank[2:], pq.t2v_key[2:], pq.t2v_video[2:], pq.v2t_rank, pq.v2t_key).save(str(ranks))
    assert compare_main([str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert "not tested on the same queries" in err and "text queries (caption keys): 240 in A" in err
    assert "2 only in A (" in err and "(e.g. video000#0, video000#1)" in err


def test_compare_refuses_results_without_ranks(tmp_path, capsys):
    a, b = _two_runs(tmp_path)
    result = json.loads(b.read_text())
    del result["per_query"]
    b.write_text(json.dumps(result))
    assert compare_main([str(a), str(b)]) == 2
    assert "has no per-query ranks" in capsys.readouterr().err
    assert compare_main([str(a), str(tmp_path / "nowhere")]) == 2
    assert "no such result file or run directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- different data
def _synthetic_runs(tmp_path, synth_seed_b: int = 1, **protocol_b):
    """Two synthetic runs with the same query keys; B's set generated from another seed (or another protocol)."""
    a, pa = ranked_result("xpool", "synthetic", 0, quality=3.0, noise_seed=1, n_video=120,
                          datamodule={"hparams": {"size": "default", "synth_seed": 0}},
                          protocol={"test_split": "test", "protocol_videos": None})
    b, pb = ranked_result("clip4clip", "synthetic", 0, quality=0.5, noise_seed=2, n_video=120,
                          datamodule={"hparams": {"size": "default", "synth_seed": synth_seed_b}},
                          protocol={"test_split": "test", "protocol_videos": None, **protocol_b})
    write_results(tmp_path, [a, b], ranks={id(a): pa, id(b): pb})
    return tmp_path / "results" / "xpool__synthetic__tiny__seed0.json", tmp_path / "results" / "clip4clip__synthetic__tiny__seed0.json"


def test_compare_refuses_runs_on_different_data_with_one_line(tmp_path, capsys):
    """Same query keys, different videos (another generation seed) or another split: refused, one line naming
    the difference and the override."""
    a, b = _synthetic_runs(tmp_path)
    assert compare_main([str(a), str(b), "--resamples", "200"]) == 2
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: refused:"), errors
    assert "synthetic generation seed 0 vs 1" in errors[0] and "--allow-different-data" in errors[0]
    assert not captured.out
    a, b = _synthetic_runs(tmp_path / "split", synth_seed_b=0, test_split="val")
    assert compare_main([str(a), str(b)]) == 2
    assert "split test vs val" in capsys.readouterr().err


def test_compare_different_data_override_is_stated_in_the_verdict(tmp_path, capsys):
    a, b = _synthetic_runs(tmp_path)
    out_json = tmp_path / "cmp.json"
    assert compare_main([str(a), str(b), "--resamples", "500", "--allow-different-data", "--json", str(out_json)]) == 0
    data = json.loads(out_json.read_text())
    assert data["different_data"] == ["synthetic generation seed 0 vs 1"]
    assert data["verdict"].startswith("These runs were tested on DIFFERENT data (synthetic generation seed 0 vs 1), "
                                      "compared anyway because of --allow-different-data")
    assert "DIFFERENT data" in " ".join(capsys.readouterr().out.split())


def test_p_at_the_resampling_floor_reads_below_it(tmp_path, capsys):
    """No permutation reaches a large difference: p = 1 / (1 + n) is printed as `< 1/n`, never as `0.0001`."""
    from tvr_bench.compare import format_p

    assert format_p(1 / 10_001, 10_000) == "< 0.0001" and format_p(1 / 2_001, 2_000) == "< 0.0005"
    assert format_p(2 / 10_001, 10_000) == "0.0002" and format_p(0.5, 10_000) == "0.5000"
    a, b = _two_runs(tmp_path)
    comparison = compare_runs(a, b, n_boot=10_000)
    assert comparison["metrics"]["t2v/R@1"]["p"] == 1 / 10_001  # at the floor: no permutation reached it
    assert "p < 0.0001), which is significant" in verdict(comparison)
    assert compare_main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "< 0.0001 *" in out and "0.0001 *" not in out.replace("< 0.0001 *", "")
