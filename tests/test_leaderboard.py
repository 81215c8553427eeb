"""Leaderboard: result JSONs from the callback, aggregation over seeds, CSV/Markdown/PNG, paper numbers."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from tests.leaderboard_toys import TOY_METRICS, FakeEvaluator, ToyDataModule, ToyMethod, fake_result, write_results
from tvr_bench.callbacks.leaderboard import (
    LeaderboardWriter,
    atomic_write,
    canonical_backbone,
    dataset_name,
    flat_row,
    git_info,
    result_filename,
)
from tvr_bench.report import (
    aggregate,
    block_of,
    build_leaderboard,
    leaderboard_main,
    leaderboard_rows,
    load_expected,
    load_results,
    mean_std,
    paper_entries,
    to_csv,
    to_markdown,
)

REPO = Path(__file__).resolve().parents[1]
EXPECTED = REPO / "recipes" / "expected"


def _trainer(tmp_path: Path, *callbacks: L.Callback, **kwargs) -> L.Trainer:
    options = dict(
        default_root_dir=tmp_path,
        max_epochs=1,
        accelerator="cpu",
        logger=CSVLogger(tmp_path / "logs", name="csv"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    return L.Trainer(callbacks=list(callbacks), **{**options, **kwargs})


# ---------------------------------------------------------------------------------------------- pure helpers
def test_mean_std_is_sample_std():
    mean, std, n = mean_std([40.0, 42.0, None, 44.0])
    assert (mean, n) == (42.0, 3)
    assert std == pytest.approx(statistics.stdev([40.0, 42.0, 44.0]))
    assert mean_std([5.0]) == (5.0, None, 1)
    assert mean_std([]) == (None, None, 0)


@pytest.mark.parametrize(
    "name, label",
    [("openai/clip-vit-base-patch32", "ViT-B/32"), ("/models/clip-vit-base-patch16/", "ViT-B/16"),
     ("ViT-B/32", "ViT-B/32"), ("tiny", "tiny"), (None, "unknown"), ("/data/my_clip", "my_clip")],
)
def test_canonical_backbone(name, label):
    assert canonical_backbone(name) == label


def test_dataset_name_prefers_attribute_then_class():
    assert dataset_name(ToyDataModule(dataset="msrvtt")) == "msrvtt"

    class MsvdDataModule(L.LightningDataModule):
        pass

    assert dataset_name(MsvdDataModule()) == "msvd"
    assert dataset_name(None) == "unknown"


def test_git_info_never_fails_outside_a_repository(tmp_path):
    assert git_info(tmp_path) == {"commit": None, "dirty": None}
    info = git_info(REPO)
    assert info["commit"] is None or len(info["commit"]) == 40


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    path = atomic_write(tmp_path / "a" / "b.txt", "hello")
    atomic_write(path, b"world")
    assert path.read_text() == "world"
    assert sorted(p.name for p in path.parent.iterdir()) == ["b.txt"]


# ---------------------------------------------------------------------------------------------- aggregation
def _three_seeds_and_one():
    seeds = [fake_result("clip4clip", "msrvtt", "ViT-B/32", s, r) for s, r in ((0, 41.0), (1, 42.5), (2, 44.0))]
    other = fake_result("xpool", "synthetic", "tiny", 0, 30.0)
    return seeds, other


def test_aggregate_mean_std_over_seeds():
    seeds, other = _three_seeds_and_one()
    groups = {(g["method"], g["dataset"]): g for g in aggregate(seeds + [other])}
    g = groups[("clip4clip", "msrvtt")]
    assert g["seeds"] == [0, 1, 2] and g["n_runs"] == 3 and g["frames"] == "12"
    r1 = g["stats"]["t2v/R@1"]
    assert r1["mean"] == pytest.approx(42.5)
    assert r1["std"] == pytest.approx(statistics.stdev([41.0, 42.5, 44.0]))
    assert r1["n"] == 3
    assert g["stats"]["v2t/R@1"]["mean"] == pytest.approx(41.5)
    assert g["stats"]["train_seconds"]["mean"] == pytest.approx(11.0)
    assert "seed" not in g["stats"] and "frames" not in g["stats"]
    single = groups[("xpool", "synthetic")]["stats"]["t2v/R@1"]
    assert single == {"mean": 30.0, "std": None, "n": 1}


def test_expected_files_cover_every_method_and_keep_provenance():
    expected = load_expected(EXPECTED)
    assert {p.stem for p in EXPECTED.glob("*.yaml")} == {"clip4clip", "xpool", "drl", "tmass", "mascot", "ts2net", "emcl", "xclip"}
    [c4c] = [e for e in paper_entries(expected, "clip4clip", "MSR-VTT", "ViT-B/32") if e["label"] == "paper"]
    assert c4c["metrics"]["t2v/R@1"] == 43.1 and c4c["provenance"]["t2v/R@1"] == "[I#104]"
    assert c4c["provenance"]["t2v/R@5"] == "[P?]"  # unverified numbers stay marked
    assert paper_entries(expected, "tmass_refpairing", "msrvtt", "ViT-B/32")[0]["metrics"]["t2v/R@1"] == 50.2
    assert not paper_entries(expected, "tmass", "msrvtt", "ViT-B/32")  # the published scoring is the reference pairing
    assert paper_entries(expected, "xclip", "msrvtt", "ViT-B/16")[0]["metrics"] == {"t2v/R@1": 49.3}  # the abstract
    assert paper_entries(expected, "xpool", "msrvtt_7k", "ViT-B/32")[0]["provenance"]["t2v/R@1"] == "[R]"
    ts2 = paper_entries(expected, "ts2net", "MSR-VTT", "ViT-B/32")  # the plain number first, the DSL one labelled
    assert [e["label"] for e in ts2] == ["paper", "inverted softmax (DSL, transductive)"]
    assert ts2[0]["metrics"]["t2v/R@1"] == 47.0 and ts2[0]["provenance"]["t2v/R@1"] == "[R]"
    assert paper_entries(expected, "clip4clip", "synthetic", "tiny") == []
    assert not [e for e in expected if e["method"] == "mascot"]  # no numbers could be verified
    [emcl] = [e for e in paper_entries(expected, "emcl", "msrvtt", "ViT-B/32") if e["label"] == "paper"]
    assert emcl["metrics"] == {"t2v/R@1": 46.8} and emcl["provenance"]["t2v/R@1"] == "[R]"  # only what could be checked
    for e in expected:
        assert e["metrics"] and set(e["provenance"]) == set(e["metrics"])
        assert all(t.startswith("[") and t.endswith("]") for t in e["provenance"].values())


def test_csv_and_markdown_show_this_run_next_to_paper():
    seeds, other = _three_seeds_and_one()
    expected = load_expected(EXPECTED)
    agg = aggregate(seeds + [other])
    rows = list(csv.DictReader(io.StringIO(to_csv(leaderboard_rows(agg, expected)))))
    assert len(rows) == 2
    row = next(r for r in rows if r["method"] == "clip4clip")
    assert float(row["t2v/R@1"]) == pytest.approx(42.5)
    assert float(row["t2v/R@1_std"]) == pytest.approx(1.5)
    assert float(row["paper/t2v/R@1"]) == 43.1 and row["paper/t2v/R@1_provenance"] == "[I#104]"
    assert row["seeds"] == "0 1 2" and row["n_runs"] == "3"
    assert float(row["params"]) == 1_500_000 and float(row["train_pairs_per_s"]) == pytest.approx(101.0)
    xrow = next(r for r in rows if r["method"] == "xpool")
    assert xrow["t2v/R@1_std"] == "" and xrow["paper/t2v/R@1"] == ""

    md = to_markdown(agg, expected)
    lines = md.splitlines()
    this = next(i for i, line in enumerate(lines) if line.startswith("| ★ | clip4clip | msrvtt |"))
    assert "| sel=? , opt=? |".replace(" ,", ",") in lines[this]  # old results: no protocol block
    assert "| this run | 0,1,2 | 42.5 ± 1.5 |" in lines[this]  # no per-query ranks: no interval
    assert lines[this + 1].startswith("|  |  |  |  |  |  |  | pairwise |  | paper |  | 43.1 | 70.4† |")  # the paper row below
    assert "| ★ | xpool | synthetic | tiny | 12 | 32 | sel=?, opt=? | pairwise | – | this run | 0 | 30.0 |" in md
    assert "### msrvtt · ViT-B/32 · profile default · end-to-end" in md
    assert "## Efficiency" in md and "| 1.50 | 1.00 |" in md
    assert "[I#104]" in md and "recipes/expected/clip4clip.yaml" in md


def test_build_leaderboard_writes_csv_md_and_a_real_png(tmp_path):
    seeds, other = _three_seeds_and_one()
    write_results(tmp_path, seeds + [other])
    (tmp_path / "results" / "broken.json").write_text("{not json")
    with pytest.warns(UserWarning, match="broken.json"):
        built = build_leaderboard(tmp_path, EXPECTED)
    assert built["n_results"] == 4
    assert set(built["paths"]) == {"csv", "md", "png"}
    with Image.open(tmp_path / "leaderboard.png") as img:
        img.verify()
    with Image.open(tmp_path / "leaderboard.png") as img:
        assert img.format == "PNG" and img.size[0] >= 600 and img.size[1] >= 400
    assert "clip4clip" in (tmp_path / "leaderboard.csv").read_text()
    assert (tmp_path / "leaderboard.md").read_text().startswith("# tvr-bench leaderboard")


def test_leaderboard_command(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "broken.json").write_text("{not json")  # not a result either
    with pytest.warns(UserWarning, match="broken.json"):
        assert leaderboard_main(["--runs", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no result files under") and "make bench" in err[0]
    # nothing yet: says so and writes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"] and not (tmp_path / "out").exists()
    (tmp_path / "results" / "broken.json").unlink()
    seeds, _ = _three_seeds_and_one()
    write_results(tmp_path, seeds)
    assert leaderboard_main(["--runs", str(tmp_path), "--expected", str(EXPECTED), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "clip4clip" in out and "42.5 ± 1.5" in out
    assert (tmp_path / "out" / "leaderboard.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------------- the callback
def test_writer_records_a_self_describing_result(tmp_path):
    runs = tmp_path / "runs"
    writer = LeaderboardWriter(runs_dir=str(runs), expected_dir=str(EXPECTED))
    trainer = _trainer(tmp_path, writer, FakeEvaluator(dsl=True))  # evaluator after the writer: order is irrelevant
    L.seed_everything(3)
    model, dm = ToyMethod(max_words=8), ToyDataModule(dataset="toyset", num_frames=4, n=24, batch_size=8)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm)

    path = runs / "results" / result_filename("toymethod", "toyset", "tiny", 3)
    assert writer.last_path == path and path.is_file()
    result = json.loads(path.read_text())
    assert (result["method"], result["dataset"], result["backbone"], result["seed"]) == ("toymethod", "toyset", "tiny", 3)
    assert (result["frames"], result["words"]) == (4, 8)
    assert result["metrics"] == TOY_METRICS
    assert result["dsl_metrics"] == {k: v + 1.0 for k, v in TOY_METRICS.items()}
    assert result["params"] == {"total": 15, "trainable": 15}
    train = result["train"]
    assert train["pairs"] == 24 and train["steps"] == 3 and train["epochs"] == 1
    assert train["seconds"] > 0 and train["pairs_per_s"] > 0
    ev = result["eval"]
    assert (ev["texts"], ev["videos"]) == (24, 12) and ev["seconds"] > 0
    assert ev["ms_per_query"] == pytest.approx(1000 * ev["seconds"] / 24)
    assert result["git"]["commit"] is None or len(result["git"]["commit"]) == 40
    assert result["timestamp"].endswith("+00:00") and result["device"]["type"] == "cpu"
    assert result["hparams"]["max_words"] == 8 and result["datamodule"]["hparams"]["dataset"] == "toyset"

    row = flat_row(result)
    assert row["t2v/R@1"] == 40.0 and row["dsl/v2t/R@1"] == 39.0 and row["seed"] == 3
    md = (runs / "leaderboard.md").read_text()
    assert "| toymethod | toyset | tiny | 4 | 8 | sel=last, opt=adamw | 12 videos | this run | 3 | 40.0 ± " not in md
    assert "| ★ | toymethod | toyset | tiny | 4 | 8 | sel=last, opt=adamw | pairwise | 12 videos | this run | 3 | 40.0 |" in md
    assert result["protocol"] == {
        "test_split": "test", "test_videos": 12, "protocol_videos": None, "complete": True, "test_set": "",
        "profile": "default", "selection": "last", "pairing": None, "eps_mode": None, "grouping": None,
        "eval_blocks": None, "padding": None, "features": "end-to-end", "optimizer": "adamw", "training": "fine-tuned",
        "variant": "", "scoring_options": {}, "result_class": "pairwise", "audit": {}, "postprocessing": {}}
    assert "## With dual softmax at inference (DSL)" in md
    assert (runs / "leaderboard.csv").is_file() and (runs / "leaderboard.png").is_file()


def test_seeds_give_one_file_each_and_a_mean_std_row(tmp_path):
    runs = tmp_path / "runs"
    for seed, shift in ((0, 0.0), (1, 2.0), (1, 4.0)):  # seed 1 twice: the rerun replaces its file
        writer = LeaderboardWriter(runs_dir=str(runs), seed=seed)
        trainer = _trainer(tmp_path, writer, FakeEvaluator(shift=shift), max_steps=1, limit_val_batches=0)
        model, dm = ToyMethod(), ToyDataModule()
        trainer.fit(model, datamodule=dm)
        trainer.test(model, datamodule=dm)
    assert sorted(p.name for p in (runs / "results").iterdir()) == [
        "toymethod__toyset__tiny__seed0.json", "toymethod__toyset__tiny__seed1.json"]
    [g] = aggregate(load_results(runs))
    assert g["seeds"] == [0, 1]
    assert g["stats"]["t2v/R@1"]["mean"] == pytest.approx(42.0)
    assert g["stats"]["t2v/R@1"]["std"] == pytest.approx(statistics.stdev([40.0, 44.0]))
    assert "42.0 ± 2.8" in (runs / "leaderboard.md").read_text()


def test_test_only_run_reports_fit_stats_from_the_checkpoint(tmp_path):
    runs = tmp_path / "runs"
    writer = LeaderboardWriter(runs_dir=str(runs), seed=0, rebuild=False)
    trainer = _trainer(tmp_path, writer, FakeEvaluator(), max_epochs=2)
    model, dm = ToyMethod(), ToyDataModule()
    trainer.fit(model, datamodule=dm)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)

    fresh = LeaderboardWriter(runs_dir=str(runs), seed=0, rebuild=False)
    trainer2 = _trainer(tmp_path, fresh, FakeEvaluator())
    trainer2.test(ToyMethod(), datamodule=ToyDataModule(), ckpt_path=str(ckpt), weights_only=False)
    train = fresh.last_result["train"]
    assert train["from_checkpoint"] is True and train["pairs"] == 48 and train["seconds"] > 0
    assert not (runs / "leaderboard.md").exists()  # rebuild=False


def test_no_result_without_fresh_metrics(tmp_path):
    runs = tmp_path / "runs"

    class SilentEvaluator(FakeEvaluator):
        def on_test_epoch_end(self, trainer, pl_module):
            pass  # keeps the previous (validation) metrics

    evaluator = SilentEvaluator()
    evaluator.last_metrics = dict(TOY_METRICS)
    trainer = _trainer(tmp_path, LeaderboardWriter(runs_dir=str(runs)), evaluator)
    with pytest.warns(UserWarning, match="no fresh test metrics"):
        trainer.test(ToyMethod(), datamodule=ToyDataModule())
    assert not (runs / "results").exists()


def test_disabled_writer_writes_nothing(tmp_path):
    runs = tmp_path / "runs"
    trainer = _trainer(tmp_path, LeaderboardWriter(runs_dir=str(runs), enabled=False), FakeEvaluator())
    trainer.test(ToyMethod(), datamodule=ToyDataModule())
    assert not runs.exists()


# ---------------------------------------------------------------------------------------------- intervals, protocol
def test_writer_saves_per_query_ranks_and_intervals(tmp_path):
    import numpy as np

    from tests.leaderboard_toys import toy_scores
    from tvr_bench.metrics import retrieval_metrics
    from tvr_bench.stats import PerQuery

    runs = tmp_path / "runs"
    sim, t2v = toy_scores(n_video=30, captions=3)
    writer = LeaderboardWriter(runs_dir=str(runs), seed=0, bootstrap_resamples=2000, qualitative=0)
    trainer = _trainer(tmp_path, writer, FakeEvaluator(sim=sim, text_to_video=t2v, dsl=True), max_steps=1,
                       limit_val_batches=0)
    trainer.fit(ToyMethod(), datamodule=ToyDataModule())
    trainer.test(ToyMethod(), datamodule=ToyDataModule())
    result = json.loads(writer.last_path.read_text())
    ranks_file = writer.last_path.with_name("toymethod__toyset__tiny__seed0.ranks.npz")
    assert result["per_query"] == {"file": ranks_file.name, "t2v_queries": 90, "v2t_queries": 30, "units": "video"}
    with np.load(ranks_file, allow_pickle=False) as data:  # plain arrays: no pickle
        assert data["t2v_rank"].shape == (90,) and data["t2v_key"][0] == "video000#0" and data["v2t_key"][29] == "video029"
    pq = PerQuery.load(str(ranks_file))
    metrics = retrieval_metrics(sim, t2v)
    assert float(np.mean(pq.t2v_rank <= 1)) * 100 == pytest.approx(metrics["t2v/R@1"])
    block = result["intervals"]
    assert block["resamples"] == 2000 and block["level"] == 0.95 and "video" in block["method"]
    assert set(block["metrics"]) == set(metrics) and set(block["dsl_metrics"]) == set(metrics)
    for key, (lo, hi) in block["metrics"].items():
        assert lo <= metrics[key] <= hi
    row = flat_row(result)
    assert row["t2v/R@1_ci_lo"] == block["metrics"]["t2v/R@1"][0] and "dsl/v2t/MnR_ci_hi" in row
    md = (runs / "leaderboard.md").read_text()
    lo, hi = block["metrics"]["t2v/R@1"]
    assert f"{metrics['t2v/R@1']:.1f} [{lo:.1f}, {hi:.1f}]" in md
    csv_row = next(csv.DictReader(io.StringIO((runs / "leaderboard.csv").read_text())))
    assert float(csv_row["t2v/R@1_ci_lo"]) == pytest.approx(lo) and csv_row["interval"].startswith("95% bootstrap")


class _ProtocolDataModule(ToyDataModule):
    """A toy datamodule exposing the protocol-size and features inputs of docs/INTERFACES.md."""

    def __init__(self, protocol: int | None = None, features_dir: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self._protocol = protocol
        self.features_dir = features_dir
        self.test_split = "test"
        self.val_split = "val"

    def protocol_size(self, split: str) -> int | None:
        return self._protocol


def test_incomplete_test_set_is_marked_and_never_ranked_with_complete_rows(tmp_path):
    runs = tmp_path / "runs"
    for seed, protocol in ((0, 12), (1, 13)):  # FakeEvaluator tests 12 videos
        writer = LeaderboardWriter(runs_dir=str(runs), seed=seed)
        trainer = _trainer(tmp_path, writer, FakeEvaluator(shift=seed), max_steps=1, limit_val_batches=0)
        dm = _ProtocolDataModule(protocol=protocol, dataset=f"set{seed}")
        trainer.fit(ToyMethod(), datamodule=dm)
        trainer.test(ToyMethod(), datamodule=dm)
        proto = writer.last_result["protocol"]
        assert (proto["test_videos"], proto["protocol_videos"], proto["complete"]) == (12, protocol, protocol == 12)
    write_results(runs, [dict(fake_result("other", "set1", "tiny", 0, 90.0), protocol={"test_videos": 13, "protocol_videos": 13})])
    built = build_leaderboard(runs)
    md = (runs / "leaderboard.md").read_text()
    assert "12/13 videos" in md and "### set1 · tiny · profile default · end-to-end · INCOMPLETE test set" in md
    incomplete = md.split("INCOMPLETE test set")[1].split("\n\n")[1]  # that block's table
    assert "toymethod" in incomplete and "other" not in incomplete  # the complete row has its own table
    rows = {(r["method"], r["dataset"]): r for r in csv.DictReader(io.StringIO((runs / "leaderboard.csv").read_text()))}
    assert rows[("toymethod", "set1")]["test_set"] == "12/13 videos" and rows[("toymethod", "set1")]["complete"] == "False"
    assert rows[("toymethod", "set0")]["test_set"] == "complete"
    assert rows[("toymethod", "set1")]["significance"] == "best"  # best of its own (incomplete) block only
    assert rows[("other", "set1")]["significance"] == "best"
    assert {g["test_set"] for g in built["aggregated"]} == {"complete", "12/13 videos"}


def test_profiles_and_features_never_share_a_ranking_and_paper_rows_show_the_difference():
    expected = load_expected(EXPECTED)
    results = [
        fake_result("tmass_refpairing", "msrvtt", "ViT-B/32", 0, 48.0, protocol={
            "profile": "paper", "pairing": "reference", "eps_mode": "pair", "result_class": "label-dependent"}),
        fake_result("tmass", "msrvtt", "ViT-B/32", 0, 45.0, protocol={"profile": "default", "pairing": "query"}),
        fake_result("xpool", "msrvtt", "ViT-B/32", 0, 44.0, protocol={"features": "frozen-clip"}),
        fake_result("clip4clip", "msrvtt", "ViT-B/32", 0, 41.0),
    ]
    agg = aggregate(results)
    blocks = {(g["method"], g["variant"]): (g["profile"], g["features"], g["significance"]) for g in agg}
    # the reference pairing reads the test labels: its own block, never ranked (no ★)
    assert blocks[("tmass_refpairing", "profile=paper, pairing=reference, eps_mode=pair")] == (
        "paper", "end-to-end", "n/a (label-dependent: not ranked)")
    assert blocks[("xpool", "features=frozen-clip")] == ("default", "frozen-clip", "best")
    assert blocks[("tmass", "pairing=query")][2] == "best"  # default end-to-end block: 45 > 41
    assert blocks[("clip4clip", "")][2] == "n/a (no per-query ranks)"
    md = to_markdown(agg, expected)
    assert md.count("### msrvtt · ViT-B/32") == 3
    lines = md.splitlines()
    i = next(i for i, line in enumerate(lines) if "tmass_refpairing (profile=paper" in line)
    assert "| paper |" in lines[i + 1] and "| 50.2 |" in lines[i + 1] and "| label-dependent |" in lines[i + 1]
    assert "| ours − paper |" in lines[i + 2] and "| -2.2 |" in lines[i + 2]
    assert lines.index("## Not valid retrieval results (label-dependent scoring)") < i
    assert "NOT A VALID RETRIEVAL RESULT" in next(line for line in reversed(lines[:i]) if line.startswith("### "))
    rows = {(r["method"], r["variant"]): r for r in leaderboard_rows(agg, expected)}
    assert rows[("tmass_refpairing", "profile=paper, pairing=reference, eps_mode=pair")]["diff/t2v/R@1"] == pytest.approx(-2.2)
    assert rows[("tmass_refpairing", "profile=paper, pairing=reference, eps_mode=pair")]["result_class"] == "label-dependent"
    assert "diff/t2v/R@1" not in rows[("tmass", "pairing=query")]
    assert rows[("tmass", "pairing=query")]["pairing"] == "query"


def test_rows_not_significantly_different_from_the_best_are_grouped(tmp_path):
    from tests.leaderboard_toys import ranked_result

    runs = tmp_path / "runs"
    best, pq_best = ranked_result("best", "sim", 0, quality=3.0, noise_seed=1, n_video=150)
    tied, pq_tied = ranked_result("tied", "sim", 0, quality=2.9, noise_seed=2, n_video=150)
    worse, pq_worse = ranked_result("worse", "sim", 0, quality=0.5, noise_seed=3, n_video=150)
    seed1, pq_seed1 = ranked_result("best", "sim", 1, quality=3.0, noise_seed=4, n_video=150)
    write_results(runs, [best, tied, worse, seed1],
                  ranks={id(best): pq_best, id(tied): pq_tied, id(worse): pq_worse, id(seed1): pq_seed1})
    built = build_leaderboard(runs)
    groups = {g["method"]: g for g in built["aggregated"]}
    assert groups["best"]["significance"] == "best" and groups["best"]["n_runs"] == 2
    assert groups["tied"]["significance"] == "tied" and groups["tied"]["p_vs_best"] >= 0.05
    assert groups["worse"]["significance"] == "worse" and groups["worse"]["p_vs_best"] < 0.01
    assert "mean of 2 seeds" in groups["best"]["interval_kind"]  # seed mean, queries resampled jointly
    lo, hi = groups["best"]["intervals"]["t2v/R@1"]
    assert lo <= groups["best"]["stats"]["t2v/R@1"]["mean"] <= hi
    md = (runs / "leaderboard.md").read_text()
    assert "| ★ | best |" in md and "| ≈ | tied |" in md and "|  | worse |" in md
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO((runs / "leaderboard.csv").read_text()))}
    assert (rows["best"]["tied_with_best"], rows["tied"]["tied_with_best"], rows["worse"]["tied_with_best"]) == (
        "True", "True", "False")
    with Image.open(runs / "leaderboard.png") as img:
        assert img.format == "PNG"


def test_without_a_logger_nothing_lands_in_the_working_directory(tmp_path, monkeypatch):
    from tests.leaderboard_toys import toy_scores

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # Lightning's default_root_dir
    sim, t2v = toy_scores(n_video=12)
    writer = LeaderboardWriter(runs_dir=str(tmp_path / "runs"), seed=0, rebuild=False, bootstrap_resamples=500)
    trainer = _trainer(tmp_path, writer, FakeEvaluator(sim=sim, text_to_video=t2v), logger=False)
    trainer.test(ToyMethod(), datamodule=ToyDataModule())
    assert writer.last_path.is_file() and writer.last_result["per_query"]["file"].endswith(".ranks.npz")
    assert sorted(p.name for p in work.iterdir()) == []  # no run folder: no result.json copy, no page here


class _PairedMethod(ToyMethod):
    """A toy with T-MASS-like `pairing` / `eps_mode` hyperparameters (defaults: query / text)."""

    def __init__(self, pairing: str = "query", eps_mode: str = "text", **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters()


def test_pairing_labels_rows_and_file_names_only_when_not_the_method_default(tmp_path):
    runs = tmp_path / "runs"
    for pairing, eps in (("query", "text"), ("reference", "pair")):
        writer = LeaderboardWriter(runs_dir=str(runs), seed=0)
        _trainer(tmp_path, writer, FakeEvaluator()).test(_PairedMethod(pairing=pairing, eps_mode=eps),
                                                         datamodule=ToyDataModule())
        assert writer.last_result["protocol"]["pairing"] == pairing
    names = sorted(p.name for p in (runs / "results").glob("*.json"))
    # test-only runs (no training step): labelled zero-shot; the method's default pairing adds nothing to the name
    assert names == ["toymethod__toyset__tiny__pairing-reference-eps_mode-pair-training-zero-shot__seed0.json",
                     "toymethod__toyset__tiny__training-zero-shot__seed0.json"]
    md = (runs / "leaderboard.md").read_text()
    assert "| toymethod (pairing=reference, eps_mode=pair, training=zero-shot) |" in md and "pairing=query, eps=text |" in md


def test_no_tie_mark_between_rows_tested_on_different_data(tmp_path):
    """The ≈ marks follow `tvr-bench compare`'s rule: rows whose test data differ (here the synthetic generation
    seed, with the same query keys) are never called tied, whatever their p-value."""
    from tests.leaderboard_toys import ranked_result

    def run(method: str, quality: float, noise: int, synth_seed: int):
        return ranked_result(method, "synthetic", 0, quality=quality, noise_seed=noise, n_video=150,
                             datamodule={"hparams": {"size": "default", "synth_seed": synth_seed}})

    runs = tmp_path / "runs"
    (best, pq_best), (tied, pq_tied), (other, pq_other) = run("best", 3.0, 1, 0), run("tied", 2.9, 2, 0), run("other", 2.9, 2, 1)
    write_results(runs, [best, tied, other], ranks={id(best): pq_best, id(tied): pq_tied, id(other): pq_other})
    groups = {g["method"]: g for g in build_leaderboard(runs)["aggregated"]}
    assert groups["tied"]["significance"] == "tied"
    assert groups["other"]["significance"] == "n/a (different test data: synthetic generation seed 0 vs 1)"
    assert groups["other"]["tied_with_best"] is None and groups["other"]["p_vs_best"] is None
    md = (runs / "leaderboard.md").read_text()
    assert "| ≈ | tied |" in md and "|  | other |" in md


# ---------------------------------------------------------------------------------------------- the picture
def _plot_row(method: str, t2v: float, t2v_ci: list[float], v2t: float, v2t_ci: list[float], n: int = 1,
              significance: str = "", dataset: str = "synthetic", complete: bool = True) -> dict:
    """One aggregated leaderboard row as `aggregate` gives it, for the figure alone."""
    return {"method": method, "variant": "", "dataset": dataset, "backbone": "tiny", "profile": "default",
            "features": "end-to-end", "complete": complete, "test_set": "" if complete else "140/150 videos",
            "n_runs": n, "seeds": list(range(n)), "significance": significance,
            "stats": {"t2v/R@1": {"mean": t2v, "std": 1.0 if n > 1 else None, "n": n},
                      "v2t/R@1": {"mean": v2t, "std": 1.0 if n > 1 else None, "n": n}},
            "intervals": {"t2v/R@1": t2v_ci, "v2t/R@1": v2t_ci}}


#: the README's synthetic leaderboard: short bars with intervals wider than half their height, two seed means
README_ROWS = [
    _plot_row("drl", 15.5, [12.5, 18.6], 24.0, [18.0, 30.0], significance="best"),
    _plot_row("clip4clip", 14.9, [12.2, 17.7], 25.5, [19.5, 31.5], significance="tied"),
    _plot_row("clip4clip_seqtransf", 9.2, [6.9, 11.6], 19.5, [14.0, 25.0]),
    _plot_row("mascot", 4.2, [2.6, 5.9], 6.0, [3.0, 9.5]),
    _plot_row("xpool", 2.7, [1.9, 3.7], 5.8, [4.0, 7.8], n=3),
    _plot_row("tmass", 2.0, [1.4, 2.7], 3.7, [2.2, 5.2], n=3),
]


def _errorbar_boxes(ax) -> list:
    """Display-space boxes of every error bar of an axes: the vertical whiskers and the caps."""
    from matplotlib.container import BarContainer
    from matplotlib.transforms import Bbox

    boxes = []
    px = ax.figure.dpi / 72.0
    for container in ax.containers:
        if not isinstance(container, BarContainer) or container.errorbar is None:
            continue
        _, caplines, barlinecols = container.errorbar.lines
        for collection in barlinecols:
            half = max(collection.get_linewidths()) * px / 2
            for segment in collection.get_segments():
                (x0, y0), (x1, y1) = ax.transData.transform(segment)
                boxes.append(Bbox([[min(x0, x1) - half, min(y0, y1) - half], [max(x0, x1) + half, max(y0, y1) + half]]))
        for cap in caplines:
            half_w, half_h = cap.get_markersize() * px / 2, max(1.0, cap.get_markeredgewidth() * px)
            for x, y in ax.transData.transform(cap.get_xydata()):
                boxes.append(Bbox([[x - half_w, y - half_h], [x + half_w, y + half_h]]))
    return boxes


#: the README's 3-seed synthetic table: ten seed means in one block, close values
TEN_ROWS = [_plot_row(f"method{i}", t2v, [t2v - 2.3, t2v + 2.4], v2t, [v2t - 4.8, v2t + 5.0], n=3)
            for i, (t2v, v2t) in enumerate([(21.3, 35.5), (20.5, 41.2), (19.2, 33.8), (17.1, 30.2), (16.9, 24.0),
                                            (14.7, 23.5), (13.7, 17.3), (12.7, 18.8), (12.3, 13.7), (11.3, 13.0)])]


@pytest.mark.parametrize("case", ["readme", "one-bar", "blocks", "ten"])
def test_the_picture_keeps_every_text_inside_and_no_label_on_an_error_bar(case):
    """Rendered, every text (subtitle, legend, ticks, values, marks) lies inside the figure, every bar has its
    value label, none touches an error bar, and a bar that is a mean of several seeds says so."""
    from matplotlib.text import Text

    from tests.leaderboard_toys import ranked_result
    from tvr_bench.report import leaderboard_figure

    expected: list = []
    if case == "readme":
        rows = README_ROWS
    elif case == "one-bar":  # the narrowest figure: the subtitle must wrap, not run off both edges
        rows = [README_ROWS[4]]
    elif case == "ten":  # many seed means side by side: their labels must not run into each other
        rows = TEN_ROWS
    else:
        results = [ranked_result(m, "sim", s, quality=q, noise_seed=n, n_video=60)[0]
                   for m, s, q, n in (("xpool", 0, 0.4, 1), ("xpool", 1, 0.5, 2), ("drl", 0, 3.0, 3))]
        results.append(ranked_result("xpool", "partial", 0, quality=2.0, noise_seed=4, n_video=50,
                                     protocol={"test_videos": 50, "protocol_videos": 60})[0])
        rows = aggregate(results)
        expected = load_expected(EXPECTED)
    fig = leaderboard_figure(rows, expected)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = fig.bbox
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    assert any("95% bootstrap interval" in t.get_text() for t in texts)
    for text in texts:
        box = text.get_window_extent(renderer)
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, (
            f"{text.get_text()!r} lies outside the figure: {box} vs {frame}")
    labels = [t for t in texts if t.get_gid() == "value-label"]
    bars = [c for ax in fig.axes for c in ax.containers if hasattr(c, "errorbar")]
    assert len(labels) == len(bars) == 2 * len(rows)
    for ax in fig.axes:
        whiskers = _errorbar_boxes(ax)
        assert whiskers
        for label in (t for t in labels if t.axes is ax):
            box = label.get_window_extent(renderer)
            touching = [w for w in whiskers if box.overlaps(w)]
            assert not touching, f"value label {label.get_text()!r} overlaps an error bar"
        mine = sorted((t.get_window_extent(renderer) for t in labels if t.axes is ax), key=lambda b: b.x0)
        for left, right in zip(mine, mine[1:]):
            assert not left.overlaps(right), f"two value labels overlap: {left} and {right}"
    for g in rows:
        if g["n_runs"] > 1:
            mine = [t.get_text() for t in labels if t.get_text().startswith(f"{g['stats']['t2v/R@1']['mean']:.1f}\n")]
            assert f"{g['n_runs']} seeds" in " ".join(mine), g["method"]
    assert sum(1 for t in labels if "seeds" in t.get_text()) == 2 * sum(1 for g in rows if g["n_runs"] > 1)


def test_only_plain_retrieval_is_ranked_together(tmp_path):
    """Issue 19: a label-dependent row (even the highest) and a transductive row never share a ranking with
    pairwise / gallery-normalised rows, in any view (Markdown, CSV, W&B rows, PNG); post-processed numbers stay
    in their own sections and columns with their class."""
    from tvr_bench.report import build_leaderboard, plotted_rows

    post = {"postprocessing": {"qbnorm": {"result_class": "gallery-normalised", "title": "QB-Norm", "directions": ["t2v"]},
                               "dsl": {"result_class": "transductive"}}}
    results = [
        fake_result("honest", "msrvtt", "ViT-B/32", 0, 30.0, protocol={"result_class": "pairwise", **post},
                    post_metrics={"qbnorm": {"t2v/R@1": 33.0}}, dsl_metrics={"t2v/R@1": 35.0}),
        fake_result("qbnormed", "msrvtt", "ViT-B/32", 0, 31.0, protocol={"result_class": "gallery-normalised"}),
        fake_result("mixer", "msrvtt", "ViT-B/32", 0, 80.0, protocol={"result_class": "transductive"}),
        fake_result("leaky", "msrvtt", "ViT-B/32", 0, 95.0, protocol={"result_class": "label-dependent"}),
        fake_result("old", "msrvtt", "ViT-B/32", 0, 99.0, protocol={"result_class": None}),
    ]
    write_results(tmp_path / "runs", results)
    built = build_leaderboard(tmp_path / "runs", EXPECTED)
    agg = {g["method"]: g for g in built["aggregated"]}
    assert agg["qbnormed"]["significance"] == "best" and agg["honest"]["significance"] != "best"
    assert block_of(agg["honest"]) == block_of(agg["qbnormed"])
    assert len({block_of(agg[m]) for m in ("honest", "mixer", "leaky", "old")}) == 4
    assert agg["mixer"]["significance"] == "best"  # ranked among transductive rows only
    assert agg["leaky"]["significance"].startswith("n/a (label-dependent")
    md = (tmp_path / "runs" / "leaderboard.md").read_text()
    titles = [line for line in md.splitlines() if line.startswith("### ")]
    assert any("TRANSDUCTIVE" in t for t in titles) and any("NOT A VALID RETRIEVAL RESULT" in t for t in titles)
    assert any("UNAUDITED" in t for t in titles)
    plain = md.split("## Not valid retrieval results")[0]
    assert "| leaky |" not in plain and "| leaky |" in md
    assert "## With QB-Norm" in md and "| 33.0 |" in md.split("## With QB-Norm")[1]
    assert "## With dual softmax at inference (DSL)" in md
    rows = {r["method"]: r for r in leaderboard_rows(built["aggregated"], built["expected"])}  # CSV and W&B
    assert rows["leaky"]["result_class"] == "label-dependent" and rows["leaky"]["ranking_block"].endswith("label-dependent")
    assert rows["honest"]["qbnorm/result_class"] == "gallery-normalised" and rows["honest"]["t2v/R@1"] == 30.0
    assert rows["honest"]["qbnorm/t2v/R@1"] == 33.0 and rows["honest"]["dsl/t2v/R@1"] == 35.0
    shown = {g["method"] for g in plotted_rows(built["aggregated"])}
    assert shown == {"honest", "qbnormed", "old"}
