"""Shard format, key sanitising, the generic prepare (failures manifest, resume) and its CLI."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.data_fixtures import tiny_raw, tiny_root  # noqa: F401 - pytest fixtures
from tvr_bench.data import prepare as prepare_mod
from tvr_bench.data import synth
from tvr_bench.data.commands import prepare_main
from tvr_bench.data.prepare import PROGRESS_FILE, PrepareConfig, VideoRecord, prepare
from tvr_bench.data.shards import (
    ShardError,
    ShardFile,
    encode_sample,
    iter_shard,
    parse_sample,
    read_index,
    sanitize_key,
    verify_split,
)

TINY_CONFIG = PrepareConfig("synthetic", num_frames=12, sampling="segment_middle", short_side=64, jpeg_quality=90, shard_size=16)


def test_sanitize_key_keeps_clean_ids_and_fixes_dots() -> None:
    assert sanitize_key("video9770") == "video9770"
    assert sanitize_key("-4wsuPCjDBc_5_15") == "-4wsuPCjDBc_5_15"
    lsmdc = "1012_Unbreakable_00.05.16.065-00.05.21.941"
    key = sanitize_key(lsmdc)
    assert "." not in key and key.startswith("1012_Unbreakable_00_05_16_065-00_05_21_941_")
    assert key == sanitize_key(lsmdc)  # stable
    assert sanitize_key("a.b") != sanitize_key("a_b") == "a_b"
    assert "." not in sanitize_key("58792004@N06_8544469262_fd25eddb2e.")


def test_shard_round_trip_and_no_silent_overwrite(tmp_path: Path) -> None:
    final = tmp_path / "shard-00000.tar"
    writer = ShardFile(final)
    meta = {"video_id": "clip.1", "captions": ["a cat", "a dog"], "num_frames": 2}
    writer.write(encode_sample(sanitize_key("clip.1"), [b"\xff\xd8jpeg0", b"\xff\xd8jpeg1"], meta), 2)
    assert writer.tmp.exists() and not final.exists()
    info = writer.finish()
    assert final.exists() and not writer.tmp.exists() and info.num_samples == 1 and info.num_captions == 2
    (sample,) = list(iter_shard(final))
    assert sample["__key__"] == sanitize_key("clip.1")
    got, frames = parse_sample(sample)
    assert got == meta and frames == [b"\xff\xd8jpeg0", b"\xff\xd8jpeg1"]
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        ShardFile(final)
    with pytest.raises(ValueError, match="not sanitised"):
        encode_sample("a.b", [], meta)


@pytest.mark.parametrize(
    ("sample", "problem"),
    [
        ({"000.jpg": b"x"}, "no json member"),
        ({"json": b'{"captions": [], "num_frames": 1}', "000.jpg": b"x"}, "captions"),
        ({"json": b'{"captions": ["a"], "num_frames": 2}', "000.jpg": b"x"}, "frames missing"),
        ({"json": b'{"captions": ["a"], "num_frames": 1}'}, "no frame members"),
    ],
)
def test_parse_sample_errors_name_shard_and_key(sample: dict, problem: str) -> None:
    sample = {"__key__": "vid7", "__url__": "/data/x/shard-00003.tar", **sample}
    with pytest.raises(ShardError, match=problem) as info:
        parse_sample(sample)
    assert "shard-00003.tar" in str(info.value) and "vid7" in str(info.value)


def test_tiny_prepare_outputs(tiny_root: Path) -> None:
    manifest = json.loads((tiny_root / "manifest.json").read_text())
    assert manifest["num_failures"] == 0 and manifest["splits"]["train"]["num_samples"] == 48
    index = read_index(tiny_root / "train")
    assert index["num_samples"] == 48 and index["num_captions"] == 240 and len(index["shards"]) == 3
    assert all(len(s["sha256"]) == 64 for s in index["shards"])
    assert verify_split(tiny_root / "val") == []
    sample = next(iter_shard(tiny_root / "train" / "shard-00000.tar"))
    meta, frames = parse_sample(sample)
    assert len(frames) == 12 == meta["num_frames"] == len(meta["frame_times"])
    assert meta["sampling"]["policy"] == "segment_middle" and meta["source"] == {"dataset": "synthetic", "file": "train-00000.mp4"}
    assert meta["original"]["fps"] == 2.0 and meta["frame_size"] == [64, 64]
    assert set(sample) <= {"__key__", "__url__", "__local_path__", "json"} | {f"{i:03d}.jpg" for i in range(12)}


def _records_with_failures(tiny_raw: Path, videos: Path) -> list[VideoRecord]:
    """The tiny records pointing at a copy of the videos, one deleted and one corrupted."""
    shutil.copytree(tiny_raw / "videos", videos)
    (videos / "train-00003.mp4").unlink()
    (videos / "test-00001.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
    return list(synth.read_records(videos, tiny_raw))


def test_prepare_manifest_lists_missing_and_corrupt(tiny_raw: Path, tmp_path: Path) -> None:
    records = _records_with_failures(tiny_raw, tmp_path / "videos")
    report = prepare(records, tmp_path / "out", TINY_CONFIG, source_root=tmp_path / "videos", workers=2, progress=False)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    reasons = {f["video_id"]: f["reason"] for f in manifest["failures"]}
    assert set(reasons) == {"train-00003", "test-00001"}
    assert reasons["train-00003"].startswith("missing:") and reasons["test-00001"].startswith("decode error:")
    assert manifest["splits"]["train"] == {"num_samples": 47, "num_captions": 235, "num_shards": 3, "num_failed": 1}
    assert report.splits["test"]["num_samples"] == 15 and len(report.failures) == 2
    with pytest.raises(FileExistsError, match="--resume"):
        prepare(records, tmp_path / "out", TINY_CONFIG, progress=False)


def _shard_state(root: Path) -> dict[str, object]:
    """Everything a resumed run must reproduce: indexes, manifest and the shard bytes' hashes."""
    out: dict[str, object] = {"manifest": (root / "manifest.json").read_text()}
    for split in ("train", "val", "test"):
        out[split] = (root / split / "index.json").read_text()
        out[f"{split}-files"] = sorted(p.name for p in (root / split).iterdir())
    return out


