"""The seven real benchmarks end to end on official-format fixtures: prepare -> shards -> DataModule.

Annotations and the expected counts/texts come from ``$TVR_FIXTURES_DIR`` (default
``<repo>/../shared/fixtures/official``, see its EXPECTED.md); tiny videos are generated per test
session (tests/official_fixtures.py). Nothing expected is hard-coded here: every count, text, missing
and corrupt id is read from ``expected.json``.
"""

from __future__ import annotations

import io
import json
import math
import sys
import tarfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.official_fixtures import build_raw, expected, fixtures_dir, require_fixtures
from tvr_bench.data.benchmarks.catalog import datamodules, official_specs
from tvr_bench.data.benchmarks.common import VIDEO_EXTENSIONS, BenchmarkDataModule, paragraph_parts
from tvr_bench.data.commands import prepare_main
from tvr_bench.data.readers import get_reader
from tvr_bench.data.shards import INDEX_FILE, MANIFEST_FILE, iter_shard, parse_sample

REPO = Path(__file__).resolve().parents[1]
DATASETS = ("msrvtt", "didemo", "lsmdc", "activitynet", "msvd", "vatex", "charades")
#: The paragraph benchmarks: one text per video, the descriptions joined by " ".
PARAGRAPH = {"didemo", "activitynet"}

pytestmark = [
    pytest.mark.skipif(
        not (fixtures_dir() / "expected.json").is_file(),
        reason=f"official-format fixtures not found at {fixtures_dir()} (set TVR_FIXTURES_DIR)",
    ),
    # the fixture clips are 1-10 s long: fewer 1-fps frames than asked is expected (and checked)
    pytest.mark.filterwarnings("ignore:sample .* stored frames:UserWarning"),
]


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One scratch directory per module for raw fixtures and prepared shards."""
    return tmp_path_factory.mktemp("benchmarks")


@lru_cache(maxsize=None)
def _prepared(base: str, dataset: str, videos: str = "videos", annotations: str = "annotations", extra: tuple[str, ...] = ()) -> Path:
    """Build the raw fixture and run ``tvr-bench prepare`` once per (dataset, variant)."""
    raw = build_raw(dataset, Path(base) / "raw")
    out = Path(base) / "out" / f"{dataset}-{videos}-{annotations}{''.join(extra)}"
    argv = [
        dataset,
        "--videos", str(raw / dataset / videos),
        "--annotations", str(raw / dataset / annotations),
        "--out", str(out),
        "--workers", "1",
        "--no-progress",
        "--allow-incomplete",  # the fixtures hold a handful of each split's videos
        *extra,
    ]
    assert prepare_main(argv) == 0
    return out


def prepared(work: Path, dataset: str, **kw: Any) -> Path:
    """Prepared shards of a fixture dataset (cached per module scratch directory)."""
    require_fixtures()
    return _prepared(str(work), dataset, **kw)


def samples(root: Path, split: str) -> list[tuple[str, dict[str, Any], int]]:
    """(key, json metadata, stored frames) of every sample of a split, in shard order."""
    out = []
    for shard in sorted((root / split).glob("shard-*.tar")):
        for sample in iter_shard(shard):
            meta, frames = parse_sample(sample)
            out.append((sample["__key__"], meta, len(frames)))
    return out


def frame_bytes(root: Path, split: str) -> dict[str, list[bytes]]:
    """Every sample's stored JPEG frames (bytes), by key."""
    out = {}
    for shard in sorted((root / split).glob("shard-*.tar")):
        for sample in iter_shard(shard):
            out[sample["__key__"]] = [v for k, v in sorted(sample.items()) if k.endswith(".jpg")]
    return out


def datamodule(dataset: str, root: Path, **kw: Any) -> BenchmarkDataModule:
    """The benchmark's DataModule over ``root``, small and in-process for tests."""
    args: dict[str, Any] = dict(root=str(root), image_size=32, batch_size=2, eval_batch_size=3, num_workers=0)
    args.update(kw)
    return datamodules()[dataset](**args)


