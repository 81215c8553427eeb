"""Reliability (issue 9): clear errors for bad input, nothing half-written, exact resume of interrupted
prepare and training runs, same seed -> same metrics, non-finite losses, safe loading, a shard fuzz test.

The fast part runs in well under a minute once the session's tiny synthetic set exists
(tests/data_fixtures.py); the CLI resume with a killed process and X-Pool resume are ``slow``.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.data_fixtures import tiny_raw, tiny_root  # noqa: F401 - pytest fixtures
from tvr_bench.callbacks.evaluator import RetrievalEvaluator
from tvr_bench.callbacks.leaderboard import LeaderboardWriter, atomic_write
from tvr_bench.cli import EXIT_CONFIG, EXIT_DATA, EXIT_NONFINITE, main
from tvr_bench.data import synth
from tvr_bench.data.benchmarks.synthetic import SyntheticDataModule
from tvr_bench.data.datamodule import RetrievalDataModule
from tvr_bench.data.prepare import PrepareConfig, prepare
from tvr_bench.data.shards import (
    MissingShardsError,
    ShardError,
    ShardFile,
    encode_sample,
    iter_shard,
    parse_sample,
    read_index,
    sanitize_key,
)
from tvr_bench.methods.base import RNG_STATE_KEY, NonFiniteLossError
from tvr_bench.methods.clip4clip import CLIP4Clip
from tvr_bench.recipes import method_recipes
from tvr_bench.report import build_leaderboard

REPO = Path(__file__).resolve().parents[1]
# the synthetic recipe with the random-backbone profile: the tiny test set has no pretrained backbone of its own
CONFIGS = ["recipes/base.yaml", "recipes/methods/clip4clip.yaml", "recipes/data/synthetic.yaml", "recipes/profiles/scratch.yaml"]
SECRET = "0123456789abcdef0123456789abcdef01234567"  # a fake W&B key: must never reach a file
TINY_CONFIG = PrepareConfig("synthetic", num_frames=12, sampling="segment_middle", short_side=64, jpeg_quality=90, shard_size=16)


# ---------------------------------------------------------------------------------------------- helpers
def _run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """`tvr-bench <argv>` in this process: (exit code, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as exn:
        code = exn.code if isinstance(exn.code, int) else (0 if exn.code is None else 1)
    captured = capsys.readouterr()
    return int(code or 0), captured.out, captured.err


def _synthetic_cli(root: Path, tmp: Path, *extra: str, configs: list[str] = CONFIGS) -> list[str]:
    """Recipe stack for the tiny synthetic set with everything written under ``tmp``."""
    args = [a for c in configs for a in ("--config", str(REPO / c))]
    return [
        *args,
        "--data.init_args.size", "tiny",
        "--data.init_args.root", str(root),
        "--data.init_args.num_workers", "0",
        "--data.init_args.batch_size", "8",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(tmp / "run"),
        "--leaderboard.runs_dir", str(tmp / "runs"),
        *extra,
    ]


@pytest.fixture(autouse=True)
def _restore_process_state(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Fits here set the seed variables, deterministic algorithms and one torch thread: undo it afterwards."""
    for var in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG"):
        if var in os.environ:
            monkeypatch.setenv(var, os.environ[var])
        else:
            monkeypatch.delenv(var, raising=False)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run CLI commands inside tmp_path with a fake W&B key in the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["tvr-bench"])
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return tmp_path


def _assert_no_secret(root: Path) -> None:
    """No file under ``root`` holds the fake W&B key."""
    for path in root.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"W&B key written to {path}"


def _copy_root(tiny_root: Path, dest: Path, splits: tuple[str, ...] = ("val",)) -> Path:
    """A writable copy of some prepared splits (plus the manifest, so the synthetic module does not rebuild)."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_root / "manifest.json", dest / "manifest.json")
    for split in splits:
        shutil.copytree(tiny_root / split, dest / split)
    return dest


def _rewrite_shard(split_dir: Path, edit: Any) -> str:
    """Rewrite shard-00000 of a split with ``edit(i, key, frames, meta) -> sample dict`` applied to sample 3;
    index.json is updated so that only the edited sample is wrong. Returns the edited sample's key."""
    shard = split_dir / "shard-00000.tar"
    samples = list(iter_shard(shard))
    shard.unlink()
    writer = ShardFile(shard)
    for i, sample in enumerate(samples):
        meta, frames = parse_sample(sample)
        encoded = encode_sample(sample["__key__"], frames, meta)
        if i == 3:
            encoded = edit(encoded, frames, meta)
        writer.write(encoded, len(meta["captions"]))
    info = writer.finish()
    index = read_index(split_dir)
    index["shards"][0].update(sha256=info.sha256, bytes=info.bytes)
    (split_dir / "index.json").write_text(json.dumps(index))
    return samples[3]["__key__"]


def _dm(root: Path, **kw: Any) -> RetrievalDataModule:
    args: dict[str, Any] = dict(root=str(root), dataset="synthetic", num_frames=12, image_size=64, batch_size=8,
                                eval_batch_size=5, num_workers=0)
    args.update(kw)
    return RetrievalDataModule(**args)


class _Marker:
    """Unpickling this object would create a file: the proof that a pickle was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


# ------------------------------------------------------------------------------------ bad input: shards
def _drop_json(sample: dict, frames: list[bytes], meta: dict) -> dict:
    return {k: v for k, v in sample.items() if k != "json"}


def _drop_frames(sample: dict, frames: list[bytes], meta: dict) -> dict:
    return {k: v for k, v in sample.items() if not k.endswith(".jpg")}


def _no_captions(sample: dict, frames: list[bytes], meta: dict) -> dict:
    return {**sample, "json": json.dumps({k: v for k, v in meta.items() if k != "captions"}).encode()}


def _empty_caption(sample: dict, frames: list[bytes], meta: dict) -> dict:
    return {**sample, "json": json.dumps({**meta, "captions": [meta["captions"][0], "  "]}).encode()}


def _png_frame(sample: dict, frames: list[bytes], meta: dict) -> dict:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    return {**sample, "000.jpg": buffer.getvalue()}


def _bad_json(sample: dict, frames: list[bytes], meta: dict) -> dict:
    return {**sample, "json": b'{"captions": ["a", '}


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (_drop_json, "no json member"),
        (_drop_frames, "no frame members"),
        (_no_captions, "no captions"),
        (_empty_caption, r"empty caption\(s\) at position \[1\]"),
        (_png_frame, "undecodable frame"),
        (_bad_json, "unreadable json member"),
    ],
)
def test_bad_sample_error_names_shard_key_and_problem(tiny_root: Path, tmp_path: Path, edit: Any, problem: str) -> None:
    root = _copy_root(tiny_root, tmp_path / "root")
    key = _rewrite_shard(root / "val", edit)
    with pytest.raises(ShardError, match=problem) as info:
        list(_dm(root).val_dataloader())
    assert "shard-00000.tar" in str(info.value) and repr(key) in str(info.value)


def test_pickle_member_is_refused_never_unpickled(tiny_root: Path, tmp_path: Path) -> None:
    root = _copy_root(tiny_root, tmp_path / "root")
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Marker(str(marker)))
    key = _rewrite_shard(root / "val", lambda sample, frames, meta: {**sample, "pyd": payload, "pickle": payload})
    with pytest.raises(ShardError, match=r"unexpected member\(s\) pickle, pyd") as info:
        list(_dm(root).val_dataloader())
    assert repr(key) in str(info.value) and "shard-00000.tar" in str(info.value)
    assert not marker.exists()


def test_fewer_frames_than_asked_are_padded_masked_and_train(tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A clip stored with 7 of the split's 12 frames: one warning per run names the key, the mask marks the
    padding, a training step is finite."""
    from tvr_bench.data import streams
    from tvr_bench.data.transforms import normalize_batch

    monkeypatch.setattr(streams, "_short_warned", 0)  # other tests may have used up this process's warning
    root = _copy_root(tiny_root, tmp_path / "root", splits=("train",))

    def shorten(encoded: dict, frames: list, meta: dict) -> dict:
        return encode_sample(encoded["__key__"], frames[:7], {**meta, "num_frames": 7})

    key = _rewrite_shard(root / "train", shorten)
    dm = _dm(root, batch_size=48)  # one batch holds every video
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=0)
    with pytest.warns(UserWarning, match=rf"'{key}' has 7 stored frames, 12 asked: padded with frame_mask=False"):
        batch = next(iter(dm.train_dataloader()))
    row = batch["video_key"].index(key)
    assert batch["frame_mask"][row, :7].all() and not batch["frame_mask"][row, 7:].any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per run: the next pass does not warn again
        next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    model = CLIP4Clip(backbone="tiny")
    loss = model.training_step(normalize_batch(batch), 0)
    assert torch.isfinite(loss)


def test_corrupt_and_missing_shards_through_the_cli(tiny_root: Path, cli_env: Path, capsys: pytest.CaptureFixture) -> None:
    """`tvr-bench test` on a truncated shard and `fit` on a missing split: `error: ...`, exit code 3, no traceback."""
    root = _copy_root(tiny_root, cli_env / "root", splits=("test",))
    shard = root / "test" / "shard-00000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 700])
    code, _, err = _run_cli(["test", *_synthetic_cli(root, cli_env)], capsys)
    assert code == EXIT_DATA, err[-2000:]
    assert "error: " in err and str(shard) in err and "truncated" in err and "tvr-bench prepare" in err
    assert "Traceback" not in err
    # a split that was never prepared: the data card of the dataset named in the message
    argv = [
        "fit", *[a for c in CONFIGS[:2] for a in ("--config", str(REPO / c))],
        "--data.class_path", "tvr_bench.data.datamodule.RetrievalDataModule",
        "--data.init_args.root", str(cli_env / "nowhere"), "--data.init_args.dataset", "msrvtt",
        "--data.init_args.num_workers", "0", "--trainer.default_root_dir", str(cli_env / "run"),
        "--leaderboard.runs_dir", str(cli_env / "runs"),
    ]
    code, _, err = _run_cli(argv, capsys)
    assert code == EXIT_DATA, err[-2000:]
    assert f"no prepared shards at {cli_env / 'nowhere' / 'train'}" in err and "data_cards/msrvtt.md" in err
    assert "Traceback" not in err
    _assert_no_secret(cli_env)


def test_verify_command_finds_corrupt_shards(tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`tvr-bench verify ROOT`: 0 and `ok` per split on good shards; 3 naming the shard after a bit flip."""
    root = _copy_root(tiny_root, tmp_path / "root", splits=("val", "test"))
    code, out, _ = _run_cli(["verify", str(root)], capsys)
    assert code == 0 and out.splitlines() == ["test: ok", "val: ok"]
    shard = root / "test" / "shard-00000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x10
    shard.write_bytes(bytes(data))
    code, out, err = _run_cli(["verify", str(root), "--splits", "test"], capsys)
    assert code == EXIT_DATA and f"{shard}: sha256 differs from index.json" in out and "--overwrite" in err
    code, _, err = _run_cli(["verify", str(tmp_path / "nothing")], capsys)
    assert code == EXIT_DATA and "no prepared split" in err


def test_missing_shard_errors_are_file_not_found() -> None:
    """MissingShardsError stays a FileNotFoundError for callers that catch that."""
    assert issubclass(MissingShardsError, FileNotFoundError)


def test_unreadable_index_and_escaping_shard_names(tiny_root: Path, tmp_path: Path) -> None:
    root = _copy_root(tiny_root, tmp_path / "root")
    index_path = root / "val" / "index.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps(index)[:-20])
    with pytest.raises(ShardError, match=r"index.json: unreadable index"):
        _dm(root).setup("validate")
    index["shards"][0]["file"] = "../../train/shard-00000.tar"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ShardError, match="is not a tar file name inside"):
        _dm(root).setup("validate")


# ----------------------------------------------------------------------------- bad input: configuration
@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--model.class_path", "tvr_bench.methods.Nope"], "tvr_bench.methods.Nope"),
        (["--data.class_path", "tvr_bench.data.benchmarks.nope.NopeDataModule"], "tvr_bench.data.benchmarks.nope.NopeDataModule"),
        (["--data.init_args.batch_size", "abc"], "batch_size"),
        (["--trainer.max_epochs", "many"], "max_epochs"),
        (["--model.init_args.max_words", "1"], "error: invalid configuration: ValueError: max_words must be at least 3"),
        (["--data.init_args.size", "huge"], "size"),
    ],
)
def test_config_errors_exit_2_with_a_message(tiny_root: Path, cli_env: Path, capsys: pytest.CaptureFixture, extra: list[str], needle: str) -> None:
    code, _, err = _run_cli(["fit", *_synthetic_cli(tiny_root, cli_env), *extra], capsys)
    assert code == EXIT_CONFIG and needle in err and "Traceback" not in err


def test_make_rejects_unknown_method_and_dataset() -> None:
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    for var, value in (("METHOD", "foo"), ("DATA", "nowhere")):
        proc = subprocess.run(["make", "-s", "-C", str(REPO), "check-names", f"{var}={value}"], capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0 and f"unknown {var} '{value}'" in proc.stderr


# ------------------------------------------------------------------------------- prepare: bad videos, keys
def _mini_release(tiny_raw: Path, dest: Path, edit: Any = None) -> tuple[Path, Path]:
    """A 3-video synthetic release (two good files, one unreadable mp4); ``edit`` may change the entries."""
    data = json.loads((tiny_raw / "annotations.json").read_text())
    videos = [v for v in data["videos"] if v["split"] == "test"][:3]
    (dest / "videos").mkdir(parents=True)
    for v in videos:
        shutil.copy(tiny_raw / "videos" / v["file"], dest / "videos" / v["file"])
    (dest / "videos" / videos[1]["file"]).write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    if edit is not None:
        edit(videos)
    (dest / "annotations.json").write_text(json.dumps({**data, "videos": videos}))
    return dest / "videos", dest


def _prepare_argv(videos: Path, annotations: Path, out: Path) -> list[str]:
    return ["prepare", "synthetic", "--videos", str(videos), "--annotations", str(annotations), "--out", str(out),
            "--workers", "1", "--no-progress"]


def test_prepare_unreadable_video_and_empty_caption_go_to_the_manifest(tiny_raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def blank_caption(videos: list[dict]) -> None:
        videos[2]["captions"] = [videos[2]["captions"][0], " "]

    videos, annotations = _mini_release(tiny_raw, tmp_path / "raw", blank_caption)
    code, out, err = _run_cli(_prepare_argv(videos, annotations, tmp_path / "out"), capsys)
    assert code == 0, err
    assert "test: 1 videos" in out and "2 videos missing or undecodable: see" in out and "manifest.json" in out
    failures = {f["video_id"]: f for f in json.loads((tmp_path / "out" / "manifest.json").read_text())["failures"]}
    assert failures["test-00001"]["reason"].startswith("decode error:") and failures["test-00001"]["file"] == "test-00001.mp4"
    assert failures["test-00002"]["reason"].startswith("empty caption(s) at position [1]")


def test_prepare_keys_and_splits_cannot_escape_the_output(tiny_raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def hostile_ids(videos: list[dict]) -> None:
        videos[0]["video_id"] = "../../escape/x"
        videos[2]["video_id"] = "/abs/olute.mp4"

    videos, annotations = _mini_release(tiny_raw, tmp_path / "raw", hostile_ids)
    code, _, err = _run_cli(_prepare_argv(videos, annotations, tmp_path / "sub" / "out"), capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "sub"]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["out"]
    assert not list(tmp_path.parent.glob("escape*")) and not Path("/abs").exists()
    keys = [s["__key__"] for s in iter_shard(tmp_path / "sub" / "out" / "test" / "shard-00000.tar")]
    assert keys == [sanitize_key("../../escape/x"), sanitize_key("/abs/olute.mp4")]
    assert all("/" not in k and "." not in k for k in keys)
    # a split name is a directory: a path there is refused before anything is written
    data = json.loads((annotations / "annotations.json").read_text())
    data["videos"][0]["split"] = "../../evil"
    (annotations / "annotations.json").write_text(json.dumps(data))
    code, _, err = _run_cli(_prepare_argv(videos, annotations, tmp_path / "sub" / "out2"), capsys)
    assert code == 1 and "invalid split name '../../evil'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "sub"] and not list(tmp_path.parent.glob("evil"))


def test_video2dataset_ids_cannot_escape_the_cache(tiny_raw: Path, tmp_path: Path) -> None:
    """Hostile ids in video2dataset jsons become plain file names, and nothing is written (videos stay in the tars)."""
    from tvr_bench.data.benchmarks.video2dataset import index_videos

    video = (tiny_raw / "videos" / "test-00000.mp4").read_bytes()
    (tmp_path / "v2d").mkdir()
    with tarfile.open(tmp_path / "v2d" / "00000.tar", "w") as tar:
        for key, vid in (("000000000", "../../escape"), ("000000001", "/etc/x"), ("000000002", "..")):
            for ext, data in (("mp4", video), ("json", json.dumps({"video_id": vid}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    index = index_videos(tmp_path / "v2d", progress=False)
    names = sorted(index.members)
    assert len(names) == 3 and all("/" not in n and "\\" not in n and not n.startswith(".") for n in names)
    assert not (tmp_path / "escape.mp4").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["v2d"]
    assert sorted(p.name for p in (tmp_path / "v2d").iterdir()) == ["00000.tar"]


# ---------------------------------------------------------------------------------- nothing half-written
def _prepared_state(root: Path) -> dict[str, Any]:
    """Indexes, manifest, file lists and shard hashes: what a resumed prepare must reproduce."""
    out: dict[str, Any] = {"manifest": (root / "manifest.json").read_text()}
    for split in ("train", "val", "test"):
        out[split] = (root / split / "index.json").read_text()
        out[f"{split}-files"] = sorted(p.name for p in (root / split).iterdir())
    return out


def test_prepare_interrupted_inside_the_writer_resumes_without_gaps(tiny_raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shard writer fails after 21 samples (second train shard half written): no half shard, no index;
    --resume then produces byte-identical shards to an uninterrupted run, every video exactly once."""
    records = list(synth.read_records(tiny_raw / "videos", tiny_raw))
    full = prepare(records, tmp_path / "full", TINY_CONFIG, source_root=tiny_raw / "videos", progress=False)
    real_write = ShardFile.write
    written = {"n": 0}

    def failing_write(self: ShardFile, sample: dict, num_captions: int) -> None:
        written["n"] += 1
        if written["n"] == 21:
            raise OSError("No space left on device (simulated)")
        real_write(self, sample, num_captions)

    monkeypatch.setattr(ShardFile, "write", failing_write)
    with pytest.raises(OSError, match="simulated"):
        prepare(records, tmp_path / "cut", TINY_CONFIG, source_root=tiny_raw / "videos", progress=False)
    monkeypatch.setattr(ShardFile, "write", real_write)
    assert sorted(p.name for p in (tmp_path / "cut" / "train").iterdir()) == ["shard-00000.tar"]  # the .tmp is gone
    assert not (tmp_path / "cut" / "manifest.json").exists() and not (tmp_path / "cut" / "train" / "index.json").exists()
    report = prepare(records, tmp_path / "cut", TINY_CONFIG, source_root=tiny_raw / "videos", resume=True, progress=False)
    assert report.reused == 16 and report.converted == full.converted - 16
    assert _prepared_state(tmp_path / "cut") == _prepared_state(tmp_path / "full")
    keys = [s["__key__"] for split in ("train", "val", "test") for p in sorted((tmp_path / "cut" / split).glob("*.tar")) for s in iter_shard(p)]
    assert len(keys) == len(set(keys)) == 80


_KILL_PREPARE = """
import os, signal, sys
from pathlib import Path
from tvr_bench.data import synth
from tvr_bench.data.prepare import PrepareConfig, prepare
from tvr_bench.data.shards import ShardFile
raw, out, after = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
real, seen = ShardFile.write, [0]
def write(self, sample, n):
    seen[0] += 1
    if seen[0] == after:
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: a power cut
    real(self, sample, n)
ShardFile.write = write
config = PrepareConfig("synthetic", num_frames=12, sampling="segment_middle", short_side=64, jpeg_quality=90, shard_size=16)
prepare(synth.read_records(raw / "videos", raw), out, config, source_root=raw / "videos", progress=False)
"""


def test_prepare_killed_hard_resumes_identically(tiny_raw: Path, tiny_root: Path, tmp_path: Path) -> None:
    """SIGKILL in the middle of the third train shard leaves a .tmp; --resume redoes it and matches a clean run."""
    proc = subprocess.run([sys.executable, "-c", _KILL_PREPARE, str(tiny_raw), str(tmp_path / "out"), "40"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    files = sorted(p.name for p in (tmp_path / "out" / "train").iterdir())
    assert files == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar.tmp"]
    records = synth.read_records(tiny_raw / "videos", tiny_raw)
    reader_config = PrepareConfig("synthetic", num_frames=12, sampling="segment_middle", short_side=64, jpeg_quality=90, shard_size=16)
    report = prepare(records, tmp_path / "out", reader_config, source_root=tiny_raw / "videos", resume=True, progress=False)
    assert report.reused == 32
    clean = tmp_path / "clean"
    prepare(synth.read_records(tiny_raw / "videos", tiny_raw), clean, reader_config, source_root=tiny_raw / "videos", progress=False)
    assert _prepared_state(tmp_path / "out") == _prepared_state(clean)


def test_results_and_leaderboard_are_replaced_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while writing keeps the previous file whole and leaves no temporary file (JSON, CSV, MD, PNG)."""
    target = tmp_path / "results" / "x.json"
    atomic_write(target, '{"old": true}\n')

    class Boom(str):
        def encode(self, *args: Any, **kwargs: Any) -> bytes:
            raise OSError("disk full (simulated)")

    with pytest.raises(OSError):
        atomic_write(target, Boom('{"new": true}'))
    assert target.read_text() == '{"old": true}\n' and sorted(p.name for p in target.parent.iterdir()) == ["x.json"]

    build_leaderboard(tmp_path / "runs", out_dir=tmp_path / "board")
    before = {p.name: p.read_bytes() for p in (tmp_path / "board").iterdir()}
    assert set(before) == {"leaderboard.csv", "leaderboard.md", "leaderboard.png"}
    real_replace = os.replace

    def failing_replace(src: Any, dst: Any) -> None:
        if str(dst).endswith(".png"):
            raise OSError("disk full (simulated)")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        build_leaderboard(tmp_path / "runs", out_dir=tmp_path / "board")
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(p.name for p in (tmp_path / "board").iterdir()) == sorted(before)  # no temporary left behind
    assert (tmp_path / "board" / "leaderboard.png").read_bytes() == before["leaderboard.png"]


# ------------------------------------------------------------------------------------------ exact resume
class _Interrupt(Exception):
    """Raised by :class:`StopAtStep` to cut a fit short (stands for a killed process)."""


class StopAtStep(L.Callback):
    """Raise after the optimiser step ``step`` (before a checkpoint of that step would be written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        """Cut the run."""
        if trainer.global_step == self.step:
            raise _Interrupt(f"stopped at step {self.step}")


class KillAtStep(L.Callback):
    """SIGKILL this process after optimiser step ``step`` (CLI resume test)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        """Die without any cleanup."""
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class BatchKeys(L.Callback):
    """Record (epoch, batch index, video keys) of every training batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, tuple[str, ...]]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Remember the batch."""
        self.seen.append((trainer.current_epoch, batch_idx, tuple(batch["video_key"])))


def _fit(method: type, root: Path, ckpt_dir: Path, *, stop: int | None = None, ckpt_path: Path | None = None,
         workers: int = 0, seed: int = 0, runs_dir: Path | None = None, max_steps: int = -1, **model_kw: Any) -> dict[str, Any]:
    """A short deterministic CPU fit on the tiny set (2 epochs of 6 batches), then a test; returns metrics,
    final weights and the batches trained on (None metrics when cut). A run cut at ``stop`` writes
    ``last.ckpt`` every 3 steps (the others write none: checkpoint files cost more than the steps)."""
    L.seed_everything(seed, verbose=False)
    dm = SyntheticDataModule(size="tiny", root=str(root), batch_size=8, num_workers=workers,
                             num_frames=model_kw.pop("frames", 4), seed=0)
    model = method(backbone="tiny", lr=5e-4, backbone_lr=5e-4, **model_kw)
    evaluator, keys = RetrievalEvaluator(print_table=False), BatchKeys()
    callbacks: list[L.Callback] = [evaluator, keys]
    if runs_dir is not None:
        callbacks.append(LeaderboardWriter(runs_dir=str(runs_dir), rebuild=False))
    if stop is not None:
        callbacks += [StopAtStep(stop), ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_last=True, save_top_k=0)]
    trainer = L.Trainer(max_epochs=2, max_steps=max_steps, accelerator="cpu", deterministic=True, logger=False,
                        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, enable_checkpointing=stop is not None, default_root_dir=ckpt_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
        except _Interrupt:
            return {"metrics": None, "weights": None, "batches": keys.seen}
        trainer.test(model, datamodule=dm, verbose=False, weights_only=True)
    return {"metrics": dict(evaluator.last_metrics), "weights": {k: v.clone() for k, v in model.state_dict().items()},
            "batches": keys.seen}


def _assert_same_run(full: dict[str, Any], resumed: dict[str, Any], done: int) -> None:
    """Resumed run = the uninterrupted one: metrics, every weight bit, and the batches after step ``done``."""
    assert resumed["metrics"] == full["metrics"]
    assert full["weights"].keys() == resumed["weights"].keys()
    for name, value in full["weights"].items():
        assert torch.equal(value, resumed["weights"][name]), name
    assert resumed["batches"] == full["batches"][done:]


def test_training_killed_mid_epoch_resumes_exactly(tiny_root: Path, tmp_path: Path) -> None:
    """CLIP4Clip cut after step 11 (last checkpoint: step 9, batch 3 of epoch 1) and resumed from last.ckpt
    (loaded with weights_only=True) ends with the metrics and weights of the uninterrupted run."""
    torch.set_num_threads(1)
    full = _fit(CLIP4Clip, tiny_root, tmp_path / "full", frames=2)
    _fit(CLIP4Clip, tiny_root, tmp_path / "cut", stop=11, frames=2)
    last = torch.load(tmp_path / "cut" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 9 and last["SyntheticDataModule"]["train_stream"] == {"epoch": 1, "batches": 3, "num_batches": 6, "global_batch": 8}
    assert set(last[RNG_STATE_KEY]) == {"cpu"}
    resumed = _fit(CLIP4Clip, tiny_root, tmp_path / "resumed", ckpt_path=tmp_path / "cut" / "last.ckpt", frames=2)
    _assert_same_run(full, resumed, 9)


@pytest.mark.slow
@pytest.mark.parametrize(("stop", "workers"), [(11, 2), (7, 0)])
def test_xpool_resume_with_dropout_workers_and_epoch_end(tiny_root: Path, tmp_path: Path, stop: int, workers: int) -> None:
    """X-Pool (dropout: the checkpoint's RNG state matters), two workers with a skip that is not a multiple
    of them, and a checkpoint on the last batch of an epoch."""
    from tvr_bench.methods.xpool import XPool

    torch.set_num_threads(1)
    full = _fit(XPool, tiny_root, tmp_path / "full", workers=workers)
    _fit(XPool, tiny_root, tmp_path / "cut", stop=stop, workers=workers)
    done = torch.load(tmp_path / "cut" / "last.ckpt", weights_only=True)["global_step"]
    assert done == stop // 3 * 3
    resumed = _fit(XPool, tiny_root, tmp_path / "resumed", ckpt_path=tmp_path / "cut" / "last.ckpt", workers=workers)
    _assert_same_run(full, resumed, done)


@pytest.mark.parametrize(("skip", "workers"), [(3, 0), (3, 2)])
def test_train_stream_skips_exactly_the_batches_already_seen(tiny_root: Path, skip: int, workers: int) -> None:
    """After load_state_dict the same epoch continues with batch `skip` (with 2 workers too: each worker starts at
    its first batch after the skip); a state of the former stream (no global batch) with the same epoch length is
    taken as it is."""
    def batches(state: dict[str, int] | None) -> list[tuple[str, ...]]:
        dm = _dm(tiny_root, num_frames=2, image_size=32, num_workers=workers, seed=3)
        dm.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=1)
        if state is not None:
            dm.load_state_dict({"train_stream": state})
        loader = dm.train_dataloader()
        out = [tuple(b["video_key"]) for b in loader]
        assert loader.state_dict() == {"epoch": 1, "batches": len(loader), "num_batches": len(loader), "global_batch": 8}
        return out

    full = batches(None)
    assert len(full) == 6
    assert batches({"epoch": 1, "batches": skip, "num_batches": 6, "global_batch": 8}) == full[skip:]
    assert batches({"epoch": 1, "batches": skip, "num_batches": 6}) == full[skip:]
    assert batches({"epoch": 0, "batches": skip, "num_batches": 6}) == full  # another epoch: nothing skipped
    with pytest.warns(UserWarning, match="cannot restore the data position"):
        assert batches({"epoch": 1, "batches": skip, "num_batches": 7}) == full


@pytest.mark.slow
def test_cli_fit_killed_and_resumed_with_ckpt_path(tiny_root: Path, tmp_path: Path) -> None:
    """`tvr-bench fit` SIGKILLed mid-epoch, resumed with `--ckpt_path last.ckpt`, tests like the uninterrupted run."""
    env = {**os.environ, "WANDB_MODE": "disabled", "WANDB_API_KEY": SECRET, "PYTHONPATH": str(REPO)}
    last_ckpt = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": "ckpt", "every_n_train_steps": 3, "save_last": True, "save_top_k": 0}}

    def cli(run: str, *extra: str) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "tvr_bench.cli", "fit", *_synthetic_cli(tiny_root, tmp_path / run),
                "--data.init_args.num_frames", "4", "--trainer.max_epochs", "2", "--trainer.deterministic", "true",
                "--trainer.callbacks+", json.dumps(last_ckpt), *extra]
        return subprocess.run(args, cwd=tmp_path / run, env=env, capture_output=True, text=True, timeout=600)

    for run in ("full", "cut"):
        (tmp_path / run).mkdir()
    assert cli("full").returncode == 0
    kill = {"class_path": "tests.test_reliability.KillAtStep", "init_args": {"step": 10}}
    assert cli("cut", "--trainer.callbacks+", json.dumps(kill)).returncode == -signal.SIGKILL
    ckpt = tmp_path / "cut" / "ckpt" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 9
    resumed = cli("cut", "--ckpt_path", str(ckpt))
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def final_weights(run: str) -> dict[str, torch.Tensor]:
        return torch.load(tmp_path / run / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]

    full_w, resumed_w = final_weights("full"), final_weights("cut")
    assert full_w.keys() == resumed_w.keys() and all(torch.equal(full_w[k], resumed_w[k]) for k in full_w)
    _assert_no_secret(tmp_path)


# ------------------------------------------------------------------------------------------ reproducible
def test_same_seed_same_result_json_tmass(tiny_root: Path, tmp_path: Path) -> None:
    """Two T-MASS runs with seed 0 (training draws, dropout and the evaluation's stochastic trials) write
    identical metrics into their result JSONs; seed 1 trains to other weights."""
    from tvr_bench.methods.tmass import TMASS

    torch.set_num_threads(1)
    runs = [_fit(TMASS, tiny_root, tmp_path / f"ck{i}", runs_dir=tmp_path / f"runs{i}", max_steps=3, frames=4,
                 num_frames=4, trials=5, seed=seed) for i, seed in enumerate((0, 0, 1))]
    results = [json.loads((tmp_path / f"runs{i}" / "results" / f"tmass__synthetic__tiny__seed{seed}.json").read_text())
               for i, seed in enumerate((0, 0, 1))]
    assert results[0]["metrics"] == results[1]["metrics"] and len(results[0]["metrics"]) == 10
    assert all(torch.equal(runs[0]["weights"][k], runs[1]["weights"][k]) for k in runs[0]["weights"])
    assert not all(torch.equal(runs[0]["weights"][k], runs[2]["weights"][k]) for k in runs[0]["weights"])


# ------------------------------------------------------------------------------------- non-finite losses
class NaNLossCLIP4Clip(CLIP4Clip):
    """CLIP4Clip whose training loss is NaN (stands for a diverged run)."""

    def training_loss(self, text: Any, video: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The real loss times NaN."""
        loss, extra = super().training_loss(text, video)
        return loss * float("nan"), extra


def test_non_finite_loss_names_the_batch_keys(tiny_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tvr_bench.data.transforms import normalize_batch

    dm = _dm(tiny_root, num_frames=2)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=0)
    batch = normalize_batch(next(iter(dm.train_dataloader())))
    torch.manual_seed(0)
    model = CLIP4Clip(backbone="tiny")
    monkeypatch.setattr(model, "training_loss", lambda text, video: (torch.tensor(float("inf")), {}))
    with pytest.raises(NonFiniteLossError, match="non-finite training loss inf at step 0") as info:
        model.training_step(batch, 0)
    assert "samples in the batch: " + ", ".join(batch["video_key"]) in str(info.value)


def test_nan_loss_stops_the_cli_with_exit_code_4(tiny_root: Path, cli_env: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = _run_cli(["fit", *_synthetic_cli(tiny_root, cli_env), "--data.init_args.num_frames", "2",
                             "--model.class_path", "tests.test_reliability.NaNLossCLIP4Clip"], capsys)
    assert code == EXIT_NONFINITE, err[-2000:]
    dm = _dm(tiny_root, num_frames=2)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=0)
    first = next(iter(dm.train_dataloader()))["video_key"]
    assert "error: non-finite training loss nan at step 0; samples in the batch: " + ", ".join(first) in err
    assert "Traceback" not in err
    _assert_no_secret(cli_env)


# ------------------------------------------------------------------------------------------ safe loading
@pytest.mark.parametrize("recipe", method_recipes())
def test_every_method_checkpoint_content_loads_weights_only(recipe: str, tmp_path: Path) -> None:
    """hparams and weights of every method recipe are plain types and tensors: torch.load(weights_only=True)."""
    import importlib

    import yaml

    model_cfg = yaml.safe_load((REPO / "recipes" / "methods" / f"{recipe}.yaml").read_text())["model"]
    module_name, _, class_name = model_cfg["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    model = cls(**{**model_cfg.get("init_args", {}), "backbone": "tiny"})
    payload = {"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict(), RNG_STATE_KEY: {"cpu": torch.get_rng_state()}}
    torch.save(payload, tmp_path / "m.ckpt")
    loaded = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert loaded["hyper_parameters"] == dict(model.hparams)


def test_bench_tests_with_weights_only() -> None:
    """`bench` tests its best checkpoint with weights_only=True (test_wandb_offline runs it end to end)."""
    from tvr_bench.cli import _bench

    calls: dict[str, Any] = {}
    trainer = SimpleNamespace(
        checkpoint_callback=SimpleNamespace(best_model_path="best.ckpt"),
        fit=lambda model, datamodule=None: calls.setdefault("fit", True),
        test=lambda model, datamodule=None, **kw: calls.update(test=kw),
    )
    _bench(trainer, model=None)
    assert calls["test"]["ckpt_path"] == "best.ckpt" and calls["test"]["weights_only"] is True


def test_cli_refuses_a_checkpoint_holding_a_pickle(tiny_root: Path, cli_env: Path, capsys: pytest.CaptureFixture) -> None:
    """`tvr-bench test --ckpt_path evil.ckpt`: refused by the weights-only unpickler, the payload never runs."""
    marker = cli_env / "pwned"
    torch.save({"state_dict": {}, "evil": _Marker(str(marker))}, cli_env / "evil.ckpt")
    code, _, err = _run_cli(["test", *_synthetic_cli(tiny_root, cli_env), "--ckpt_path", str(cli_env / "evil.ckpt")], capsys)
    assert code == EXIT_DATA and "error: refused to load the checkpoint" in err and "Weights only load failed" in err
    assert not marker.exists() and "Traceback" not in err
    code, _, err = _run_cli(["test", *_synthetic_cli(tiny_root, cli_env), "--ckpt_path", str(cli_env / "nope.ckpt")], capsys)
    assert code == EXIT_DATA and "nope.ckpt" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------- fuzz
FUZZ_CASES = 30


def _fuzz_shard(data: bytes, seed: int, n: int) -> list[tuple[str, bytes]]:
    """``n`` deterministic corruptions of a shard: bit flips (half of them in tar headers or the JSON
    members), truncations at random offsets and short random bursts."""
    rng = random.Random(seed)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        structural = [(m.offset, m.offset + 512) for m in tar.getmembers()]
        structural += [(m.offset_data, m.offset_data + m.size) for m in tar.getmembers() if m.name.endswith(".json")]
    cases = []
    for i in range(n):
        out = bytearray(data)
        kind = ("flip", "truncate", "burst")[i % 3]
        if kind == "flip":
            for _ in range(rng.randint(1, 4)):
                lo, hi = rng.choice(structural) if rng.random() < 0.5 else (0, len(out))
                pos = rng.randrange(lo, hi)
                out[pos] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            out = out[: rng.randrange(len(out))]
        else:
            pos = rng.randrange(len(out))
            for j in range(pos, min(len(out), pos + rng.randint(1, 256))):
                out[j] = rng.randrange(256)
        cases.append((kind, bytes(out)))
    return cases


def _read_with_alarm(root: Path, seconds: int) -> dict[str, Any]:
    """Read the corrupted val split once under a SIGALRM deadline; the outcome as a dict."""
    def timeout(*_: Any) -> None:
        raise TimeoutError(f"reader hung for {seconds} s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        batches = list(_dm(root, eval_batch_size=16).val_dataloader())
        return {"result": "ok", "videos": sum(len(b["video_key"]) for b in batches)}
    except ShardError as exn:
        return {"result": "ShardError", "message": str(exn)}
    except Exception as exn:  # noqa: BLE001 - reported by the test
        return {"result": type(exn).__name__, "message": str(exn)}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_fuzzed_shards_give_samples_or_a_shard_error(tiny_root: Path, tmp_path: Path) -> None:
    """30 corrupted copies of a shard (seeded): each read ends with all 16 videos or a ShardError naming the
    shard, never another exception or a hang (10 s alarm per case; a crash would take pytest down)."""
    root = _copy_root(tiny_root, tmp_path / "root")
    shard = root / "val" / "shard-00000.tar"
    outcomes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind, data in _fuzz_shard(shard.read_bytes(), 1234, FUZZ_CASES):
            shard.write_bytes(data)
            outcomes.append({"kind": kind, **_read_with_alarm(root, 10)})
    for case in outcomes:
        assert case["result"] in ("ok", "ShardError"), case
        if case["result"] == "ok":
            assert case["videos"] == 16, case
        else:
            assert str(shard) in case["message"], case
    kinds = {(c["kind"], c["result"]) for c in outcomes}
    assert {("truncate", "ShardError"), ("flip", "ShardError"), ("flip", "ok"), ("burst", "ShardError")} <= kinds


# ------------------------------------------------------------------------- rescoring a checkpoint
def test_command_line_model_args_names_only_model_init_args() -> None:
    """The model arguments a command line sets, in both flag forms; other flags and nested keys are not."""
    from tvr_bench.cli import command_line_model_args

    argv = ["test", "--config", "x.yaml", "--model.init_args.pairing", "reference", "--model.eps_mode=pair",
            "--model.init_args.a.b", "1", "--model.class_path", "X", "--data.init_args.root", "r", "--ckpt_path", "c"]
    assert command_line_model_args(argv) == ["pairing", "eps_mode"]


@pytest.mark.slow
def test_test_with_ckpt_path_keeps_the_scoring_option_given_on_the_command_line(
    tiny_root: Path, cli_env: Path, capsys: pytest.CaptureFixture
) -> None:
    """`tvr-bench test --ckpt_path X --model.init_args.pairing reference` scores with the reference pairing
    (Lightning alone would put back the checkpoint's `query`); without the flag the checkpoint's value holds."""
    configs = ["recipes/base.yaml", "recipes/methods/tmass.yaml", "recipes/data/synthetic.yaml",
               "recipes/profiles/scratch.yaml"]  # the tiny set has no pretrained backbone
    tiny = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--model.init_args.trials", "2"]
    code, _, err = _run_cli(["fit", *_synthetic_cli(tiny_root, cli_env, *tiny, configs=configs)], capsys)
    assert code == 0, err[-2000:]
    (ckpt,) = sorted((cli_env / "run").rglob("*.ckpt"))
    for extra, pairing in (([], "query"), (["--model.init_args.pairing", "reference"], "reference")):
        argv = ["test", *_synthetic_cli(tiny_root, cli_env, "--ckpt_path", str(ckpt), *extra, configs=configs)]
        code, _, err = _run_cli(argv, capsys)
        assert code == 0, err[-2000:]
        (result,) = [json.loads(p.read_text()) for p in (cli_env / "runs" / "results").glob("tmass*.json")
                     if json.loads(p.read_text())["protocol"].get("pairing") == pairing]
        assert result["hparams"]["pairing"] == pairing and result["hparams"]["trials"] == 2