def test_resume_after_interruption_reproduces_shards(tiny_raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = _records_with_failures(tiny_raw, tmp_path / "videos")
    full = prepare(records, tmp_path / "full", TINY_CONFIG, source_root=tmp_path / "videos", workers=1, progress=False)
    real = prepare_mod.convert_record
    calls = {"n": 0}

    def flaky(record: VideoRecord, config: PrepareConfig, source_root: Path | None = None) -> prepare_mod.ConvertResult:
        calls["n"] += 1
        if calls["n"] == 40:  # second train shard done, third half written
            raise KeyboardInterrupt
        return real(record, config, source_root)

    monkeypatch.setattr(prepare_mod, "convert_record", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare(records, tmp_path / "resumed", TINY_CONFIG, source_root=tmp_path / "videos", workers=1, progress=False)
    monkeypatch.setattr(prepare_mod, "convert_record", real)
    progress = json.loads((tmp_path / "resumed" / PROGRESS_FILE).read_text())
    assert [s["file"] for s in progress["splits"]["train"]["shards"]] == ["shard-00000.tar", "shard-00001.tar"]
    # a stale half-written shard as a hard kill would leave it
    (tmp_path / "resumed" / "train" / "shard-00002.tar.tmp").write_bytes(b"partial")
    report = prepare(records, tmp_path / "resumed", TINY_CONFIG, source_root=tmp_path / "videos", resume=True, progress=False)
    assert report.reused == 32 and report.converted == full.converted - 32
    assert _shard_state(tmp_path / "resumed") == _shard_state(tmp_path / "full")
    keys = [s["__key__"] for p in sorted((tmp_path / "resumed" / "train").glob("*.tar")) for s in iter_shard(p)]
    assert len(keys) == len(set(keys)) == 47


def test_generic_prepare_dotted_ids_segments_and_cli(tiny_raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    video = tiny_raw / "videos" / "train-00000.mp4"  # 13-15 s at 2 fps
    records = [
        VideoRecord("movie_00.05.16.065-00.05.21.941", video, ["one caption"], "test", start=2.0, end=7.0, meta={"m": 1}),
        VideoRecord("movie_00.05.16.065-00.05.21.941", video, ["second row of the same clip"], "test"),
        VideoRecord("plain", video, ["whole video"], "test"),
        VideoRecord("nocap", video, [], "test"),
    ]
    config = PrepareConfig("custom", num_frames=4, sampling="fps1_uniform", short_side=32, jpeg_quality=80, shard_size=10)
    report = prepare(records, tmp_path / "out", config, source_root=tiny_raw / "videos", progress=False)
    assert [(f["video_id"], f["reason"][:12]) for f in report.failures] == [("nocap", "no captions:")]
    samples = {s["__key__"]: parse_sample(s)[0] for s in iter_shard(tmp_path / "out" / "test" / "shard-00000.tar")}
    dotted = samples[sanitize_key("movie_00.05.16.065-00.05.21.941")]
    assert dotted["video_id"] == "movie_00.05.16.065-00.05.21.941"
    assert dotted["captions"] == ["one caption", "second row of the same clip"]
    assert dotted["frame_times"] == [2.0, 3.0, 4.0, 6.0] and dotted["segment"] == [2.0, 7.0]
    assert dotted["frame_size"] == [32, 32] and dotted["extra"] == {"m": 1}
    assert samples["plain"]["sampling"]["policy"] == "fps1_uniform" and samples["plain"]["num_frames"] == 4
    # the CLI path over the synthetic reader
    argv = ["synthetic", "--videos", str(tiny_raw / "videos"), "--annotations", str(tiny_raw), "--out", str(tmp_path / "cli"),
            "--frames", "6", "--shard-size", "40", "--workers", "1", "--no-progress"]
    assert prepare_main(argv) == 0
    assert "train: 48 videos, 240 captions, 2 shards, 0 failed" in capsys.readouterr().out
    assert read_index(tmp_path / "cli" / "val")["num_samples"] == 16
    assert prepare_main(argv) == 1  # refuses to overwrite without --resume/--overwrite
    assert prepare_main([*argv, "--resume"]) == 0


def test_read_tagged_json_names_the_file_and_the_problem(tmp_path: Path) -> None:
    """The search index's and the feature store's record reader: each problem is one error naming the file."""
    from tvr_bench.data.shards import read_tagged_json

    path = tmp_path / "record.json"
    cases = [("{not json", "unreadable JSON"), ('{"kind": "other", "format_version": 1}', "not a thing (kind 'other')"),
             ("[1, 2]", "not a thing (kind None)"), ('{"kind": "k", "format_version": 0}', "format_version 0 (this code reads 1)")]
    for text, message in cases:
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=re.escape(message)) as info:
            read_tagged_json(path, "k", 1, ValueError, "thing")
        assert str(path) in str(info.value)
    path.write_text('{"kind": "k", "format_version": 1, "x": 2}', encoding="utf-8")
    assert read_tagged_json(path, "k", 1, ValueError, "thing") == {"kind": "k", "format_version": 1, "x": 2}