def eval_texts(dm: BenchmarkDataModule, split: str) -> tuple[dict[str, list[str]], dict[str, tuple[int, int]]]:
    """Stream a split: texts per video key (eval order) and (real frames, slots) per video key."""
    texts: dict[str, list[str]] = {}
    masks: dict[str, tuple[int, int]] = {}
    for batch in dm.eval_dataloader(split):
        frames, mask = batch["frames"], batch["frame_mask"]
        assert frames.shape[:2] == mask.shape and frames.shape[2:] == (3, dm.image_size, dm.image_size)
        for v, key in enumerate(batch["video_key"]):
            assert key not in texts, f"{key} yielded twice"
            texts[key] = [c for c, i in zip(batch["captions"], batch["caption_video"].tolist()) if i == v]
            n = int(mask[v].sum())
            assert mask[v, :n].all() and not mask[v, n:].any(), "real frames must come first"
            assert torch.count_nonzero(frames[v, n:]) == 0, "padded frames must be zeros"
            masks[key] = (n, mask.shape[1])
        assert batch["caption_video"].tolist() == sorted(batch["caption_video"].tolist())
    return texts, masks


def expected_splits(dataset: str) -> dict[str, dict[str, Any]]:
    """expected.json's splits of a dataset."""
    return expected()[dataset]["splits"]


def bad_ids(dataset: str, kind: str) -> dict[str, list[str]]:
    """Missing or corrupt video id -> the splits it belongs to."""
    return {entry["video_id"]: entry["splits"] for entry in expected()[dataset][kind]}


# ------------------------------------------------------------------------- prepare + manifest
@pytest.mark.parametrize("dataset", DATASETS)
def test_prepare_counts_and_manifest(work: Path, dataset: str) -> None:
    """Every split has the expected videos; missing and corrupt videos are reported, never dropped silently."""
    root = prepared(work, dataset)
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    for split, exp in expected_splits(dataset).items():
        index = json.loads((root / split / INDEX_FILE).read_text())
        assert index["num_samples"] == exp["videos"], split
        assert sorted(meta["video_id"] for _, meta, _ in samples(root, split)) == sorted(exp["video_ids"]), split
        assert manifest["splits"][split]["num_samples"] == exp["videos"]
    failures = {(f["video_id"], f["split"]): f["reason"] for f in manifest["failures"]}
    wanted = {(vid, split): kind for kind in ("missing", "corrupt") for vid, splits in bad_ids(dataset, kind).items() for split in splits}
    assert set(failures) == set(wanted)
    for key, kind in wanted.items():
        assert failures[key].startswith("missing" if kind == "missing" else "decode error"), failures[key]
    assert manifest["num_failures"] == len(wanted)


@pytest.mark.parametrize("dataset", DATASETS)
def test_datamodule_texts_grouping_frames(work: Path, dataset: str) -> None:
    """Streaming every split through the benchmark DataModule gives exactly the expected texts per video."""
    root = prepared(work, dataset)
    dm = datamodule(dataset, root)
    assert dm.caption_mode == ("paragraph" if dataset in PARAGRAPH else "each")
    for split, exp in expected_splits(dataset).items():
        id_of = {key: meta["video_id"] for key, meta, _ in samples(root, split)}
        stored = {key: n for key, _, n in samples(root, split)}
        texts, masks = eval_texts(dm, split)
        assert len(texts) == exp["videos"] == dm.eval_size(split)[0]
        assert sum(len(t) for t in texts.values()) == exp["texts"] == dm.eval_size(split)[1]
        by_id = {id_of[key]: t for key, t in texts.items()}
        assert set(by_id) == set(exp["video_ids"])
        for vid, want in exp["texts_by_video"].items():
            assert by_id[vid] == want, f"{split}/{vid}"
        for key, (real, slots) in masks.items():
            assert slots == dm.num_frames and real == min(stored[key], dm.num_frames)


