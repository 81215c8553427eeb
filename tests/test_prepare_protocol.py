"""`tvr-bench prepare` against the official protocols: prepared vs protocol size, the incomplete-test
exit, the other sampling's command, MSR-VTT's two official json files, and in-tar video reading."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pytest

from tests.official_fixtures import build_raw, expected, fixtures_dir
from tvr_bench.data.benchmarks.catalog import datamodules
from tvr_bench.data.benchmarks.common import AnnotationError
from tvr_bench.data.benchmarks.msrvtt import read_full_records, read_records
from tvr_bench.prepare_cli import prepare_main
from tvr_bench.data.shards import MANIFEST_FILE
from tvr_bench.data.video import TarMember, probe_video

REPO = Path(__file__).resolve().parents[1]
needs_fixtures = pytest.mark.skipif(
    not (fixtures_dir() / "expected.json").is_file(),
    reason=f"official-format fixtures not found at {fixtures_dir()} (set TVR_FIXTURES_DIR)",
)
pytestmark = pytest.mark.filterwarnings("ignore:sample .* stored frames:UserWarning")


def _argv(dataset: str, raw: Path, out: Path, *extra: str, annotations: Path | None = None) -> list[str]:
    """prepare_main arguments for a raw fixture dataset."""
    return [
        dataset,
        "--videos", str(raw / dataset / "videos"),
        "--annotations", str(annotations or raw / dataset / "annotations"),
        "--out", str(out), "--workers", "1", "--no-progress", *extra,
    ]


# ------------------------------------------------------------------------------- protocol sizes
@pytest.mark.parametrize("dataset", sorted(d for d, cls in datamodules().items() if cls.OFFICIAL))
def test_protocol_sizes_cover_the_test_split_and_are_in_the_card(dataset: str) -> None:
    """Every official benchmark fixes its test-split size with a source; the data card states the same figures
    (the user's own data, `custom`, has none: tests/test_custom_data.py)."""
    cls = datamodules()[dataset]
    size = cls.protocol_size(cls.TEST_SPLIT)
    assert isinstance(size, int) and size > 0
    assert cls.PROTOCOL_SOURCE
    assert cls.protocol_size("no-such-split") is None
    card = (REPO / "data_cards" / f"{dataset}.md").read_text()
    for split, n in cls.PROTOCOL_SIZES.items():
        assert f"{n:,}" in card, (split, n)
    assert "protocol size" in card.lower()


@needs_fixtures
def test_incomplete_test_split_exits_3_then_allow_incomplete(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Fewer test videos than the protocol: sizes printed per split, exit 3 with one error line naming the
    way out; `--resume --allow-incomplete` accepts the same shards without converting again."""
    raw = build_raw("charades", tmp_path / "raw")
    out = tmp_path / "charades"
    cls = datamodules()["charades"]
    assert prepare_main(_argv("charades", raw, out)) == 3
    captured = capsys.readouterr()
    exp = expected()["charades"]["splits"]
    for split, info in exp.items():
        line = next(l for l in captured.out.splitlines() if l.startswith(f"{split}: "))
        size = cls.protocol_size(split)
        assert f"{split}: {info['videos']} videos, " in line
        assert line.endswith(f"; protocol: {size:,} videos, INCOMPLETE ({info['videos']}/{size:,})"), line
    errors = [l for l in captured.err.splitlines() if l.startswith("error:")]
    assert len(errors) == 1
    want = f"{exp['test']['videos']} of the protocol's {cls.protocol_size('test'):,} videos"
    assert want in errors[0] and "--allow-incomplete" in errors[0] and "R@1" in errors[0]
    # the other methods' exact command (their recipes' sampling and frames), with the user's paths and
    # the root their DataModule reads
    other = [l for l in captured.out.splitlines() if l.startswith("for other methods: ")]
    assert len(other) == 1
    assert f"--sampling segment_middle --out {cls.default_root('segment_middle', 12)}" in other[0]
    assert f"--videos {raw / 'charades' / 'videos'}" in other[0] and "xpool" in other[0] and "tmass" in other[0]
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["protocol"]["splits"]["test"] == {"prepared": exp["test"]["videos"], "protocol": cls.protocol_size("test"), "complete": False}
    assert manifest["protocol"]["allow_incomplete"] is False

    assert prepare_main(_argv("charades", raw, out, "--resume", "--allow-incomplete")) == 0
    captured = capsys.readouterr()
    assert "0 converted" in captured.out and not captured.err.strip()
    assert json.loads((out / MANIFEST_FILE).read_text())["protocol"]["allow_incomplete"] is True


@needs_fixtures
def test_complete_test_split_exits_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The exit depends on the count only: with protocol sizes equal to what the fixture holds, exit 0."""
    raw = build_raw("charades", tmp_path / "raw")
    cls = datamodules()["charades"]
    sizes = {split: info["videos"] for split, info in expected()["charades"]["splits"].items()}
    monkeypatch.setattr(cls, "PROTOCOL_SIZES", sizes)
    assert prepare_main(_argv("charades", raw, tmp_path / "out")) == 0
    out = capsys.readouterr().out
    assert "INCOMPLETE" not in out and f"; protocol: {sizes['test']} videos, complete" in out
    # one video short of it: incomplete again
    monkeypatch.setattr(cls, "PROTOCOL_SIZES", {**sizes, "test": sizes["test"] + 1})
    assert prepare_main(_argv("charades", raw, tmp_path / "out", "--resume")) == 3


@pytest.mark.parametrize("dataset", ["didemo", "activitynet"])
def test_recipe_needs_name_every_method_shard_variant(dataset: str) -> None:
    """For the 64-frame benchmarks, the methods' recipes ask two shard variants: 64 fps1 frames (CLIP4Clip,
    DRL, MASCOT) and 12 segment_middle frames (X-Pool, T-MASS recipes); prepare names both."""
    from tvr_bench.prepare_cli import recipe_needs

    needs = recipe_needs(dataset)
    cls = datamodules()[dataset]
    by_method = {m: key for key, methods in needs.items() for m in methods}
    assert by_method["clip4clip"] == ("fps1_uniform", cls.NUM_FRAMES) == by_method["drl"]
    assert by_method["xpool"] == ("segment_middle", 12) == by_method["tmass"]


# ------------------------------------------------------------------ MSR-VTT official json files
def _official_msrvtt(raw: Path, target: Path, with_test: bool = True) -> Path:
    """The fixture's MSRVTT_data.json split the way the original release ships it: train_val_videodatainfo.json
    (train + validate videos and their sentences) and test_videodatainfo.json (test videos), plus the csvs."""
    source = raw / "msrvtt" / "annotations"
    data = json.loads((source / "MSRVTT_data.json").read_text())
    target.mkdir(parents=True, exist_ok=True)
    for csv_file in source.glob("*.csv"):
        (target / csv_file.name).write_bytes(csv_file.read_bytes())
    parts = {"train_val_videodatainfo.json": ("train", "validate"), "test_videodatainfo.json": ("test",)}
    for name, splits in parts.items():
        if name.startswith("test") and not with_test:
            continue
        videos = [v for v in data["videos"] if v["split"] in splits]
        ids = {v["video_id"] for v in videos}
        sentences = [s for s in data["sentences"] if s["video_id"] in ids]
        (target / name).write_text(json.dumps({"info": data.get("info", {}), "videos": videos, "sentences": sentences}))
    return target


@needs_fixtures
def test_msrvtt_official_json_files_are_merged(tmp_path: Path) -> None:
    """train_val_videodatainfo.json + test_videodatainfo.json give exactly the records of MSRVTT_data.json
    (1k-A and full split), so 9k-train videos from the official test file keep their captions."""
    raw = build_raw("msrvtt", tmp_path / "raw")
    official = _official_msrvtt(raw, tmp_path / "official")
    videos, bundle = raw / "msrvtt" / "videos", raw / "msrvtt" / "annotations"
    key = lambda records: [(r.split, r.video_id, r.captions) for r in records]  # noqa: E731
    assert key(read_records(videos, official)) == key(read_records(videos, bundle))
    assert key(read_full_records(videos, official)) == key(read_full_records(videos, bundle))
    # the trap: 9k-train videos whose json split is "test" get their 20 captions from the test file
    test_file_ids = {v["video_id"] for v in json.loads((official / "test_videodatainfo.json").read_text())["videos"]}
    nine_k = [r for r in read_records(videos, official) if r.split == "train_9k" and r.video_id in test_file_ids]
    assert nine_k and all(len(r.captions) == 20 for r in nine_k)
    full_test = [r for r in read_full_records(videos, official) if r.split == "test"]
    assert {r.video_id for r in full_test} == test_file_ids


@needs_fixtures
def test_msrvtt_official_json_prepare_and_missing_test_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """prepare from the official files yields the expected splits; without test_videodatainfo.json it stops
    (exit 1) naming the missing file instead of turning about 2,000 train_9k videos into "no captions"."""
    raw = build_raw("msrvtt", tmp_path / "raw")
    official = _official_msrvtt(raw, tmp_path / "official")
    out = tmp_path / "out"
    assert prepare_main(_argv("msrvtt", raw, out, "--allow-incomplete", annotations=official)) == 0
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    for split, info in expected()["msrvtt"]["splits"].items():
        assert manifest["splits"][split]["num_samples"] == info["videos"]
        assert manifest["splits"][split]["num_captions"] == info["texts"]
    assert not [f for f in manifest["failures"] if f["reason"].startswith("no captions")]

    partial = _official_msrvtt(raw, tmp_path / "partial", with_test=False)
    with pytest.raises(AnnotationError, match="test_videodatainfo.json"):
        list(read_records(raw / "msrvtt" / "videos", partial))
    capsys.readouterr()
    argv = _argv("msrvtt", raw, tmp_path / "full", annotations=partial)
    argv[0] = "msrvtt_full"
    assert prepare_main(argv) == 1
    err = capsys.readouterr().err
    assert "found train_val_videodatainfo.json but not test_videodatainfo.json" in err


# ---------------------------------------------------------------------------- in-tar video reading
@needs_fixtures
def test_tar_member_reads_in_place(tmp_path: Path) -> None:
    """A video inside an uncompressed tar is probed and read through a bounded view: same bytes, same info."""
    raw = build_raw("charades", tmp_path / "raw")
    video = sorted((raw / "charades" / "videos").glob("*.mp4"))[0]
    data = video.read_bytes()
    tar_path = tmp_path / "v.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, payload in (("000.json", b"{}"), ("001.mp4", data), ("001.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    with tarfile.open(tar_path) as tar:
        info = tar.getmember("001.mp4")
    member = TarMember(tar=tar_path, name="001.mp4", offset=info.offset_data, size=info.size)
    assert member.is_file() and str(member).endswith("v.tar:001.mp4")
    with member.open() as handle:
        assert handle.read() == data
        handle.seek(-10, 2)
        assert handle.read() == data[-10:] and handle.read() == b""
        handle.seek(5)
        assert handle.read(7) == data[5:12] and handle.tell() == 12
    assert probe_video(member) == probe_video(video)
    assert not TarMember(tar=tar_path, name="x", offset=info.offset_data, size=10**9).is_file()


def test_compressed_video2dataset_tar_is_refused(tmp_path: Path) -> None:
    """A gzip-compressed shard cannot be read in place: a clear error, not a silent copy."""
    from tvr_bench.data.benchmarks.video2dataset import index_videos

    shards = tmp_path / "v2d"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w:gz") as tar:
        info = tarfile.TarInfo("000.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(ValueError, match=re.escape("not an uncompressed tar")):
        index_videos(shards, progress=False)

