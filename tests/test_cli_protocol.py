"""The CLI front door: the method's data protocol reaches the DataModule (frame sampling per method),
missing or mismatched shards stop with the exact prepare command, and `--help` lists every subcommand."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonargparse import Namespace

from tests.official_fixtures import build_raw, fixtures_dir
from tvr_bench.cli import EXIT_DATA, TOOL_COMMANDS, TVRBenchCLI, _import_class, cli_main, fill_data_protocol, main
from tvr_bench.data.benchmarks.catalog import datamodules
from tvr_bench.data.benchmarks.msrvtt import MSRVTTDataModule
from tvr_bench.data.commands import prepare_main
from tvr_bench.loggers import RunConfigCallback
from tvr_bench.recipes import method_recipes

REPO = Path(__file__).resolve().parents[1]
#: The built-in methods, as the Makefile's METHODS (recipes/methods/<m>.yaml).
METHODS = tuple(method_recipes())
LIGHTNING = ("fit", "validate", "test", "bench")
needs_fixtures = pytest.mark.skipif(
    not (fixtures_dir() / "expected.json").is_file(),
    reason=f"official-format fixtures not found at {fixtures_dir()} (set TVR_FIXTURES_DIR)",
)
pytestmark = pytest.mark.filterwarnings("ignore:sample .* stored frames:UserWarning")


def recipes(method: str, data: str) -> list[str]:
    """`make bench METHOD=<method> DATA=<data>`'s --config arguments (base, method, data, method_data)."""
    files = ["recipes/base.yaml", f"recipes/methods/{method}.yaml", f"recipes/data/{data}.yaml"]
    if (REPO / f"recipes/methods/{method}_{data}.yaml").is_file():
        files.append(f"recipes/methods/{method}_{data}.yaml")
    return [a for f in files for a in ("--config", str(REPO / f))]


def recipe_value(method: str, data: str, section: str, key: str) -> Any:
    """The value the recipe stack gives ``<section>.init_args.<key>`` (last file wins), or None."""
    value = None
    for f in recipes(method, data)[1::2]:
        doc = yaml.safe_load(Path(f).read_text()) or {}
        init = ((doc.get(section) or {}).get("init_args") or {})
        if key in init:
            value = init[key]
    return value


def model_class(method: str) -> type:
    """The model class a method recipe names."""
    doc = yaml.safe_load((REPO / f"recipes/methods/{method}.yaml").read_text())
    cls = _import_class(doc["model"]["class_path"])
    assert cls is not None
    return cls


def build(args: list[str]) -> TVRBenchCLI:
    """The CLI as `tvr-bench` builds it, parsed and instantiated but not run."""
    return cli_main(args, run=False)


def prepare_fixture(tmp_path: Path, out: Path, *extra: str) -> Path:
    """The MSR-VTT official-format fixture prepared into ``out`` (real shards)."""
    raw = build_raw("msrvtt", tmp_path / "raw")
    argv = ["msrvtt", "--videos", str(raw / "msrvtt" / "videos"), "--annotations", str(raw / "msrvtt" / "annotations"),
            "--out", str(out), "--workers", "1", "--no-progress", "--allow-incomplete", *extra]
    assert prepare_main(argv) == 0
    return out


