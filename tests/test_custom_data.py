"""`tvr-bench prepare custom`: the user's own captioned videos (CSV or JSONL) as a benchmark
(data_cards/custom.md): several codecs, a missing, a corrupt and a repeated entry, the errors that name
file and line, the DataModule's name and validation check, and `make bench DATA=custom ROOT=...`."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tests.official_fixtures import corrupt, write_video
from tvr_bench.data.benchmarks.custom import CARD_FILE, CustomDataModule, default_video_id, read_annotations
from tvr_bench.data.benchmarks.msvd import MSVDDataModule
from tvr_bench.data.commands import prepare_main
from tvr_bench.data.shards import INDEX_FILE, MANIFEST_FILE, iter_shard, parse_sample, read_index

REPO = Path(__file__).resolve().parents[1]
#: (relative file, container, codec): several containers and codecs, as a user's folder holds them.
CLIPS = (
    ("kitchen/pasta.mp4", "mp4", "libx264"),
    ("kitchen/soup.webm", "webm", "libvpx"),
    ("garden/dog.avi", "avi", "mpeg4"),
    ("garden/cat.mkv", "matroska", "libx264"),
    ("street/bus.mov", "mov", "libx264"),
    ("street/tram.mp4", "mp4", "mpeg4"),
)


def make_videos(root: Path) -> Path:
    """Six short clips in five containers under ``root/videos``, one of them then truncated until it no
    longer decodes (``street/tram.mp4``)."""
    videos = root / "videos"
    for i, (rel, fmt, codec) in enumerate(CLIPS):
        write_video(videos / rel, fmt, codec, seconds=3.0, fps=4, seed=i)
    corrupt(videos / "street" / "tram.mp4", "50%")
    return videos


def write_csv(path: Path, rows: list[list[str]], header: tuple[str, ...] = ("video", "caption", "split")) -> Path:
    """A CSV annotation file with a header."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


ROWS = [
    ["kitchen/pasta.mp4", "someone cooks pasta, slowly", "train"],
    ["kitchen/pasta.mp4", "pasta boils in a pot", "train"],
    ["kitchen/soup.webm", "a bowl of soup", "train"],
    ["kitchen/soup.webm", "a bowl of soup", "train"],  # an exact repeat: kept once, reported
    ["dog", "a dog runs in the garden", "val"],  # a bare name: found as garden/dog.avi
    ["garden/cat.mkv", "a cat sleeps", "test"],
    ["garden/cat.mkv", "a cat on a cushion", "test"],
    ["street/bus.mov", "a red bus turns", "test"],
    ["street/tram.mp4", "a tram passes", "test"],  # undecodable
    ["street/missing.mp4", "nobody filmed this", "test"],  # absent
]


