"""Search your own videos (issue 20): `tvr-bench index` / `tvr-bench search`, the two-tower declaration of every
method, the two-stage loss, resumable indexing, fingerprints and real video files of several codecs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.data_fixtures import tiny_raw, tiny_root  # noqa: F401 - session fixtures
from tvr_bench.cli import main
from tvr_bench.recipes import method_class, method_model_config, method_recipes

METHODS = method_recipes()


def make_checkpoint(path: Path, method: str, seed: int = 0, root: Path | None = None, **overrides) -> Path:
    """A checkpoint file in the Lightning layout `tvr-bench fit` writes (hyper-parameters with the class path, state
    dict, data config), of the method's recipe on the tiny preset with random weights drawn from `seed`."""
    config = method_model_config(method)
    args = {**config["init_args"], "backbone": "tiny", **overrides}
    torch.manual_seed(seed)
    model = method_class(method)(**args)
    payload = {
        "hyper_parameters": {"_class_path": config["class_path"], **dict(model.hparams)},
        "state_dict": model.state_dict(),
        "datamodule_hyper_parameters": {"_class_path": "tvr_bench.data.benchmarks.synthetic.SyntheticDataModule",
                                        "num_frames": 12, "image_size": 64, "root": str(root) if root else None},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def random_inputs(model, n_video: int = 5, n_text: int = 4, seed: int = 0):
    """Text and video features of random frames (one padded frame) and short captions."""
    g = torch.Generator().manual_seed(seed)
    frames = torch.randn(n_video, 12, 3, 64, 64, generator=g)
    mask = torch.ones(n_video, 12, dtype=torch.bool)
    mask[0, 9:] = False
    captions = ["a red circle moves left", "two squares", "a blue triangle then a circle", "nothing"][:n_text]
    with torch.no_grad():
        text = model.encode_text(**model.tokenize(captions))
        video = model.encode_video(frames, mask)
    return text, video


# ------------------------------------------------------------------------------------------ declarations
@pytest.mark.parametrize("method", METHODS)
def test_search_declaration_holds(method: str) -> None:
    """Every method's SEARCH_SCORING is true to its scores: `two_tower` scores are the inner products of its search
    vectors; `rerank` methods give unit first-stage vectors, and their score of any video subset is that block."""
    config = method_model_config(method)
    torch.manual_seed(0)
    model = method_class(method)(**{**config["init_args"], "backbone": "tiny"}).eval()
    assert model.SEARCH_SCORING in ("two_tower", "rerank")
    text, video = random_inputs(model)
    video = {**video, "index": torch.arange(5)}
    text = {**text, "index": torch.arange(4)}
    with torch.no_grad():
        sim = model.similarity(text, video)
        q, g = model.search_vectors(text, "text"), model.search_vectors(video, "video")
        assert q.shape == (4, model.backbone.embed_dim) and g.shape == (5, model.backbone.embed_dim)
        if model.SEARCH_SCORING == "two_tower":
            torch.testing.assert_close(q @ g.T, sim, atol=1e-6, rtol=0)
        else:
            torch.testing.assert_close(q.norm(dim=-1), torch.ones(4), atol=1e-5, rtol=0)
            torch.testing.assert_close(g.norm(dim=-1), torch.ones(5), atol=1e-5, rtol=0)
            rows = torch.tensor([1, 3, 4])
            part = model.similarity(text, {k: v[rows] for k, v in video.items()})
            torch.testing.assert_close(part, sim[:, rows], atol=1e-6, rtol=0)
    assert model.search_refusal() is None


@pytest.mark.parametrize("method, option, words", [("tmass", {"pairing": "reference"}, "pairing='query'"),
                                                     ("emcl", {"grouping": "reference"}, "evaluation blocks")])
def test_options_whose_scores_need_other_items_are_refused(method: str, option: dict, words: str, tmp_path: Path,
                                                           tiny_raw: Path) -> None:
    """A configuration whose score of a pair depends on other items (T-MASS's reference pairing needs each candidate's
    own captions; EMCL's reference grouping runs its EM over an evaluation block) cannot be indexed: one clear error."""
    from tvr_bench.search import build_index
    from tvr_bench.search.model import SearchSetupError

    if method not in METHODS:
        pytest.skip(f"{method} is not a built-in method here")
    ckpt = make_checkpoint(tmp_path / "m.ckpt", method, **option)
    with pytest.raises(SearchSetupError, match=words):
        build_index(tiny_raw / "videos", ckpt, tmp_path / "idx", progress=False)
    assert not (tmp_path / "idx").exists() and not (tmp_path / "idx.partial").exists()


# ------------------------------------------------------------------------------------------ two-stage loss
def test_two_stage_loss_on_a_known_matrix() -> None:
    """Candidates are the first stage's top K; a correct video outside them is a miss; K >= V changes nothing."""
    from tvr_bench.search.twostage import two_stage_loss, two_stage_scores

    sim = torch.tensor([[0.9, 0.1, 0.2, 0.3], [0.1, 0.8, 0.7, 0.0], [0.2, 0.3, 0.1, 0.5]])
    first = torch.tensor([[0.1, 0.9, 0.8, 0.7], [0.0, 0.9, 0.8, 0.1], [0.9, 0.1, 0.2, 0.8]])
    t2v = torch.tensor([0, 1, 3])
    kept = two_stage_scores(sim, first, 2)
    assert torch.isinf(kept[0, 0]) and kept[0, 1] == 0.1 and kept[2, 3] == 0.5 and torch.isinf(kept[2, 1])
    out = two_stage_loss(sim, first, t2v, ks=(2, 4))
    assert out["exhaustive"]["R@1"] == pytest.approx(100.0)
    k2 = out["by_k"]["2"]
    # text 0 loses its video (first stage ranks it last); texts 1 and 2 keep rank 1
    assert k2["R@1"] == pytest.approx(200 / 3) and k2["diff/R@1"] == pytest.approx(-100 / 3)
    assert k2["first_stage_recall"] == pytest.approx(200 / 3) and not k2["covers_gallery"]
    k4 = out["by_k"]["4"]
    assert k4["covers_gallery"] and k4["diff/R@1"] == 0.0 and k4["diff/R@10"] == 0.0
    assert out["first_stage_alone"]["R@1"] == pytest.approx(100 / 3)


def test_search_report_for_a_test_set() -> None:
    """The result JSON's `search` block: rerank methods report the loss per K, two-tower methods only their scoring."""
    from tvr_bench.methods.clip4clip import CLIP4Clip
    from tvr_bench.methods.xpool import XPool
    from tvr_bench.search.twostage import search_report

    for cls, scoring in ((XPool, "rerank"), (CLIP4Clip, "two_tower")):
        torch.manual_seed(0)
        model = cls(backbone="tiny").eval()
        text, video = random_inputs(model, n_video=4, n_text=4)
        with torch.no_grad():
            sim = model.similarity(text, video)
        block = search_report(model, text, video, sim, torch.arange(4), ks=(2, 50))
        assert block["scoring"] == scoring and block["videos"] == 4
        if scoring == "rerank":
            assert set(block["two_stage"]["by_k"]) == {"2", "50"}
            assert block["two_stage"]["by_k"]["50"]["covers_gallery"]
            assert block["two_stage"]["by_k"]["50"]["diff/R@1"] == 0.0
        else:
            assert "two_stage" not in block


# ------------------------------------------------------------------------------------------ end to end
#: one two-tower and one two-stage method in the fast suite, every other method in the slow one
FAST_END_TO_END = ("clip4clip", "xpool")


@pytest.mark.parametrize("method", [m if m in FAST_END_TO_END else pytest.param(m, marks=pytest.mark.slow) for m in METHODS])
def test_search_equals_exhaustive_when_k_covers_the_gallery(method: str, tmp_path: Path, tiny_root: Path) -> None:
    """Index the tiny test split's shards; with K covering the gallery every query's ranking and scores equal the
    method's exhaustive scores, which equal the evaluator's scores of the same videos from the DataModule."""
    from tvr_bench.callbacks.evaluator import blocked_similarity
    from tvr_bench.data.datamodule import RetrievalDataModule
    from tvr_bench.data.transforms import normalize_batch
    from tvr_bench.search import build_index, open_index

    ckpt = make_checkpoint(tmp_path / "m.ckpt", method, root=tiny_root)
    index = build_index(tiny_root, ckpt, tmp_path / "index", splits=["test"], progress=False)
    assert index["num_videos"] == 16 and index["num_failures"] == 0
    searcher = open_index(tmp_path / "index")
    queries = ["a red circle moves left", "a green square moves up then a blue triangle"]
    results = searcher.search_many(queries, k=16, rerank=16)
    exhaustive = searcher.search_many(queries, k=16, exhaustive=True)
    model = searcher.loaded.model
    dm = RetrievalDataModule(root=str(tiny_root), dataset="synthetic", num_frames=12, image_size=64, num_workers=0)
    chunks = []
    with torch.no_grad():
        for batch in dm.eval_dataloader("test"):
            batch = normalize_batch(batch)
            chunks.append((list(batch["video_key"]), model.encode_video(batch["frames"], batch["frame_mask"])))
        keys = [k for ks, _ in chunks for k in ks]
        video = {k: torch.cat([f[k] for _, f in chunks]) for k in chunks[0][1]}
        order = torch.tensor(sorted(range(len(keys)), key=lambda i: keys[i]))
        video = {k: v[order] for k, v in video.items()}
        video["index"] = torch.arange(len(keys))
        text = searcher.encode(queries)
        reference = blocked_similarity(model, text, video, 64.0)
    stored_keys = [item["sample"] for item in searcher.stored.items]
    assert stored_keys == sorted(keys)
    for i, (result, full) in enumerate(zip(results, exhaustive)):
        assert [h.row for h in result.hits] == [h.row for h in full.hits]
        np.testing.assert_allclose([h.score for h in result.hits], [h.score for h in full.hits], atol=1e-5)
        np.testing.assert_allclose([h.score for h in full.hits], reference[i][[h.row for h in full.hits]].numpy(), atol=1e-5)
        assert result.hits[0].score == pytest.approx(float(reference[i].max()), abs=1e-5)


def test_folder_of_video_files_equals_its_prepared_shards(tmp_path: Path, tiny_root: Path, tiny_raw: Path) -> None:
    """A folder of mp4 files indexes to exactly the features of its prepared shards (same decoding, sampling and JPEG
    storage), through two decode workers; the Python API and the CLI give the same results."""
    from tvr_bench.search import build_index, search

    ckpt = make_checkpoint(tmp_path / "x.ckpt", "xpool", root=tiny_root)
    videos = tmp_path / "videos"
    videos.mkdir()
    for path in sorted((tiny_raw / "videos").glob("test-*.mp4")):
        shutil.copy(path, videos / path.name)
    files = build_index(videos, ckpt, tmp_path / "from_files", workers=2, chunk_size=5, progress=False)
    shards = build_index(tiny_root, ckpt, tmp_path / "from_shards", splits=["test"], progress=False)
    assert files["protocol"]["jpeg_quality"] == 90 and files["protocol"]["sampling"] == "segment_middle"
    a = np.load(tmp_path / "from_files" / "features" / "frames.npy")
    b = np.load(tmp_path / "from_shards" / "features" / "frames.npy")
    keys_a = [json.loads(x)["key"].removesuffix(".mp4") for x in (tmp_path / "from_files" / "items.jsonl").read_text().splitlines()]
    keys_b = [json.loads(x)["sample"] for x in (tmp_path / "from_shards" / "items.jsonl").read_text().splitlines()]
    assert keys_a == keys_b
    np.testing.assert_array_equal(a, b)
    api = search("a red circle", tmp_path / "from_files", k=3)
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["search", "a red circle", "--index", str(tmp_path / "from_files"), "--k", "3", "--json"]) == 0
    cli = json.loads(buf.getvalue())["results"][0]
    assert [h["key"] for h in cli["hits"]] == [h.key for h in api.hits]
    np.testing.assert_allclose([h["score"] for h in cli["hits"]], [h.score for h in api.hits], atol=1e-6)