@pytest.mark.parametrize("dataset", DATASETS)
def test_sample_metadata_keys_and_frames(work: Path, dataset: str) -> None:
    """Keys are sanitised and unique, ids and file names kept, frames sampled as recorded, never invented."""
    root = prepared(work, dataset)
    spec = official_specs()[dataset]
    sanitised = {entry["video_id"] for entry in expected()[dataset]["sanitised_keys"]}
    for split in expected_splits(dataset):
        keys = set()
        for key, meta, n in samples(root, split):
            assert "." not in key and key not in keys
            keys.add(key)
            vid = meta["video_id"]
            assert (key == vid) == (vid not in sanitised)
            assert meta["split"] == split and meta["dataset"] == dataset
            assert (work / "raw" / dataset / "videos" / meta["source"]["file"]).is_file()
            assert meta["sampling"]["policy"] == spec.sampling and meta["sampling"]["max_frames"] == spec.num_frames
            assert n == meta["num_frames"] == len(meta["frame_times"]) <= spec.num_frames
            times = meta["frame_times"]
            assert times == sorted(times) and times[-1] < meta["original"]["duration"] + 1e-6
            if meta["segment"] is not None:
                start, end = meta["segment"]
                assert times[0] >= start and (end is None or times[-1] < end)
            if n < spec.num_frames:
                # fps1_uniform kept every whole second of the decoded file (or of its window)
                assert abs(n - min(meta["original"]["duration"], (meta["segment"] or [0, math.inf])[1])) <= 1
                assert all(abs(b - a - 1.0) < 0.3 for a, b in zip(times, times[1:]))


def test_didemo_window_licence_and_aws_naming(work: Path) -> None:
    """DiDeMo: frames only from the [0, 31] s window, per-video licence, AWS `<name>.mp4` files resolve."""
    root = prepared(work, "didemo")
    licences = expected()["didemo"]["licenses"]
    for split in expected_splits("didemo"):
        for _, meta, n in samples(root, split):
            assert meta["original"]["duration"] > 32 and n == 32  # whole seconds 0..31
            assert max(meta["frame_times"]) <= 31.0 + 1e-6
            assert meta["extra"]["license"] == licences[meta["video_id"]]
    aws = prepared(work, "didemo", videos="videos_aws")
    for split, exp in expected_splits("didemo").items():
        assert sorted(meta["video_id"] for _, meta, _ in samples(aws, split)) == sorted(exp["video_ids"])
    for split, exp in expected_splits("didemo").items():
        if split == "test":
            excluded = {e["video_id"] for e in expected()["didemo"]["excluded_by_split_list"]}
            assert not excluded & {meta["video_id"] for _, meta, _ in samples(root, split)}


@pytest.mark.parametrize("dataset", sorted(PARAGRAPH))
def test_paragraphs_exact(work: Path, dataset: str) -> None:
    """Paragraphs equal the reference `" ".join(...)` byte for byte (spacing and newlines kept)."""
    root = prepared(work, dataset)
    dm = datamodule(dataset, root)
    texts, _ = eval_texts(dm, "test")
    id_of = {key: meta["video_id"] for key, meta, _ in samples(root, "test")}
    by_id = {id_of[k]: t for k, t in texts.items()}
    for vid, paragraph in expected()[dataset]["exact_paragraphs"].items():
        assert by_id[vid] == [paragraph]


def test_paragraph_parts_keep_the_join() -> None:
    """Empty sentences are folded so the join is unchanged and every caption is non-empty."""
    for sentences in (["a", "", "b"], ["", "a", " b "], ["a", "", ""], ["a"], ["", ""], [" ", "a", "  ", "b", "\n"], ["\n", " "]):
        parts = paragraph_parts(sentences)
        assert all(p.strip() for p in parts)
        if any(s.strip() for s in sentences):
            assert " ".join(parts) == " ".join(sentences)
        else:
            assert parts == []


