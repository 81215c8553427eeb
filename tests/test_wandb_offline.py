"""W&B offline: the leaderboard row read back from the run's table JSON, run naming, no secrets, and the
SaveConfigCallback + WandbLogger clash (two consecutive CLI runs). Nothing here touches the network."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import lightning as L
import pytest
import yaml
from PIL import Image
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from tests.leaderboard_toys import TOY_METRICS, FakeEvaluator, ToyDataModule, ToyMethod
from tests.data_fixtures import tiny_root  # noqa: F401  (session fixture, shared with the data tests)
from tvr_bench.callbacks.leaderboard import LeaderboardWriter, flat_row
from tvr_bench.loggers import OfflineWandbLogger, RunConfigCallback, finish_wandb

wandb = pytest.importorskip("wandb")

REPO = Path(__file__).resolve().parents[1]
SECRET = "f00dfeedf00dfeedf00dfeedf00dfeedf00dfeed"  # a fake API key: must never be written anywhere


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """Real offline W&B (the suite default is WANDB_MODE=disabled), all of its files inside tmp_path."""
    monkeypatch.delenv("WANDB_MODE", raising=False)  # as for a user who set nothing: our logger goes offline
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # any network attempt would fail fast
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    if wandb.run is not None:
        wandb.finish()


def _assert_no_secret(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"API key written to {path}"


def _table_images(run_folder: Path, rows: int) -> list[dict]:
    """The image cells of the logged table of `rows` rows, from the W&B artifact files staged in `run_folder`."""
    tables = []
    for path in (f for f in run_folder.rglob("*") if f.is_file()):
        if path.read_bytes()[:1] == b"{":
            try:
                data = json.loads(path.read_text())
            except ValueError:
                continue  # JSON lines (logs, history), not a table
            if data.get("_type") == "table" and len(data.get("data") or []) == rows:
                tables.append(data)
    assert tables, f"no staged table of {rows} rows in {run_folder}"
    return [cell for row in tables[0]["data"] for cell in row if isinstance(cell, dict) and cell.get("_type") == "image-file"]


def _tables(save_dir: Path, key: str = "leaderboard") -> list[dict]:
    files = sorted(save_dir.glob(f"wandb/offline-run-*/files/media/table/{key}_*.table.json"))
    files = [f for f in files if re.match(rf"{re.escape(key)}_\d+_", f.name)]  # not `<key>_all_...`
    return [json.loads(f.read_text()) for f in files]


def test_mode_follows_wandb_mode(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert OfflineWandbLogger(project="p")._wandb_init["mode"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")  # the user chose: respected (wandb reads the variable)
    assert "mode" not in OfflineWandbLogger(project="p")._wandb_init
    assert OfflineWandbLogger(project="p", offline=True)._wandb_init["mode"] == "offline"
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException):
        OfflineWandbLogger(project="p", offline=True, log_model=True)


def test_describe_before_start_fills_only_what_the_user_left_out(tmp_path):
    logger = OfflineWandbLogger(project="p", tags=["mine"])
    logger.describe("xpool", "msrvtt", "ViT-B/32", seed=2, job_type="bench", save_dir=str(tmp_path / "run"))
    init = logger._wandb_init
    assert init["group"] == "msrvtt" and init["name"] == "xpool-msrvtt-vit-b-32-seed2"  # group: one per dataset
    assert init["config"] == {"method": "xpool", "dataset": "msrvtt", "backbone": "ViT-B/32", "seed": 2}
    assert init["job_type"] == "bench" and init["tags"] == ["mine"]
    assert logger.save_dir == str(tmp_path / "run") and init["dir"] == logger.save_dir


def test_leaderboard_row_read_back_from_offline_wandb(offline_wandb):
    tmp = offline_wandb
    logger = OfflineWandbLogger(project="tvr-bench-test", save_dir=str(tmp / "wb"))
    logger.describe("toymethod", "toyset", "tiny", seed=5, job_type="bench")  # what the CLI does before the run
    writer = LeaderboardWriter(runs_dir=str(tmp / "runs"))
    trainer = L.Trainer(
        default_root_dir=tmp, max_epochs=2, accelerator="cpu", logger=logger, callbacks=[FakeEvaluator(dsl=True), writer],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
    )
    L.seed_everything(5)
    model, dm = ToyMethod(), ToyDataModule()
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm)

    run = logger.experiment
    assert run.settings.mode == "offline"
    assert (run.group, run.job_type, run.name) == ("toyset", "bench", "toymethod-toyset-tiny-seed5")
    assert run.config["method"] == "toymethod" and run.config["protocol/profile"] == "default"
    assert {"toymethod", "toyset", "tiny", "seed5"} <= set(run.tags)
    assert run.summary["result/t2v/R@1"] == 40.0 and run.summary["result/dsl/v2t/R@1"] == 39.0
    assert run.summary["result/params"] == 15
    assert dict(run.summary["val/t2v/R@1"]) == {"max": 50.0}  # best validation value, not the last (30)
    run_dir = Path(run.dir).parent
    finish_wandb([logger])

    [table] = _tables(tmp / "wb")
    expected = flat_row(writer.last_result)
    assert table["columns"] == list(expected)
    [row] = table["data"]
    got = dict(zip(table["columns"], row))
    assert got == json.loads(json.dumps(expected))
    for key, value in TOY_METRICS.items():
        assert got[key] == value and got[f"dsl/{key}"] == value + 1.0
    assert (got["method"], got["dataset"], got["backbone"], got["seed"]) == ("toymethod", "toyset", "tiny", 5)
    assert got["frames"] == 4 and got["words"] == 8 and got["n_texts"] == 24 and got["n_videos"] == 12
    assert got["train_seconds"] > 0 and got["train_pairs_per_s"] > 0 and got["eval_ms_per_query"] > 0
    assert run_dir.name.startswith("offline-run-") and run_dir.parent == tmp / "wb" / "wandb"
    # the local result names the run's folder (next to checkpoints/, config.yaml)
    assert writer.last_result["run_dir"] == str(Path(tmp / "wb") / "tvr-bench-test" / run.id)
    _assert_no_secret(tmp)


def test_live_run_is_tagged_from_method_and_dataset(offline_wandb):
    tmp = offline_wandb
    logger = OfflineWandbLogger(project="tvr-bench-test", save_dir=str(tmp / "wb"))  # no describe: plain Python use
    trainer = L.Trainer(
        default_root_dir=tmp, max_steps=1, limit_val_batches=0, accelerator="cpu", logger=logger,
        callbacks=[LeaderboardWriter(runs_dir=str(tmp / "runs"), rebuild=False), FakeEvaluator()],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(ToyMethod(), datamodule=ToyDataModule(dataset="msvd"))
    run = logger.experiment
    assert {"toymethod", "msvd", "tiny"} <= set(run.tags)
    assert run.config["dataset"] == "msvd" and run.config["wandb_group"] == "msvd"
    finish_wandb([logger])


# ---------------------------------------------------------------------------------------------- the config clash
def _cli_config(tmp: Path, root: Path) -> Path:
    cfg = {
        "trainer": {
            "default_root_dir": str(root),
            "max_epochs": 1,
            "limit_val_batches": 0,
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": [{"class_path": "tvr_bench.loggers.OfflineWandbLogger", "init_args": {"project": "tvr-bench-test"}}],
        },
    }
    path = tmp / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_stock_save_config_callback_clashes_with_wandb(offline_wandb):
    """The problem being solved (Lightning #7679): W&B's log_dir is shared, so run 2 finds run 1's config.yaml."""
    tmp = offline_wandb
    cfg = _cli_config(tmp, tmp / "root")
    args = ["fit", "--config", str(cfg), "--trainer.logger.init_args.save_dir", str(tmp / "root")]
    cli = LightningCLI(ToyMethod, ToyDataModule, save_config_callback=SaveConfigCallback, args=args)
    finish_wandb(cli.trainer.loggers)
    with pytest.raises(RuntimeError, match="to NOT exist"):
        LightningCLI(ToyMethod, ToyDataModule, save_config_callback=SaveConfigCallback, args=args)
    wandb.finish()


def test_two_consecutive_cli_runs_each_keep_their_config(offline_wandb, monkeypatch):
    """With RunConfigCallback (even without overwrite) each run writes its own <run dir>/config.yaml."""
    from tvr_bench.cli import TVRBenchCLI, _bench

    monkeypatch.setattr(L.Trainer, "bench", _bench, raising=False)  # as cli_main does

    tmp = offline_wandb
    root = tmp / "root"  # the same default_root_dir twice: the worst case
    cfg = _cli_config(tmp, root)
    for seed in (11, 12):
        cli = TVRBenchCLI(
            ToyMethod, ToyDataModule, save_config_callback=RunConfigCallback,
            args=["fit", "--config", str(cfg), "--seed_everything", str(seed), "--leaderboard.runs_dir", str(tmp / "runs")],
        )
        [logger] = cli.trainer.loggers
        assert logger._experiment is None  # TVRBenchCLI closed the W&B run: the next one is a fresh run
        init = logger._wandb_init
        assert (init["group"], init["name"], init["job_type"]) == ("toyset", f"toymethod-toyset-tiny-seed{seed}", "fit")
        assert init["dir"] == str(root) and init["mode"] == "offline"

    configs = sorted(root.glob("tvr-bench-test/*/config.yaml"))
    assert len(configs) == 2
    assert sorted(yaml.safe_load(c.read_text())["seed_everything"] for c in configs) == [11, 12]
    for c in configs:
        assert (c.parent / "checkpoints").is_dir()  # the config sits next to its run's checkpoints
    assert not (root / "config.yaml").exists()
    assert len(list(root.glob("wandb/offline-run-*"))) == 2
    _assert_no_secret(tmp)


SYNTHETIC_RECIPE = REPO / "recipes" / "data" / "synthetic.yaml"


def _synthetic_recipe(tmp: Path) -> Path:
    """recipes/data/synthetic.yaml, or an equivalent stand-in while that recipe is not written yet."""
    if SYNTHETIC_RECIPE.is_file():
        return SYNTHETIC_RECIPE
    path = tmp / "synthetic.yaml"
    path.write_text(yaml.safe_dump({"data": {"class_path": "tvr_bench.data.benchmarks.synthetic.SyntheticDataModule"}}))
    return path


def test_bench_on_tiny_synthetic_writes_result_leaderboard_and_wandb_table(offline_wandb, tiny_root):
    """End to end: `tvr-bench bench` -> result JSON, leaderboard files, W&B table row, config.yaml in the run dir."""
    from tvr_bench.cli import cli_main

    tmp = offline_wandb
    run_root = tmp / "runs/clip4clip/synthetic/seed0"
    cli_main([
        "bench",
        "--config", str(REPO / "recipes/base.yaml"),
        "--config", str(REPO / "recipes/methods/clip4clip.yaml"),
        "--config", str(_synthetic_recipe(tmp)),
        "--config", str(REPO / "recipes/profiles/scratch.yaml"),  # the tiny set has no pretrained backbone
        "--data.init_args.size", "tiny",
        "--data.init_args.root", str(tiny_root),  # session-wide tiny set (tests/data_fixtures.py), read only
        "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "8",
        "--trainer.max_steps", "2",
        "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--seed_everything", "0",
        "--trainer.default_root_dir", str(run_root),
        "--leaderboard.runs_dir", str(tmp / "runs"),
        "--leaderboard.expected_dir", str(REPO / "recipes/expected"),
    ])
    [path] = sorted((tmp / "runs" / "results").glob("*.json"))
    assert path.name == "clip4clip__synthetic__tiny__seed0.json"
    result = json.loads(path.read_text())
    assert set(result["metrics"]) == {f"{d}/{m}" for d in ("t2v", "v2t") for m in ("R@1", "R@5", "R@10", "MdR", "MnR")}
    assert (result["frames"], result["words"], result["seed"]) == (12, 32, 0)
    assert result["eval"]["texts"] > result["eval"]["videos"] == 16  # every caption of the tiny test set
    assert result["train"]["pairs"] == 16 and result["train"]["pairs_per_s"] > 0
    assert result["params"]["total"] >= result["params"]["trainable"] > 0
    [table] = _tables(run_root)
    assert dict(zip(table["columns"], table["data"][0])) == json.loads(json.dumps(flat_row(result)))
    logged = dict(zip(table["columns"], table["data"][0]))  # recall by caption type reaches W&B too
    assert logged["types/order/t2v/R@1"] == result["diagnostics"]["caption_types"]["order"]["metrics"]["t2v/R@1"]
    [config] = run_root.glob("tvr-bench/*/config.yaml")  # <save_dir>/<project>/<run id>/, next to checkpoints/
    assert Path(result["run_dir"]) == config.parent.relative_to(tmp) or Path(result["run_dir"]) == config.parent
    assert yaml.safe_load(config.read_text())["leaderboard"]["runs_dir"] == str(tmp / "runs")
    md = (tmp / "runs" / "leaderboard.md").read_text()
    r1, (lo, hi) = result["metrics"]["t2v/R@1"], result["intervals"]["metrics"]["t2v/R@1"]
    assert f"| ★ | clip4clip | synthetic | tiny | 12 | 32 | sel=last, opt=adamw | pairwise | 16 videos | this run | 0 | {r1:.1f} [{lo:.1f}, {hi:.1f}] |" in md
    assert result["protocol"]["test_videos"] == 16 and result["protocol"]["profile"] == "default"
    run_dir = Path(result["run_dir"]) if Path(result["run_dir"]).is_absolute() else tmp / result["run_dir"]
    assert (run_dir / "result.json").is_file() and (run_dir / "result.ranks.npz").is_file()  # for `tvr-bench compare`
    assert (tmp / "runs" / "results" / result["per_query"]["file"]).is_file()
    page = (run_dir / "qualitative.html").read_text()
    assert page.count("<tr>") >= 50 and "data:image/jpeg;base64," in page  # 50 of the 80 test captions
    [board] = _tables(run_root, "leaderboard_all")  # the rebuilt leaderboard: intervals, test set, significance
    got_all = dict(zip(board["columns"], board["data"][0]))
    assert got_all["significance"] == "best" and got_all["t2v/R@1_ci_lo"] == lo and got_all["t2v/R@1_ci_hi"] == hi
    assert got_all["interval"].startswith("95% bootstrap") and got_all["profile"] == "default"
    [qual] = _tables(run_root, "qualitative")
    assert qual["columns"][:5] == ["caption_key", "query", "rank", "correct_video", "correct_frames"]
    assert len(qual["data"]) == 50 and all(1 <= row[2] <= 16 for row in qual["data"])
    assert len(list(run_root.glob("wandb/offline-run-*/files/media/images/test/rank_histograms_*.png"))) == 1
    # everything the run logged lies in its run folder: W&B's default staging area (WANDB_DATA_DIR, the home
    # folder for a user) holds nothing; then the finished run folder moves elsewhere, every other staging area is
    # cleared, and the qualitative table's images are read back from the moved folder alone
    home_staging = tmp / "wandb_home" / "artifacts" / "staging"
    assert not home_staging.exists() or not any(home_staging.iterdir()), sorted(home_staging.iterdir())
    [run_folder] = run_root.glob("wandb/offline-run-*")
    moved = tmp / "elsewhere" / run_folder.name
    moved.parent.mkdir()
    shutil.move(str(run_folder), str(moved))
    shutil.rmtree(tmp / "wandb_home", ignore_errors=True)
    cells = _table_images(moved, rows=50)  # offline, files/media/table holds the word "Image" (wandb #4611)
    assert len(cells) == 50 * 6  # correct video + top 5 per row
    staged = {hashlib.sha256(f.read_bytes()).hexdigest(): f for f in moved.rglob("*") if f.is_file()}
    for cell in cells:
        assert cell["path"].startswith("media/images/") and cell["sha256"] in staged, cell
        with Image.open(staged[cell["sha256"]]) as img:
            assert img.size == (cell["width"], cell["height"]) and img.size[1] == 2 * 64 + 2  # 4 frames, 2 rows of 64 px
    with Image.open(tmp / "runs" / "leaderboard.png") as img:
        assert img.format == "PNG"
    _assert_no_secret(tmp)