@pytest.fixture(scope="module")
def user_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real-codec clips plus a CSV of their captions."""
    root = tmp_path_factory.mktemp("custom")
    make_videos(root)
    write_csv(root / "captions.csv", ROWS)
    return root


@pytest.fixture(scope="module")
def prepared(user_data: Path) -> tuple[Path, str, str]:
    """`tvr-bench prepare custom` run once over the fixture: (out, stdout, warning text)."""
    out = user_data / "prepared"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import contextlib
        import io

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = prepare_main(["custom", "--videos", str(user_data / "videos"), "--annotations",
                                 str(user_data / "captions.csv"), "--out", str(out), "--workers", "1", "--no-progress"])
    assert code == 0
    return out, buffer.getvalue(), "\n".join(str(w.message) for w in caught)


def test_prepare_custom_reads_every_codec_and_reports_missing_corrupt_and_repeated(prepared: tuple[Path, str, str]) -> None:
    """Every decodable clip becomes a sample (3 s at 1 fps: 3 frames) with its captions in file order; the absent and the truncated
    file are listed in manifest.json with the reason; the repeated row is kept once and named by line."""
    out, stdout, warned = prepared
    samples = {}
    for split in ("train", "val", "test"):
        for entry in read_index(out / split)["shards"]:
            for raw in iter_shard(out / split / entry["file"]):
                meta, frames = parse_sample(raw)
                samples[meta["video_id"]] = (split, meta["captions"], len(frames), meta["source"]["file"])
    assert samples == {
        "kitchen/pasta": ("train", ["someone cooks pasta, slowly", "pasta boils in a pot"], 3, "kitchen/pasta.mp4"),
        "kitchen/soup": ("train", ["a bowl of soup"], 3, "kitchen/soup.webm"),
        "dog": ("val", ["a dog runs in the garden"], 3, "garden/dog.avi"),
        "garden/cat": ("test", ["a cat sleeps", "a cat on a cushion"], 3, "garden/cat.mkv"),
        "street/bus": ("test", ["a red bus turns"], 3, "street/bus.mov"),
    }
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    failures = {f["video_id"]: f["reason"] for f in manifest["failures"]}
    assert set(failures) == {"street/tram", "street/missing"}
    assert failures["street/missing"].startswith("missing:") and failures["street/tram"].startswith("decode error")
    assert "1 repeated row(s) kept once: line 5 repeats line 4 ('kitchen/soup': 'a bowl of soup')" in warned
    assert "test: 2 videos, 3 captions" in stdout and "2 videos missing or undecodable" in stdout


def test_prepare_custom_writes_a_data_card_with_the_counts_and_never_overwrites_it(prepared: tuple[Path, str, str]) -> None:
    """DATA_CARD.md beside the shards holds the prepared counts and the template's questions; a second
    prepare (resume) keeps the user's edits."""
    out, stdout, _ = prepared
    card = (out / CARD_FILE).read_text()
    assert "| `train` | 2 | 3 | 0 |" in card and "| `test` | 2 | 3 | 2 |" in card
    assert "[where they come from" in card and f"wrote {out / CARD_FILE}" in stdout
    (out / CARD_FILE).write_text("my card\n")
    args = ["custom", "--videos", str(out.parent / "videos"), "--annotations", str(out.parent / "captions.csv"),
            "--out", str(out), "--workers", "1", "--no-progress", "--resume"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert prepare_main(args) == 0
    assert (out / CARD_FILE).read_text() == "my card\n"


def test_jsonl_with_caption_lists_and_segments(tmp_path: Path) -> None:
    """JSONL rows may carry `captions` lists; `start`/`end` cut segments of one file, each with its video_id."""
    videos = tmp_path / "videos"
    write_video(videos / "long.mp4", "mp4", "libx264", seconds=6.0, fps=4, seed=3)
    rows = [
        {"video": "long.mp4", "video_id": "long_a", "start": 0, "end": 3, "captions": ["first half", "the start"], "split": "train"},
        {"video": "long.mp4", "video_id": "long_b", "start": 3, "end": 6, "caption": "second half", "split": "test"},
    ]
    ann = tmp_path / "ann.jsonl"
    ann.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    entries = read_annotations(ann)
    assert [(e.video_id, e.captions, e.start, e.end, e.lines) for e in entries] == [
        ("long_a", ["first half", "the start"], 0.0, 3.0, [1, 1]),
        ("long_b", ["second half"], 3.0, 6.0, [2]),
    ]
    out = tmp_path / "out"
    assert prepare_main(["custom", "--videos", str(videos), "--annotations", str(ann), "--out", str(out),
                         "--workers", "1", "--no-progress"]) == 0
    (raw,) = [r for e in read_index(out / "test")["shards"] for r in iter_shard(out / "test" / e["file"])]
    meta, _ = parse_sample(raw)
    assert meta["video_id"] == "long_b" and all(3.0 <= t <= 6.0 for t in meta["frame_times"])


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [
        ("video,text,split\na.mp4,hi,train\n", ".csv", "lacks the column(s) caption"),
        ("video,caption,split\na.mp4,hi,training\n", ".csv", ":2: split 'training' is not one of train, val, test"),
        ("video,caption,split\na.mp4,hi,train\na.mp4,there,test\n", ".csv", ":3: video 'a' is in split 'test' here and in 'train' at line 2"),
        ("video,caption,split\na.mp4,  ,train\n", ".csv", ":2: empty caption"),
        ("video,caption,split\na.mp4,one, two,train\n", ".csv", ":2: more fields than the header's 3"),
        ("video,caption,split,start,end\na.mp4,hi,train,5,2\n", ".csv", ":2: end 2.0 is not after start 5.0"),
        ('{"video": "a.mp4", "caption": "hi", "split": "train"}\n{"video": "b.mp4"\n', ".jsonl", ":2: not a JSON object"),
        ('{"video": "a.mp4", "split": "train"}\n', ".jsonl", ":1: no `caption` (or `captions`) field"),
        ("video,caption,split\n", ".csv", "no annotation rows"),
    ],
)
def test_bad_annotations_give_one_error_line_naming_file_and_line(
    tmp_path: Path, content: str, suffix: str, message: str, capsys: pytest.CaptureFixture
) -> None:
    """A malformed annotation file stops prepare (exit 1) with one `error:` line naming the file (and line)."""
    ann = tmp_path / f"ann{suffix}"
    ann.write_text(content)
    (tmp_path / "videos").mkdir()
    code = prepare_main(["custom", "--videos", str(tmp_path / "videos"), "--annotations", str(ann),
                         "--out", str(tmp_path / "out"), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert str(ann) in line and message in line and "data_cards/custom.md" in line
    assert not (tmp_path / "out" / "train" / INDEX_FILE).exists()


def test_video_ids_and_the_datamodule_name(prepared: tuple[Path, str, str], tmp_path: Path) -> None:
    """Ids are paths without a container extension; `name` labels results; a root without a val split
    stops with the two ways out."""
    assert default_video_id("kitchen/pasta.mp4") == "kitchen/pasta" and default_video_id("./a.b.c") == "a.b.c"
    out, _, _ = prepared
    dm = CustomDataModule(root=str(out), name="my-kitchen", num_workers=0, batch_size=2)
    assert dm.name == "my-kitchen" and dm.hparams["name"] == "my-kitchen" and dm.val_split == "val"
    dm.setup("fit")
    with pytest.raises(ValueError, match="data name must be"):
        CustomDataModule(root=str(out), name="my kitchen")
    with pytest.raises(ValueError, match="the msvd benchmark keeps its name"):
        MSVDDataModule(name="my-msvd")
    assert MSVDDataModule(name="msvd").name == "msvd" and CustomDataModule.protocol_size("test") is None
    no_val = tmp_path / "no-val"
    (no_val / "train").mkdir(parents=True)
    (no_val / "train" / INDEX_FILE).symlink_to(out / "train" / INDEX_FILE)
    with pytest.raises(FileNotFoundError, match="no 'val' split for model selection.*--data.init_args.val_split test"):
        CustomDataModule(root=str(no_val)).setup("fit")


@pytest.mark.slow
def test_make_bench_trains_and_tests_on_custom_data(prepared: tuple[Path, str, str], tmp_path: Path) -> None:
    """`make bench METHOD=clip4clip DATA=custom ROOT=...` fits and tests on the user's data (tiny CLIP) and
    writes a result named by the dataset."""
    out, _, _ = prepared
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_CACHE_DIR=str(tmp_path / "c"),
               WANDB_DATA_DIR=str(tmp_path / "d"), WANDB_CONFIG_DIR=str(tmp_path / "cfg"))
    args = ("--model.init_args.backbone tiny --data.init_args.image_size 64 --data.init_args.batch_size 2 "
            "--data.init_args.num_workers 0 --data.init_args.name my-clips --trainer.max_epochs 1 "
            f"--leaderboard.runs_dir {tmp_path / 'runs'}")
    done = subprocess.run(
        ["make", "-s", "-C", str(REPO), "bench", "METHOD=clip4clip", "DATA=custom", f"ROOT={out}", f"ARGS={args}",
         f"VENV={Path(sys.executable).parents[1]}"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "runs" / "results" / "clip4clip__my-clips__tiny__seed0.json").read_text())
    assert result["dataset"] == "my-clips" and result["protocol"]["test_videos"] == 2