@pytest.mark.parametrize("dataset,variant", [("msvd", "annotations_xpool"), ("msvd", "annotations_corpus"), ("vatex", "annotations_hgr")])
def test_annotation_variants_read_the_same(work: Path, dataset: str, variant: str) -> None:
    """Other official annotation forms give the same videos and caption counts (and texts where identical)."""
    raw = build_raw(dataset, work / "raw")
    records = list(get_reader(dataset).read(raw / dataset / "videos", raw / dataset / variant))
    main = list(get_reader(dataset).read(raw / dataset / "videos", raw / dataset / "annotations"))
    assert [(r.split, r.video_id, len(r.captions)) for r in records] == [(r.split, r.video_id, len(r.captions)) for r in main]
    corpus = expected()[dataset].get("splits_corpus_form") if variant == "annotations_corpus" else None
    for record in records:
        splits = corpus or expected_splits(dataset)
        want = splits[record.split]["texts_by_video"].get(record.video_id)
        if want is not None:
            assert record.captions == want
    assert all(r.path.parent.name == "videos" for r in records)


def test_multi_caption_training_epoch_and_batches(work: Path) -> None:
    """Training draws every caption of the multi-caption train split once per epoch (all pairs)."""
    root = prepared(work, "msrvtt")
    dm = datamodule("msrvtt", root, batch_size=4)
    assert dm.train_split == "train_9k" and dm.val_split == "test" and dm.train_captions == "all"
    exp = expected_splits("msrvtt")["train_9k"]
    assert dm.train_batches_per_epoch() == exp["texts"] // 4
    batch = next(iter(dm.train_dataloader()))
    assert batch["frames"].shape == (4, 12, 3, 32, 32) and len(batch["captions"]) == 4
    seven = datamodule("msrvtt", root, train_split="train_7k")
    assert seven.split_shards("train_7k").num_captions == expected_splits("msrvtt")["train_7k"]["texts"]


def test_segment_middle_sampling_and_mismatch_error(work: Path) -> None:
    """--sampling/--frames reach the shards and metadata; a DataModule asking for other shards refuses."""
    root = prepared(work, "charades", extra=("--sampling", "segment_middle", "--frames", "4"))
    for _, meta, n in samples(root, "test"):
        assert meta["sampling"]["policy"] == "segment_middle" and n == 4
    dm = datamodule("charades", root, sampling="segment_middle", num_frames=4)
    texts, masks = eval_texts(dm, "test")
    assert all(real == 4 for real, _ in masks.values())
    with pytest.raises(ValueError, match="prepared with sampling 'segment_middle'"):
        datamodule("charades", root, sampling="fps1_uniform", num_frames=4).setup("test")
    with pytest.raises(ValueError, match="holds 'charades' shards"):
        datamodule("msvd", root, num_frames=4).setup("test")


