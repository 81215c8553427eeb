"""The procedural synthetic benchmark: determinism, caption structure, CLI and SyntheticDataModule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

from tests.data_fixtures import tiny_raw, tiny_root  # noqa: F401 - pytest fixtures
from tvr_bench.data import synth
from tvr_bench.data.benchmarks.synthetic import SyntheticDataModule, default_root
from tvr_bench.data.commands import synth_main


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_specs_depend_only_on_seed() -> None:
    a, b, c = synth.make_specs("tiny", 0), synth.make_specs("tiny", 0), synth.make_specs("tiny", 1)
    assert a == b and a != c
    assert [s.split for s in a].count("train") == 48 and len(a) == 80
    assert np.array_equal(synth.render(a[0]), synth.render(b[0]))


def test_generation_and_prepare_are_deterministic(tiny_raw: Path, tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    raw = tmp_path / "again" / "raw"
    assert synth_main(["--size", "tiny", "--out", str(raw), "--seed", "0", "--workers", "2", "--no-progress"]) == 0
    assert "tvr-bench prepare synthetic" in capsys.readouterr().out
    assert (raw / "annotations.json").read_text() == (tiny_raw / "annotations.json").read_text()
    for name in ("train-00000.mp4", "val-00007.mp4", "test-00015.mp4"):
        assert np.array_equal(_decode(raw / "videos" / name), _decode(tiny_raw / "videos" / name))
    # SyntheticDataModule.prepare_data finds the raw set and runs the same prepare: identical shards
    dm = SyntheticDataModule(size="tiny", root=str(tmp_path / "again"), num_workers=0)
    dm.prepare_data()
    for split in ("train", "val", "test"):
        assert (tmp_path / "again" / split / "index.json").read_text() == (tiny_root / split / "index.json").read_text()


def test_videos_show_two_events_with_compositional_captions(tiny_raw: Path) -> None:
    data = json.loads((tiny_raw / "annotations.json").read_text())
    assert data["fps"] == synth.FPS and data["frame_size"] == 64
    for video in data["videos"]:
        e1, e2 = video["events"]
        assert e2["start_frame"] == e1["num_frames"] and video["num_frames"] == e1["num_frames"] + e2["num_frames"]
        assert [i["type"] for i in video["caption_info"]] == list(synth.CAPTION_TYPES)
        assert len(video["captions"]) == 5 and len(set(video["captions"])) == 5
        full, first, second, order, objects = video["captions"]
        assert f"{e1['colour']} {e1['shape']}" in first and f"{e2['colour']} {e2['shape']}" in second
        assert f"{e1['colour']} {e1['shape']}" in full and f"{e2['colour']} {e2['shape']}" in full
        assert not any(m in objects for phrases in synth.MOTIONS.values() for m in phrases)
        for info in video["caption_info"]:
            assert synth.consistent(info, video)
    frames = _decode(tiny_raw / "videos" / "train-00000.mp4")
    assert frames.shape == (data["videos"][0]["num_frames"], 64, 64, 3)


def test_stats_give_chance_and_oracle_levels(tiny_raw: Path) -> None:
    stats = json.loads((tiny_raw / "annotations.json").read_text())["stats"]
    assert stats["test"]["videos"] == 16 and stats["test"]["captions"] == 80
    assert stats["test"]["chance_t2v_R@1"] == pytest.approx(100 / 16)
    assert stats["test"]["chance_t2v_R@1"] < stats["test"]["oracle_t2v_R@1"] <= 100


def test_synthetic_datamodule_uses_prepared_root(tiny_root: Path) -> None:
    assert default_root("tiny") == "data/synthetic-tiny" and default_root("default", 3) == "data/synthetic-default-seed3"
    assert SyntheticDataModule(size="tiny").root == "data/synthetic-tiny"
    dm = SyntheticDataModule(size="tiny", root=str(tiny_root), batch_size=4, num_workers=0)
    dm.prepare_data()  # complete already: a no-op
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["frames"].shape == (4, 12, 3, 64, 64)
    assert dm.hparams["size"] == "tiny" and dm.eval_size("test") == (16, 80)
    with pytest.raises(ValueError, match="size"):
        SyntheticDataModule(size="huge")  # type: ignore[arg-type]


def test_prepare_data_resumes_an_interrupted_build(tiny_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "partial"
    shutil.copytree(tiny_root, root)
    (root / "manifest.json").unlink()
    (root / "test" / "shard-00000.tar").rename(root / "test" / "shard-00000.tar.tmp")
    progress = json.loads((root / "prepare_progress.json").read_text())
    progress["splits"]["test"] = {"complete": False, "shards": [], "tail_failures": []}
    (root / "prepare_progress.json").write_text(json.dumps(progress))
    SyntheticDataModule(size="tiny", root=str(root)).prepare_data()
    assert (root / "manifest.json").read_text() == (tiny_root / "manifest.json").read_text()
    assert (root / "test" / "index.json").read_text() == (tiny_root / "test" / "index.json").read_text()
    assert not (root / "test" / "shard-00000.tar.tmp").exists()


def test_prepare_data_rebuilds_a_set_from_an_older_generator(tiny_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "stale"
    shutil.copytree(tiny_root, root)
    annotation = root / "raw" / "annotations.json"
    old = json.loads(annotation.read_text())
    old["generator_version"] = synth.GENERATOR_VERSION - 1
    annotation.write_text(json.dumps(old))
    (root / "raw" / "videos" / "train-00001.mp4").write_bytes(b"old encoder output")
    SyntheticDataModule(size="tiny", root=str(root)).prepare_data()
    assert annotation.read_text() == (tiny_root / "raw" / "annotations.json").read_text()
    for split in ("train", "val", "test"):
        assert (root / split / "index.json").read_text() == (tiny_root / split / "index.json").read_text()