def test_index_and_search_video_files_of_several_codecs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The official fixtures' videos (H.264 mp4/m4v/mov/m2ts, H.263 3gp/3g2, MPEG-4 avi, WMV2, VP8 webm, mkv, files
    without an extension) index end to end; the truncated ones are listed with the reason and skipped, the
    annotation files ignored; `search` prints a table, JSON and an HTML page of frame strips."""
    from tests.official_fixtures import build_raw, expected

    raw = tmp_path / "raw"
    for dataset in ("didemo", "activitynet"):
        build_raw(dataset, raw)
    roles = {e["path"]: e["role"] for d in ("didemo", "activitynet") for e in expected()[d]["video_files"]}
    decodable = sorted(p for p, r in roles.items() if r == "ok")
    broken = sorted(p for p, r in roles.items() if r == "corrupt")
    assert broken and len({Path(p).suffix for p in decodable}) >= 8
    ckpt = make_checkpoint(tmp_path / "c.ckpt", "clip4clip")
    out = tmp_path / "index"
    assert main(["index", str(raw), "--ckpt", str(ckpt), "--out", str(out), "--no-progress", "--workers", "0"]) == 0
    err = capsys.readouterr()
    meta = json.loads((out / "index.json").read_text())
    items = [json.loads(x)["key"] for x in (out / "items.jsonl").read_text().splitlines()]
    failures = json.loads((out / "failures.json").read_text())
    assert items == decodable
    assert sorted(f["file"] for f in failures) == broken
    assert all("decode error" in f["reason"] for f in failures)
    assert all(f"skipped {f}" in err.err for f in broken)
    assert meta["source"]["ignored_files"] == sum(1 for p in raw.rglob("*") if p.is_file() and p.suffix in (".json", ".txt"))
    assert meta["scoring"] == "two_tower" and meta["features"] == []
    assert main(["search", "a man rides a bike", "--index", str(out), "--k", "4", "--html", str(tmp_path / "p.html")]) == 0
    table = capsys.readouterr().out
    assert "two-tower, exact vector search" in table and items[0].split("/")[0] in table
    page = (tmp_path / "p.html").read_text()
    assert page.count("<tr><td class='rank'>") == 4 and page.count("data:image/jpeg;base64,") == 4
    assert main(["search", "a man rides a bike", "--index", str(out), "--k", "50", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"][0]["hits"]
    assert sorted(h["key"] for h in hits) == decodable  # k above the gallery: every indexed video once
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)


def test_corrupt_file_is_reported_and_skipped(tmp_path: Path, tiny_raw: Path) -> None:
    """A truncated mp4 is listed in failures.json with the reason; the good ones are indexed; a text file is ignored."""
    from tvr_bench.search import build_index

    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    good = sorted((tiny_raw / "videos").glob("test-*.mp4"))[:2]
    shutil.copy(good[0], folder / "a.mp4")
    shutil.copy(good[1], folder / "sub" / "b.mp4")
    data = good[0].read_bytes()
    (folder / "broken.mp4").write_bytes(data[: len(data) // 3])
    (folder / "notes.txt").write_text("not a video")
    (folder / ".hidden.mp4").write_bytes(data)
    index = build_index(folder, make_checkpoint(tmp_path / "c.ckpt", "clip4clip"), tmp_path / "idx", progress=False)
    assert index["num_videos"] == 2 and index["num_failures"] == 1
    assert [json.loads(x)["key"] for x in (tmp_path / "idx" / "items.jsonl").read_text().splitlines()] == ["a.mp4", "sub/b.mp4"]
    (failure,) = json.loads((tmp_path / "idx" / "failures.json").read_text())
    assert failure["file"] == "broken.mp4" and failure["reason"].startswith("decode error")
    assert index["source"]["ignored_files"] == 1


def test_query_with_another_checkpoint_is_refused(tmp_path: Path, tiny_raw: Path, capsys: pytest.CaptureFixture) -> None:
    """An index answers only the model that built it: another checkpoint (other weights), or the recorded checkpoint
    file overwritten by another model, is refused with one error line naming both fingerprints."""
    from tvr_bench.search import build_index, open_index
    from tvr_bench.search.engine import FingerprintMismatch

    folder = tmp_path / "v"
    folder.mkdir()
    for path in sorted((tiny_raw / "videos").glob("test-*.mp4"))[:3]:
        shutil.copy(path, folder / path.name)
    mine = make_checkpoint(tmp_path / "a.ckpt", "xpool", seed=0)
    other = make_checkpoint(tmp_path / "b.ckpt", "xpool", seed=1)
    build_index(folder, mine, tmp_path / "idx", progress=False)
    assert main(["search", "a red circle", "--index", str(tmp_path / "idx"), "--ckpt", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "built by another model" in err and len(err.splitlines()) == 1
    from tvr_bench.search.model import fingerprint, load_checkpoint, build_model

    assert fingerprint(build_model(load_checkpoint(other)))[:12] in err
    make_checkpoint(tmp_path / "a.ckpt", "xpool", seed=2)  # the recorded file now holds another model
    with pytest.raises(FingerprintMismatch):
        open_index(tmp_path / "idx")
    make_checkpoint(tmp_path / "a.ckpt", "xpool", seed=0)  # the same weights again: accepted
    assert open_index(tmp_path / "idx").search("a red circle", k=2).hits


def test_interrupted_index_resumes(tmp_path: Path, tiny_raw: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An index stopped after its first chunk refuses to restart silently, resumes with --resume from the finished
    chunk, and gives the same arrays and items as an uninterrupted build."""
    import tvr_bench.search.indexer as indexer

    folder = tmp_path / "v"
    folder.mkdir()
    for path in sorted((tiny_raw / "videos").glob("*.mp4"))[:7]:
        shutil.copy(path, folder / path.name)
    ckpt = make_checkpoint(tmp_path / "t.ckpt", "tmass")
    reference = indexer.build_index(folder, ckpt, tmp_path / "whole", chunk_size=3, progress=False)
    real = indexer.encode_clips
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(indexer, "encode_clips", interrupted)
    with pytest.raises(KeyboardInterrupt):
        indexer.build_index(folder, ckpt, tmp_path / "idx", chunk_size=3, batch_size=16, progress=False)
    assert not (tmp_path / "idx").exists() and (tmp_path / "idx.partial" / "progress.json").is_file()
    monkeypatch.setattr(indexer, "encode_clips", real)
    assert main(["index", str(folder), "--ckpt", str(ckpt), "--out", str(tmp_path / "idx"), "--chunk-size", "3",
                 "--no-progress"]) == 2  # neither --resume nor --overwrite
    with pytest.raises(Exception, match="other settings"):
        indexer.build_index(folder, ckpt, tmp_path / "idx", chunk_size=4, resume=True, progress=False)
    seen = []
    monkeypatch.setattr(indexer, "encode_clips", lambda *a, **k: seen.append(1) or real(*a, **k))
    resumed = indexer.build_index(folder, ckpt, tmp_path / "idx", chunk_size=3, resume=True, progress=False)
    assert len(seen) == 2  # chunks 2 and 3 only (3 + 3 + 1 videos)
    assert resumed["num_videos"] == reference["num_videos"] == 7
    for name in ("vectors.npy", "features/frames.npy", "features/frame_mask.npy", "items.jsonl"):
        assert (tmp_path / "idx" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert not (tmp_path / "idx.partial").exists()


def test_approximate_index_with_every_list_probed_is_exact(tmp_path: Path, tiny_raw: Path) -> None:
    """The IVF index probing all of its lists returns the exact search's videos and scores; without it, asking for
    --approximate names the fix."""
    from tvr_bench.search import build_index, open_index
    from tvr_bench.search.model import SearchSetupError

    folder = tmp_path / "v"
    folder.mkdir()
    for path in sorted((tiny_raw / "videos").glob("*.mp4"))[:40]:
        shutil.copy(path, folder / path.name)
    ckpt = make_checkpoint(tmp_path / "c.ckpt", "clip4clip")
    build_index(folder, ckpt, tmp_path / "idx", approximate=True, nlist=4, progress=False)
    searcher = open_index(tmp_path / "idx")
    exact = searcher.search("a red circle moves left", k=10)
    approx = searcher.search("a red circle moves left", k=10, approximate=True, nprobe=4)
    assert [h.row for h in approx.hits] == [h.row for h in exact.hits]
    np.testing.assert_allclose([h.score for h in approx.hits], [h.score for h in exact.hits], atol=1e-6)
    assert json.loads((tmp_path / "idx" / "index.json").read_text())["approximate"]["nlist"] == 4
    build_index(folder, ckpt, tmp_path / "flat", chunk_size=64, progress=False)
    with pytest.raises(SearchSetupError, match="--approximate"):
        open_index(tmp_path / "flat").search("x", approximate=True)


def test_bad_inputs_give_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A missing index, a folder without videos and a run directory without checkpoints each end with one error line."""
    ckpt = make_checkpoint(tmp_path / "c.ckpt", "clip4clip")
    assert main(["search", "q", "--index", str(tmp_path / "nothing")]) == 2
    assert "no search index at" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    assert main(["index", str(tmp_path / "empty"), "--ckpt", str(ckpt), "--out", str(tmp_path / "o")]) == 2
    assert "holds no file that could be a video" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    assert main(["index", str(tmp_path / "empty"), "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "o")]) == 2
    assert "holds no .ckpt file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ costs in make perf
def _toy_search_section() -> dict:
    """A `search` perf section with the fields the leaderboard reads (values chosen by hand)."""
    gallery = lambda ms, two=None, b=2137.0: {"exhaustive": {"ms": ms}, "bytes_per_video": b, "peak_rss_gib": 0.5,  # noqa: E731
                                              **({"two_stage": {"ms": two, "k": 200, "stages_ms": {}}} if two else {})}
    return {
        "sizes": {"galleries": [1000, 100000], "rerank": 200},
        "methods": {
            "clip4clip": {"recipe": "clip4clip", "scoring": "two_tower", "galleries": {"1000": gallery(3.0), "100000": gallery(40.0)}},
            "xpool": {"recipe": "xpool", "scoring": "rerank",
                      "galleries": {"1000": gallery(120.0, 60.0, 26700.0),
                                    "100000": {**gallery(9000.0, 80.0, 26700.0), "exhaustive": {"ms": 9000.0, "extrapolated_from": 20000}}}},
        },
        "first_stage": {"n": 1000000, "exact_single_ms": 150.0},
        "indexing": {"methods": {"clip4clip": {"videos_per_s": 3.5}, "xpool": {"videos_per_s": 3.1}}},
    }


def test_leaderboard_shows_search_costs_beside_accuracy(tmp_path: Path) -> None:
    """With `make perf`'s search section in runs/perf.json the leaderboard gains the cost columns (CSV and a Markdown
    table beside t2v R@1), each marked with the machine; without it, nothing changes."""
    from tests.leaderboard_toys import fake_result, write_results
    from tvr_bench.report import build_leaderboard

    runs = tmp_path / "runs"
    write_results(runs, [fake_result("xpool", "synthetic", "tiny", 0, 12.5), fake_result("clip4clip", "synthetic", "tiny", 0, 14.0),
                         fake_result("drl", "synthetic", "tiny", 0, 15.0)])
    build_leaderboard(runs)
    assert "Search cost" not in (runs / "leaderboard.md").read_text()
    perf = {"machine": {"cpu": "Test CPU", "cpu_count": 2, "memory_gib": 24.0, "torch_threads": 2},
            "command": "tvr-bench perf", "timestamp": "2026-12-06T00:00:00", "load_start": [1.0], "load_end": [1.2],
            "quick": False, "sections": {"search": _toy_search_section()}}
    (runs / "perf.json").write_text(json.dumps(perf))
    build_leaderboard(runs)
    md = (runs / "leaderboard.md").read_text()
    table = md[md.index("## Search cost"):]
    assert "ms/query 100,000 two-stage¹" in table and "ms/query 1,000,000 vector stage¹" in table
    row = next(line for line in table.splitlines() if line.startswith("| xpool |"))
    assert "| 12.5 |" in row and "two-stage (K = 200)" in row and "9,000*" in row and "| 80.0 |" in row
    assert "¹ measured by `make perf`" in table and "Test CPU (2 cores, 24.0 GiB, no GPU)" in table
    assert not any(line.startswith("| drl |") for line in table.splitlines())  # no cost measured for it
    import csv

    rows = {r["method"]: r for r in csv.DictReader((runs / "leaderboard.csv").open())}
    assert float(rows["clip4clip"]["search/ms_large_exhaustive"]) == 40.0 and rows["clip4clip"]["search/scoring"] == "two_tower"
    assert "Test CPU" in rows["xpool"]["search/machine"] and rows["drl"].get("search/scoring", "") == ""


@pytest.mark.slow
def test_perf_search_section_end_to_end(tmp_path: Path) -> None:
    """The `search` section at toy sizes: every figure and target is there and the Markdown renders, for one two-tower
    and one two-stage method (the full section runs in `make perf`)."""
    from tvr_bench.perf.harness import PerfSizes
    from tvr_bench.perf.search_bench import SearchSizes, bench_search, leaderboard_costs, render

    sizes = SearchSizes(galleries=(200, 600), first_stage=3000, queries=2, batch=16, batch_repeats=1, rerank=50,
                        exhaustive_budget_s=0.2, index_rounds=1, vit_b32=False)
    clips = PerfSizes(clips=1, clip_width=160, clip_height=120, clip_fps=10, clip_seconds=3)
    section = bench_search(tmp_path / "work", tmp_path / "runs", methods=["clip4clip", "xpool"], sizes=sizes, clip_sizes=clips)
    assert set(section["methods"]) == {"clip4clip", "xpool"}
    x = section["methods"]["xpool"]["galleries"]["600"]
    assert x["two_stage"]["ms"] > 0 and x["exhaustive"]["ms"] > 0 and x["bytes_per_video"] > 12 * 512 * 4
    c = section["methods"]["clip4clip"]["galleries"]["600"]
    assert c["batch_ms_per_query"] > 0 and 2048 < c["bytes_per_video"] < 2200
    first = section["first_stage"]
    assert first["n"] == 3000 and first["approximate"]["sweep"] and 0 <= first["approximate"]["chosen"]["recall_at_10"] <= 1
    assert set(section["indexing"]["methods"]) == {"clip4clip", "xpool"}
    assert section["targets_met"]["exact_1m_single"] is None  # not measured at 1M
    assert section["targets_met"]["xpool_two_stage_r1"] is None  # no result JSON in the runs folder
    text = "\n".join(render(section))
    assert "## Search" in text and "| xpool | rerank |" in text
    costs = leaderboard_costs({"machine": {"cpu": "x"}, "sections": {"search": section}})
    assert costs["methods"]["xpool"]["ms_large_two_stage"] == x["two_stage"]["ms"]


def test_test_run_records_the_two_stage_loss(tmp_path: Path, tiny_root: Path) -> None:
    """A test run of a two-stage method writes the `search` block into its result JSON (K = 50, 200, 1000; on 16
    test videos every K covers the gallery, so nothing is lost)."""
    import warnings

    import lightning as L

    from tvr_bench.callbacks.evaluator import RetrievalEvaluator
    from tvr_bench.callbacks.leaderboard import LeaderboardWriter
    from tvr_bench.data.datamodule import RetrievalDataModule
    from tvr_bench.methods.xpool import XPool

    torch.manual_seed(0)
    model = XPool(backbone="tiny")
    dm = RetrievalDataModule(root=str(tiny_root), dataset="synthetic", num_frames=12, image_size=64, num_workers=0)
    writer = LeaderboardWriter(runs_dir=str(tmp_path / "runs"), rebuild=False, bootstrap_resamples=0, qualitative=0)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1, callbacks=[RetrievalEvaluator(print_table=False), writer])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.test(model, datamodule=dm, verbose=False)
    block = writer.last_result["search"]
    assert block["scoring"] == "rerank" and (block["videos"], block["texts"]) == (16, 80)
    by_k = block["two_stage"]["by_k"]
    assert set(by_k) == {"50", "200", "1000"} and all(v["covers_gallery"] and v["diff/R@1"] == 0.0 for v in by_k.values())
    assert block["two_stage"]["exhaustive"]["R@1"] == pytest.approx(writer.last_result["metrics"]["t2v/R@1"])
    assert json.loads(writer.last_path.read_text())["search"]["two_stage"]["by_k"]["50"]["first_stage_recall"] == 100.0


def test_two_stage_search_matches_the_reported_loss(tmp_path: Path, tiny_root: Path) -> None:
    """The two-stage loss the result JSON reports is what two-stage search does: with K = 4 of 16 videos, the R@1 of
    real searches (each caption of the test split against the index) equals `two_stage_loss` on the same scores."""
    from tvr_bench.data.shards import iter_shard, parse_sample
    from tvr_bench.search import build_index, open_index
    from tvr_bench.search.twostage import two_stage_loss

    ckpt = make_checkpoint(tmp_path / "x.ckpt", "xpool", root=tiny_root)
    build_index(tiny_root, ckpt, tmp_path / "idx", splits=["test"], progress=False)
    searcher = open_index(tmp_path / "idx")
    rows = {item["sample"]: i for i, item in enumerate(searcher.stored.items)}
    captions, owner = [], []
    for shard in sorted((tiny_root / "test").glob("shard-*.tar")):
        for raw in iter_shard(shard):
            meta, _ = parse_sample(raw)
            captions += meta["captions"]
            owner += [rows[raw["__key__"]]] * len(meta["captions"])
    text = searcher.encode(captions)
    sim = torch.from_numpy(searcher.exhaustive_scores(text))
    first = searcher.loaded.model.search_vectors(text, "text") @ torch.from_numpy(np.array(searcher.stored.vectors)).T
    expected = two_stage_loss(sim, first, torch.tensor(owner), ks=(4,))["by_k"]["4"]
    results = searcher.search_many(captions, k=1, rerank=4)
    hits = [r.hits[0].row == o for r, o in zip(results, owner)]
    assert 100.0 * sum(hits) / len(hits) == pytest.approx(expected["R@1"])
    assert expected["first_stage_recall"] < 100.0  # K = 4 really drops candidates here


def test_sharded_exact_index_equals_one_flat_index() -> None:
    """Splitting the exact index into per-thread shards changes no result: single queries (scanned in parallel) and
    a batch (BLAS path, shard by shard) give one flat index's rows and scores."""
    from tvr_bench.search.vectors import exact_index, knn

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((5000, 32)).astype(np.float32)
    queries = rng.standard_normal((40, 32)).astype(np.float32)
    flat, sharded = exact_index(vectors, shards=1), exact_index(vectors, shards=3)
    assert type(sharded).__name__ == "ShardedFlat" and sharded.ntotal == 5000
    for q in (queries[:1], queries[:5], queries):  # a few queries in parallel shards; 40 queries on the BLAS path
        s1, r1 = knn(flat, q, 10)
        s2, r2 = knn(sharded, q, 10)
        np.testing.assert_array_equal(r1, r2)
        np.testing.assert_allclose(s1, s2, atol=1e-4)
    s, r = knn(sharded, queries[:2], 6000)  # k above the gallery: every row once
    assert r.shape == (2, 5000) and sorted(r[0].tolist()) == list(range(5000))
