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
    assert {p.stem for p in EXPECTED.glob("*.yaml")} == {"clip4clip", "xpool", "drl", "tmass", "mascot"}
    [c4c] = [e for e in paper_entries(expected, "clip4clip", "MSR-VTT", "ViT-B/32") if e["label"] == "paper"]
    assert c4c["metrics"]["t2v/R@1"] == 43.1 and c4c["provenance"]["t2v/R@1"] == "[I#104]"
    assert c4c["provenance"]["t2v/R@5"] == "[P?]"  # unverified numbers stay marked
    assert paper_entries(expected, "tmass", "msrvtt", "ViT-B/32")[0]["metrics"]["t2v/R@1"] == 50.2
    assert paper_entries(expected, "xpool", "msrvtt_7k", "ViT-B/32")[0]["provenance"]["t2v/R@1"] == "[R]"
    assert paper_entries(expected, "clip4clip", "synthetic", "tiny") == []
    assert not [e for e in expected if e["method"] == "mascot"]  # no numbers could be verified
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
    this = next(i for i, line in enumerate(lines) if line.startswith("| clip4clip | msrvtt |"))
    assert "| this run | 0,1,2 | 42.5 ± 1.5 |" in lines[this]
    assert lines[this + 1].startswith("|  |  |  |  |  | paper |  | 43.1 | 70.4† |")  # the paper row right below
    assert "| xpool | synthetic | tiny | 12 | 32 | this run | 0 | 30.0 |" in md
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
    assert leaderboard_main(["--runs", str(tmp_path), "--quiet"]) == 1  # nothing yet: says so, still writes files
    assert "No results yet" in (tmp_path / "leaderboard.md").read_text()
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
    assert "| toymethod | toyset | tiny | 4 | 8 | this run | 3 | 40.0 ± " not in md  # single seed: no ±
    assert "| toymethod | toyset | tiny | 4 | 8 | this run | 3 | 40.0 |" in md
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