def test_video2dataset_source(work: Path) -> None:
    """video2dataset shards (mp4 + txt + json per sample, numeric keys) are a valid video source."""
    dataset = "vatex"
    raw = build_raw(dataset, work / "raw")
    v2d = work / "v2d" / dataset
    v2d.mkdir(parents=True, exist_ok=True)
    videos = sorted(p for p in (raw / dataset / "videos").iterdir() if p.suffix in (".mp4", ".webm"))
    with tarfile.open(v2d / "00000.tar", "w") as tar:
        for i, path in enumerate(videos):
            key = f"{i:09d}"
            vid = path.name.rsplit(".", 1)[0]
            meta = {"key": key, "status": "success", "url": f"https://www.youtube.com/watch?v={vid[:11]}", "video_id": vid}
            for ext, data in ((path.suffix[1:], path.read_bytes()), ("txt", b"caption"), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        failed = tarfile.TarInfo(f"{len(videos):09d}.json")
        payload = json.dumps({"status": "failed_to_download", "url": "https://www.youtube.com/watch?v=x"}).encode()
        failed.size = len(payload)
        tar.addfile(failed, io.BytesIO(payload))
    out = work / "out" / "vatex-v2d"
    argv = [dataset, "--videos", str(v2d), "--annotations", str(raw / dataset / "annotations"), "--out", str(out), "--workers", "1", "--no-progress", "--source", "video2dataset", "--allow-incomplete"]
    assert prepare_main(argv) == 0
    for split, exp in expected_splits(dataset).items():
        assert sorted(meta["video_id"] for _, meta, _ in samples(out, split)) == sorted(exp["video_ids"])
    index = json.loads((out / "video2dataset_index.json").read_text())
    assert len(index["videos"]) == len(videos) and len(index["skipped"]) == 1
    # read in place: no video file was written anywhere (neither beside the shards nor under --out)
    written = [p for p in [*out.rglob("*"), *v2d.rglob("*")] if p.suffix.lstrip(".").lower() in VIDEO_EXTENSIONS]
    assert written == []
    # the frames are those the same videos give as plain files, and the source names the tar member
    files = prepared(work, dataset)
    for split in expected_splits(dataset):
        from_files = {key: (meta["frame_indices"], meta["captions"]) for key, meta, _ in samples(files, split)}
        from_tars = {key: (meta["frame_indices"], meta["captions"]) for key, meta, _ in samples(out, split)}
        assert from_tars == from_files
        for _, meta, _ in samples(out, split):
            tar_name, _, member = meta["source"]["file"].partition(":")
            assert tar_name == "00000.tar" and member == index["videos"][meta["video_id"]]["member"]
        assert frame_bytes(out, split) == frame_bytes(files, split)


# --------------------------------------------------------------- DataModules, recipes, cards
@pytest.mark.parametrize("dataset", [*DATASETS, "msrvtt_full"])
def test_missing_shards_error_points_to_data_card(tmp_path: Path, dataset: str) -> None:
    """Without prepared shards the DataModule names the directory and the data card, which exists."""
    dm = datamodules()[dataset](root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=rf"data_cards/{dataset}\.md"):
        dm.setup("fit")
    assert (REPO / "data_cards" / f"{dataset}.md").is_file()


@pytest.mark.parametrize("dataset", [*DATASETS, "msrvtt_full"])
def test_recipe_and_card(dataset: str) -> None:
    """recipes/data/<d>.yaml uses the benchmark DataModule, a pretrained CLIP at 224 px, no lr overrides;
    the data card documents the exact prepare command."""
    recipe = yaml.safe_load((REPO / "recipes" / "data" / f"{dataset}.yaml").read_text())
    cls = datamodules()[dataset]
    assert recipe["data"]["class_path"] == f"{cls.__module__}.{cls.__name__}"
    init = recipe["data"]["init_args"]
    assert init["image_size"] == 224 and init.get("num_frames", cls.NUM_FRAMES) == cls.NUM_FRAMES
    model = recipe["model"]["init_args"]
    assert model["backbone"].startswith("openai/clip-vit-")
    assert not {"lr", "backbone_lr", "freeze"} & set(model)
    assert model.get("max_words") == (64 if dataset in PARAGRAPH else None)  # else the method's own
    card = (REPO / "data_cards" / f"{dataset}.md").read_text()
    # the exact command the CLI names (tests/test_cli_protocol.py checks every method's sampling)
    assert cls.prepare_command() in card, cls.prepare_command()
    assert get_reader(dataset).num_frames == cls.NUM_FRAMES
    dm = cls(**init)
    assert dm.image_size == 224 and dm.caption_mode == cls.CAPTION_MODE


@pytest.mark.parametrize("dataset", [*DATASETS, "msrvtt_full"])
def test_cli_accepts_every_dataset_recipe(dataset: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make bench DATA=<d>`'s config stack (base + method + data recipe) parses for every benchmark."""
    from tvr_bench.cli import cli_main

    monkeypatch.setattr(sys, "argv", ["tvr-bench"])
    configs = ["recipes/base.yaml", "recipes/methods/clip4clip.yaml", f"recipes/data/{dataset}.yaml"]
    with pytest.raises(SystemExit) as done:
        cli_main(["fit", *[a for c in configs for a in ("--config", str(REPO / c))], "--print_config"])
    assert done.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    cls = datamodules()[dataset]
    assert config["data"]["class_path"] == f"{cls.__module__}.{cls.__name__}"
    assert config["model"]["init_args"]["max_words"] == (64 if dataset in PARAGRAPH else 32)
    dm = cls(**{k: v for k, v in config["data"]["init_args"].items()})
    assert dm.num_frames == cls.NUM_FRAMES and dm.root == cls.default_root()


def test_bench_without_shards_points_to_data_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """`tvr-bench bench` on a benchmark that was never prepared stops (exit code 3, no traceback) with the data card in the message."""
    from tvr_bench.cli import EXIT_DATA, cli_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["tvr-bench"])
    configs = ["recipes/base.yaml", "recipes/methods/clip4clip.yaml", "recipes/data/lsmdc.yaml"]
    argv = ["bench", *[a for c in configs for a in ("--config", str(REPO / c))], "--model.init_args.backbone", "tiny"]
    with pytest.raises(SystemExit) as done:
        cli_main(argv)
    assert done.value.code == EXIT_DATA
    err = capsys.readouterr().err
    assert "the lsmdc shards are not prepared: 'data/lsmdc' does not exist" in err and "data_cards/lsmdc.md" in err
    assert f"`{datamodules()['lsmdc'].prepare_command('fps1_uniform', 12)}`" in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1 and "Traceback" not in err


def test_video2dataset_id_rules() -> None:
    """A video2dataset sample's id: a saved id column first, then a local file name, then a YouTube id."""
    from tvr_bench.data.benchmarks.video2dataset import video_id_of

    assert video_id_of({"videoID": "-PCVHF3Kp3M_000169_000179", "url": "https://www.youtube.com/watch?v=x"}) == "-PCVHF3Kp3M_000169_000179"
    assert video_id_of({"url": "/data/MSRVTT/videos/all/video7020.mp4"}) == "video7020"
    assert video_id_of({"url": "file:///d/45755571@N00_4335657123_2de0c09653.avi"}) == "45755571@N00_4335657123_2de0c09653"
    assert video_id_of({"url": "https://www.youtube.com/watch?v=uqiMw7tQ1Cc&t=3"}) == "uqiMw7tQ1Cc"
    assert video_id_of({"url": "https://youtu.be/uqiMw7tQ1Cc"}) == "uqiMw7tQ1Cc"
    assert video_id_of({"status": "failed_to_download"}) is None


def test_listed_video_without_text_is_reported(work: Path) -> None:
    """A listed video whose annotation has no text is a manifest failure ("no captions"), not a silent drop."""
    import csv

    raw = build_raw("charades", work / "raw")
    annotations = work / "charades-blank"
    annotations.mkdir(exist_ok=True)
    victim = expected_splits("charades")["test"]["video_ids"][0]
    for path in (raw / "charades" / "annotations").glob("*.csv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            if row["id"] == victim:
                row["descriptions"] = "  "
        with open(annotations / path.name, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    out = work / "out" / "charades-blank"
    argv = ["charades", "--videos", str(raw / "charades" / "videos"), "--annotations", str(annotations), "--out", str(out), "--workers", "1", "--no-progress", "--allow-incomplete"]
    assert prepare_main(argv) == 0
    failures = {f["video_id"]: f["reason"] for f in json.loads((out / MANIFEST_FILE).read_text())["failures"]}
    assert failures[victim].startswith("no captions")
    assert victim not in {meta["video_id"] for _, meta, _ in samples(out, "test")}