# ------------------------------------------------------------------------------------- --help
def test_help_lists_every_subcommand(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """`tvr-bench --help` lists Lightning's subcommands and every TOOL_COMMANDS entry, built from the dict."""
    monkeypatch.setattr(sys, "argv", ["tvr-bench"])
    monkeypatch.setitem(TOOL_COMMANDS, "zz-extra", "tvr_bench.data.commands:verify_main")
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code in (0, None)
    out = capsys.readouterr().out
    listed = out.split("Available subcommands:", 1)[1]
    for name in [*LIGHTNING, *TOOL_COMMANDS]:
        assert f"\n    {name} " in listed or f"\n    {name}\n" in listed, name
    assert "Re-hash and re-read prepared shards" in listed  # the tool's own docstring line
    for name in ("synth", "prepare", "verify", "leaderboard", "perf"):
        assert name in TOOL_COMMANDS


def test_help_opens_with_what_tvr_bench_is_and_describes_every_subcommand_whole(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The first paragraph says what tvr-bench is (not Lightning's "Trainer command line tool"); every subcommand
    has a whole one-sentence description (Lightning cuts its own docstring lines mid-sentence)."""
    from tvr_bench.cli import SUBCOMMAND_SUMMARIES, TVRBenchCLI
    from tvr_bench.recipes import method_recipes

    monkeypatch.setattr(sys, "argv", ["tvr-bench"])
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    intro = " ".join(out.split("\n\n")[1].split())
    assert intro.startswith("tvr-bench trains and evaluates text-video retrieval methods"), intro
    assert "Lightning Trainer command line tool" not in out
    assert all(m in intro for m in method_recipes())
    listed = " ".join(out.split("Available subcommands:", 1)[1].split())
    names = [*TVRBenchCLI.subcommands(), *TOOL_COMMANDS]
    assert "predict" not in names  # no method defines a predict step: not offered
    for name in names:
        summary = SUBCOMMAND_SUMMARIES.get(name)
        assert summary, f"subcommand {name!r} has no one-line description in SUBCOMMAND_SUMMARIES"
        assert summary.endswith(".") and summary[0].isupper() and summary.count(". ") == 0, summary
        assert f"{name} {summary}" in listed, name  # shown whole, not cut
    with pytest.raises(SystemExit):
        main(["test", "--help"])
    head = " ".join(capsys.readouterr().out.split("\n\n")[1].split())
    assert head == SUBCOMMAND_SUMMARIES["test"]


# ------------------------------------------------------------------------- protocol filling rules
class _Method:
    DATA_PROTOCOL = {"sampling": "segment_middle", "train_stream": "videos", "augment": "clip_train"}


class _OnlySampling:
    def __init__(self, sampling: str | None = None, num_frames: int = 12) -> None:
        pass


class _All:
    def __init__(self, sampling: str | None = None, train_stream: str | None = None, augment: str | None = None) -> None:
        pass


def test_fill_data_protocol_rules() -> None:
    """Unset (None or absent) keys the data class accepts are filled; explicit values and keys the data
    class does not accept are left alone."""
    init = Namespace(sampling=None, num_frames=12)
    assert fill_data_protocol(init, _OnlySampling, _Method) == {"sampling": "segment_middle"}
    assert init.sampling == "segment_middle" and "train_stream" not in init and "augment" not in init
    init = Namespace(sampling="fps1_uniform")
    assert fill_data_protocol(init, _All, _Method) == {"train_stream": "videos", "augment": "clip_train"}
    assert init.sampling == "fps1_uniform" and init.train_stream == "videos" and init.augment == "clip_train"
    init = Namespace()
    assert fill_data_protocol(init, _All, None) == {} and dict(vars(init)) == {}


# --------------------------------------------------------------------- method x dataset commands
@pytest.mark.parametrize("data", sorted(datamodules()))
@pytest.mark.parametrize("method", METHODS)
def test_unprepared_shards_name_the_exact_command(
    method: str, data: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`make bench METHOD=<m> DATA=<d>` without shards stops (exit 3) with one line naming the prepare
    command for the method's sampling and the recipe's frames; the data card shows that command."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["tvr-bench"])
    with pytest.raises(SystemExit) as done:
        cli_main(["bench", *recipes(method, data), "--model.init_args.backbone", "tiny"])
    assert done.value.code == EXIT_DATA
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    cls = datamodules()[data]
    sampling = model_class(method).DATA_PROTOCOL["sampling"]
    frames = recipe_value(method, data, "data", "num_frames") or cls.NUM_FRAMES
    command = cls.prepare_command(sampling, frames)
    assert f"`{command}`" in errors[0]
    assert f"--out {cls.default_root(sampling, frames)}" in command
    assert (sampling != cls.SAMPLING) == (f"--sampling {sampling}" in command)
    assert command in (REPO / "data_cards" / f"{data}.md").read_text(), f"data_cards/{data}.md lacks {command}"


# ------------------------------------------------------------------- real shards, resolved config
@needs_fixtures
def test_xpool_msrvtt_reads_segment_middle_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """X-Pool on MSR-VTT reads the segment_middle shards at data/msrvtt-segment_middle, and the resolved
    protocol is in the config that config.yaml saves; CLIP4Clip on the same stack asks for data/msrvtt."""
    prepare_fixture(tmp_path, tmp_path / "data" / "msrvtt-segment_middle", "--sampling", "segment_middle")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["tvr-bench"])
    cli = build([*recipes("xpool", "msrvtt"), "--model.init_args.backbone", "tiny", "--trainer.logger", "false"])
    dm = cli.datamodule
    assert isinstance(dm, MSRVTTDataModule)
    assert dm.sampling == "segment_middle" and dm.root == "data/msrvtt-segment_middle"
    assert cli.config.data.init_args.sampling == "segment_middle"
    saver = next(c for c in cli.trainer.callbacks if isinstance(c, RunConfigCallback))
    assert saver.config.data.init_args.sampling == "segment_middle"  # what <run dir>/config.yaml will hold
    accepted = inspect.signature(MSRVTTDataModule.__init__).parameters
    for key in ("train_stream", "augment", "last_batch"):  # filled once the DataModules accept them
        if key in accepted:
            assert cli.config.data.init_args[key] == type(cli.model).DATA_PROTOCOL[key]
            assert getattr(dm, key) == type(cli.model).DATA_PROTOCOL[key]
    shards = dm.split_shards("test")  # checks the shards' sampling against the run's
    assert shards.index["sampling"] == "segment_middle" and shards.num_samples > 0

    with pytest.raises(SystemExit) as done:
        build([*recipes("clip4clip", "msrvtt"), "--model.init_args.backbone", "tiny", "--trainer.logger", "false"])
    assert done.value.code == EXIT_DATA


@needs_fixtures
def test_explicit_sampling_wins_and_mismatched_roots_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A recipe's own `sampling` is kept; shards prepared with another sampling in the root the run reads
    stop the run with the command that fixes it (--overwrite for the default root, the default root else)."""
    prepare_fixture(tmp_path, tmp_path / "data" / "msrvtt")
    prepare_fixture(tmp_path, tmp_path / "data" / "msrvtt-segment_middle")  # fps1 frames in the wrong place
    prepare_fixture(tmp_path, tmp_path / "elsewhere")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["tvr-bench"])
    base = [*recipes("xpool", "msrvtt"), "--model.init_args.backbone", "tiny", "--trainer.logger", "false"]

    cli = build([*base, "--data.init_args.sampling", "fps1_uniform"])
    assert cli.datamodule.sampling == "fps1_uniform" and cli.datamodule.root == "data/msrvtt"

    with pytest.raises(SystemExit) as done:
        build(base)
    assert done.value.code == EXIT_DATA
    err = capsys.readouterr().err
    assert "'data/msrvtt-segment_middle' holds msrvtt shards prepared with fps1_uniform sampling" in err
    assert f"`{MSRVTTDataModule.prepare_command('segment_middle', 12)} --overwrite`" in err

    with pytest.raises(SystemExit) as done:
        build([*base, "--data.init_args.root", "elsewhere"])
    assert done.value.code == EXIT_DATA
    err = capsys.readouterr().err
    assert f"`{MSRVTTDataModule.prepare_command('segment_middle', 12)}` and remove data.init_args.root" in err


@pytest.mark.parametrize("method", ["xpool", "clip4clip"])
def test_synthetic_keeps_its_stream_and_takes_no_sampling(method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The synthetic DataModule has no `sampling` argument (its shards are prepared once); its recipe's explicit
    `train_stream: videos` and `augment: none` win over the method's (a flip would contradict the captions'
    left/right, data_cards/synthetic.md)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["tvr-bench"])
    cli = build([*recipes(method, "synthetic"), "--model.init_args.backbone", "tiny", "--trainer.logger", "false"])
    dm = cli.datamodule
    accepted = inspect.signature(type(dm).__init__).parameters
    assert "sampling" not in accepted and "sampling" not in cli.config.data.init_args
    assert dm.train_stream == "videos" == cli.config.data.init_args.train_stream
    assert dm.augment == "none" == cli.config.data.init_args.augment


@needs_fixtures
@pytest.mark.slow
def test_bench_xpool_msrvtt_end_to_end_on_segment_middle_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make bench METHOD=xpool DATA=msrvtt`'s stack (tiny backbone, one epoch) fits and tests on the fixture's
    segment_middle shards; the run's config.yaml records the method's sampling, stream and augmentation."""
    prepare_fixture(tmp_path, tmp_path / "data" / "msrvtt-segment_middle", "--sampling", "segment_middle")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["tvr-bench"])
    small = ["--model.init_args.backbone", "tiny", "--data.init_args.image_size", "64", "--data.init_args.batch_size", "2",
             "--data.init_args.eval_batch_size", "2", "--data.init_args.num_workers", "0", "--trainer.max_epochs", "1",
             "--trainer.default_root_dir", "runs/x"]
    assert main(["bench", *recipes("xpool", "msrvtt"), *small]) == 0
    saved = yaml.safe_load(next((tmp_path / "runs" / "x").rglob("config.yaml")).read_text())
    protocol = model_class("xpool").DATA_PROTOCOL
    for key in ("sampling", "train_stream", "augment", "last_batch"):
        assert saved["data"]["init_args"][key] == protocol[key]
