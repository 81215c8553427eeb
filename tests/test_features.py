"""Cached frozen CLIP features (docs/features.md): extraction, the feature shards, FeaturesDataModule, and
scores/training on cached features equal to encoding frames with a frozen backbone."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch

from tests.data_fixtures import tiny_raw, tiny_root  # noqa: F401 - session fixtures
from tvr_bench.backbones.clip import CLIPBackbone
from tvr_bench.callbacks.evaluator import RetrievalEvaluator
from tvr_bench.cli import main as cli_main
from tvr_bench.data.datamodule import RetrievalDataModule
from tvr_bench.data.shards import ShardError
from tvr_bench.features import FeaturesDataModule
from tvr_bench.features.datamodule import FeatureTrainLoader, check_model
from tvr_bench.features.extract import extract_features, model_ready_batch
from tvr_bench.features.store import FeatureStoreError, load_split_features, parse_feature_sample, read_store
from tvr_bench.methods.clip4clip import CLIP4Clip
from tvr_bench.methods.drl import DRL
from tvr_bench.methods.emcl import EMCL
from tvr_bench.methods.mascot import MASCOT
from tvr_bench.methods.tmass import TMASS
from tvr_bench.methods.xclip import XCLIP
from tvr_bench.methods.xpool import XPool

TOL = 1e-5
MAX_WORDS = 32


@pytest.fixture(scope="module")
def features_dir(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """Features of the tiny synthetic set with the `tiny` backbone built after seed 0, written by the CLI."""
    out = tmp_path_factory.mktemp("features") / "tiny"
    code = cli_main(["features", "synthetic", "--root", str(tiny_root), "--out", str(out), "--max-words", str(MAX_WORDS), "--no-progress"])
    assert code == 0
    return out


def frames_dm(root: Path) -> RetrievalDataModule:
    """The frame DataModule the features were extracted from (eval loader, no workers)."""
    return RetrievalDataModule(root=str(root), dataset="synthetic", num_frames=12, image_size=64, batch_size=8, eval_batch_size=8, num_workers=0)


def make_model(cls: type, seed: int = 0, **kwargs: Any) -> Any:
    """A method on the `tiny` backbone with the weights the features were extracted with (seed 0)."""
    torch.manual_seed(seed)
    return cls(backbone="tiny", freeze="all", max_words=MAX_WORDS, **kwargs)


def quiet_trainer(**kwargs: Any) -> L.Trainer:
    """A CPU trainer without logger, checkpoints or progress output."""
    return L.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1, **kwargs,
    )  # fmt: skip


def test_scores(model: Any, datamodule: Any, path: Path) -> dict[str, Any]:
    """The evaluator's full score matrix (and key order) of a test pass."""
    trainer = quiet_trainer(callbacks=[RetrievalEvaluator(save_scores=str(path), print_table=False)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.test(model, datamodule=datamodule, verbose=False)
    return torch.load(path)


test_scores.__test__ = False  # a helper, not a test


class Batches:
    """A fixed list of batches as a sized training loader."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


METHODS = {
    "clip4clip": (CLIP4Clip, {}),
    "clip4clip_seqtransf": (CLIP4Clip, {"head": "seqTransf"}),
    "xpool": (XPool, {}),
    "drl": (DRL, {}),
    "drl_cdcr1": (DRL, {"cdcr": 1}),
    "tmass": (TMASS, {}),
    "emcl": (EMCL, {"temporal_layers": 1}),
    "xclip": (XCLIP, {}),
}


# ----------------------------------------------------------------------------- the store
def test_store_records_its_settings(features_dir: Path, tiny_root: Path) -> None:  # noqa: F811
    store = read_store(features_dir)
    index = json.loads((tiny_root / "test" / "index.json").read_text())
    assert store["dataset"] == "synthetic" and store["backbone"] == "tiny" and store["num_frames"] == 12
    assert store["sampling"] == index["sampling"] and store["max_words"] == MAX_WORDS and store["tokens"] is True
    assert store["augment"] == "none"
    for split in ("train", "val", "test"):
        frame_index = json.loads((tiny_root / split / "index.json").read_text())
        assert store["splits"][split] == {"num_samples": frame_index["num_samples"], "num_captions": frame_index["num_captions"]}
        feats = load_split_features(features_dir, split, store)
        assert feats.frames.shape == (frame_index["num_samples"], 12, 128) and feats.frames.dtype == np.float32
        assert feats.num_captions == frame_index["num_captions"] and feats.keys == sorted(feats.keys)


def test_store_holds_only_json_and_npy(features_dir: Path) -> None:
    shard = sorted((features_dir / "test").glob("shard-*.tar"))[0]
    with tarfile.open(shard) as tar:
        names = tar.getnames()
    assert names and all(n.endswith((".json", ".frames.npy", ".text.npy", ".tokens.npy")) for n in names)


def _raw_sample(features_dir: Path) -> dict[str, Any]:
    shard = sorted((features_dir / "test").glob("shard-*.tar"))[0]
    sample: dict[str, Any] = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            if sample and sample["__key__"] != key:
                break
            sample["__key__"] = key
            sample[ext] = tar.extractfile(member).read()
    sample["__url__"] = str(shard)
    return sample


def test_parse_refuses_foreign_members_and_pickled_arrays(features_dir: Path) -> None:
    sample = _raw_sample(features_dir)
    assert parse_feature_sample(dict(sample), with_tokens=True).frames.shape == (12, 128)
    with pytest.raises(ShardError, match="unexpected member.*pyd"):
        parse_feature_sample({**sample, "pyd": b"x"}, with_tokens=True)
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ShardError, match="text.npy"):
        parse_feature_sample({**sample, "text.npy": buffer.getvalue()}, with_tokens=True)
    wrong = io.BytesIO()
    np.save(wrong, np.zeros((3, 128), dtype=np.float32))
    with pytest.raises(ShardError, match="disagree"):
        parse_feature_sample({**sample, "text.npy": wrong.getvalue()}, with_tokens=True)


def test_missing_store_and_existing_output_are_clear_errors(features_dir: Path, tmp_path: Path, tiny_root: Path, capsys) -> None:  # noqa: F811
    with pytest.raises(FeatureStoreError, match="tvr-bench features"):
        FeaturesDataModule(str(tmp_path / "nowhere"))
    code = cli_main(["features", "synthetic", "--root", str(tiny_root), "--out", str(features_dir), "--no-progress"])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    code = cli_main(["features", "synthetic", "--root", str(tmp_path / "no-shards"), "--out", str(tmp_path / "f"), "--no-progress"])
    assert code == 3 and "prepare" in capsys.readouterr().err


# ----------------------------------------------------------------------------- same scores as frames
@pytest.mark.parametrize("name", ["clip4clip", "clip4clip_seqtransf", "xpool", "drl", "tmass", "emcl", "xclip"])
def test_eval_scores_equal_encoding_frames(name: str, features_dir: Path, tiny_root: Path, tmp_path: Path) -> None:  # noqa: F811
    cls, kwargs = METHODS[name]
    model = make_model(cls, **kwargs)
    on_frames = test_scores(model, frames_dm(tiny_root), tmp_path / "frames.pt")
    cached = test_scores(model, FeaturesDataModule(str(features_dir), eval_batch_size=8), tmp_path / "features.pt")
    assert cached["video_keys"] == on_frames["video_keys"] and cached["caption_keys"] == on_frames["caption_keys"]
    assert on_frames["sim"].abs().max() > 0.01
    assert (cached["sim"] - on_frames["sim"]).abs().max().item() <= TOL


def test_mascot_evaluates_on_features_but_refuses_to_train(features_dir: Path, tiny_root: Path, tmp_path: Path) -> None:  # noqa: F811
    model = make_model(MASCOT)
    on_frames = test_scores(model, frames_dm(tiny_root), tmp_path / "frames.pt")
    cached = test_scores(model, FeaturesDataModule(str(features_dir), eval_batch_size=8), tmp_path / "features.pt")
    assert (cached["sim"] - on_frames["sim"]).abs().max().item() <= TOL
    with pytest.raises(FeatureStoreError, match="pixels"):
        check_model(model, read_store(features_dir), str(features_dir), training=True)


def _frame_batches(root: Path, feature_batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The frame batches (normalised as in training) of the same videos and captions as `feature_batches`."""
    pixels = {}
    for batch in frames_dm(root).eval_dataloader("train"):
        batch = model_ready_batch(batch)
        for i, key in enumerate(batch["video_key"]):
            pixels[key] = (batch["frames"][i], batch["frame_mask"][i])
    return [
        {
            "frames": torch.stack([pixels[k][0] for k in fb["video_key"]]),
            "frame_mask": torch.stack([pixels[k][1] for k in fb["video_key"]]),
            "captions": list(fb["captions"]),
            "video_key": list(fb["video_key"]),
        }
        for fb in feature_batches
    ]


@pytest.mark.parametrize("name", ["clip4clip_seqtransf", "xpool", "drl", "drl_cdcr1", "tmass", "emcl", "xclip"])
def test_training_on_features_equals_training_on_frames(name: str, features_dir: Path, tiny_root: Path, tmp_path: Path) -> None:  # noqa: F811
    """Same batches, frozen backbone: the head's weights after 3 steps and the test scores agree."""
    cls, kwargs = METHODS[name]
    dm = FeaturesDataModule(str(features_dir), batch_size=8, eval_batch_size=8)
    feature_batches = list(dm.train_dataloader())[:3]
    frame_batches = _frame_batches(tiny_root, feature_batches)
    models = {}
    for kind, batches in (("frames", frame_batches), ("features", feature_batches)):
        model = make_model(cls, lr=1e-3, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quiet_trainer(max_epochs=1, limit_val_batches=0).fit(model, train_dataloaders=Batches(batches))
        models[kind] = model
    start = dict(make_model(cls, **kwargs).named_parameters())
    a, b = dict(models["frames"].named_parameters()), dict(models["features"].named_parameters())
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-4  # the head did train
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= TOL
    on_frames = test_scores(models["frames"], frames_dm(tiny_root), tmp_path / "frames.pt")
    cached = test_scores(models["features"], FeaturesDataModule(str(features_dir), eval_batch_size=8), tmp_path / "features.pt")
    assert (cached["sim"] - on_frames["sim"]).abs().max().item() <= TOL


# ----------------------------------------------------------------------------- the DataModule
def test_datamodule_exposes_features_dir_and_store_settings(features_dir: Path) -> None:
    dm = FeaturesDataModule(str(features_dir))
    assert dm.features_dir == str(features_dir)
    assert (dm.dataset, dm.num_frames, dm.image_size) == ("synthetic", 12, 64)
    assert dm.split_shards("test").num_samples == 16 and dm.eval_size("test") == (16, 80)
    dm.setup("fit")


def test_protocol_settings_are_checked_against_the_store(features_dir: Path) -> None:
    with pytest.raises(FeatureStoreError, match="num_frames"):
        FeaturesDataModule(str(features_dir), num_frames=8)
    with pytest.raises(FeatureStoreError, match="caption_mode"):
        FeaturesDataModule(str(features_dir), caption_mode="paragraph")
    FeaturesDataModule(str(features_dir), sampling="fps1_uniform")  # synthetic offers one sampling: nothing to check
    with pytest.raises(ValueError, match="train_stream"):
        FeaturesDataModule(str(features_dir), train_stream="captions")  # type: ignore[arg-type]


def test_model_checks(features_dir: Path) -> None:
    store, where = read_store(features_dir), str(features_dir)
    check_model(make_model(XPool), store, where, training=True)
    with pytest.raises(FeatureStoreError, match="freeze: all"):
        torch.manual_seed(0)
        check_model(XPool(backbone="tiny", freeze="none", max_words=MAX_WORDS), store, where, training=True)
    with pytest.raises(FeatureStoreError, match="not the ones"):
        check_model(make_model(XPool, seed=1), store, where, training=False)
    with pytest.raises(FeatureStoreError, match="--max-words 77"):
        torch.manual_seed(0)
        check_model(XPool(backbone="tiny", freeze="all", max_words=77), store, where, training=False)


def test_fit_refuses_an_unfrozen_backbone(features_dir: Path) -> None:
    torch.manual_seed(0)
    model = CLIP4Clip(backbone="tiny", freeze="none", max_words=MAX_WORDS)
    with pytest.raises(FeatureStoreError, match="freeze: all"):
        quiet_trainer(max_steps=1, limit_val_batches=0).fit(model, datamodule=FeaturesDataModule(str(features_dir), batch_size=8))


@pytest.mark.parametrize("stream", ["videos", "pairs"])
def test_train_epoch_covers_each_item_once_across_ranks(stream: str, features_dir: Path) -> None:
    split = load_split_features(features_dir, "train", read_store(features_dir))
    seen, counts, per_rank = [], set(), []
    for rank in range(2):
        loader = FeatureTrainLoader(split, batch_size=4, stream=stream, seed=3, rank=rank, world_size=2, text_length=MAX_WORDS)
        batches = list(loader)
        counts.add(len(batches))
        per_rank.append(batches)
        for batch in batches:
            seen += [(k, c) for k, c in zip(batch["video_key"], batch["captions"])]
            assert batch["frames"].shape == (4, 12, 128) and batch["text_features"]["tokens"].shape == (4, MAX_WORDS, 128)
    assert len(counts) == 1
    for a, b in zip(*per_rank):  # a global batch never holds a video twice
        keys = a["video_key"] + b["video_key"]
        assert len(set(keys)) == len(keys)
    if stream == "videos":
        assert sorted(k for k, _ in seen) == sorted(split.keys)
    else:
        assert len(seen) == split.num_captions and len(set(seen)) >= 0.9 * split.num_captions
    for key, caption in seen:
        assert caption in split.captions[split.keys.index(key)]
    again = FeatureTrainLoader(split, batch_size=4, stream=stream, seed=3, rank=0, world_size=2, text_length=MAX_WORDS)
    other = FeatureTrainLoader(split, batch_size=4, stream=stream, seed=3, rank=0, world_size=2, text_length=MAX_WORDS)
    first, second = list(again), list(again)  # a new epoch draws a new order
    assert [b["video_key"] for b in first] == [b["video_key"] for b in list(other)]
    assert [b["captions"] for b in first] != [b["captions"] for b in second]


def test_train_loader_resumes_mid_epoch(features_dir: Path) -> None:
    split = load_split_features(features_dir, "train", read_store(features_dir))
    full = FeatureTrainLoader(split, batch_size=4, stream="pairs", seed=0, rank=0, world_size=1, text_length=MAX_WORDS)
    batches = list(full)
    partial = FeatureTrainLoader(split, batch_size=4, stream="pairs", seed=0, rank=0, world_size=1, text_length=MAX_WORDS)
    iterator = iter(partial)
    for _ in range(5):
        next(iterator)
    state = partial.state_dict()
    resumed = FeatureTrainLoader(split, batch_size=4, stream="pairs", seed=0, rank=0, world_size=1, text_length=MAX_WORDS)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert [b["captions"] for b in rest] == [b["captions"] for b in batches[5:]]


def test_extraction_matches_the_backbone_on_frames(features_dir: Path, tiny_root: Path, tmp_path: Path) -> None:  # noqa: F811
    """Extracting with another batch size gives the same store contents (up to float rounding)."""
    torch.manual_seed(0)
    backbone = CLIPBackbone("tiny", freeze="all")
    dm = RetrievalDataModule(root=str(tiny_root), dataset="synthetic", num_frames=12, image_size=64, eval_batch_size=3, num_workers=0)
    store = extract_features(dm, backbone, tmp_path / "again", ["test"], max_words=MAX_WORDS, progress=False, seed=0)
    reference = read_store(features_dir)
    assert store["backbone_fingerprint"] == reference["backbone_fingerprint"]
    a = load_split_features(tmp_path / "again", "test", store)
    b = load_split_features(features_dir, "test", reference)
    assert a.keys == b.keys and a.captions == b.captions
    assert np.abs(a.frames - b.frames).max() <= TOL and np.abs(a.text - b.text).max() <= TOL
    assert np.abs(a.tokens - b.tokens).max() <= TOL and (a.token_lengths == b.token_lengths).all()


@pytest.mark.slow
def test_cli_bench_on_features_writes_a_frozen_clip_result(features_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """`tvr-bench bench` with a method recipe, `freeze: all` and FeaturesDataModule trains, tests, and its result
    JSON is marked `features: frozen-clip` (a protocol of its own in the leaderboard)."""
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    monkeypatch.chdir(tmp_path)  # the recipe's CSV logger writes under ./runs
    code = cli_main([
        "bench", "--config", str(recipes / "base.yaml"), "--config", str(recipes / "methods" / "clip4clip_seqtransf.yaml"),
        "--model.init_args.freeze", "all", "--model.init_args.max_words", str(MAX_WORDS),
        "--data", "tvr_bench.features.FeaturesDataModule", "--data.features_dir", str(features_dir),
        "--data.batch_size", "8", "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.enable_progress_bar", "false", "--leaderboard.runs_dir", str(tmp_path / "runs"),
    ])  # fmt: skip
    assert code == 0
    (result_path,) = (tmp_path / "runs" / "results").glob("*.json")
    result = json.loads(result_path.read_text())
    assert result["protocol"]["features"] == "frozen-clip"
    assert result["dataset"] == "synthetic" and result["frames"] == 12


def test_protocol_size_comes_from_the_dataset_class(features_dir: Path, monkeypatch) -> None:
    dm = FeaturesDataModule(str(features_dir))
    assert dm.protocol_size("test") is None  # synthetic: no official size
    from tvr_bench.data.benchmarks.catalog import datamodules

    msrvtt = datamodules()["msrvtt"]
    monkeypatch.setitem(dm.store, "dataset", "msrvtt")
    monkeypatch.setattr(dm, "dataset", "msrvtt")
    assert dm.protocol_size("test") == msrvtt.protocol_size("test")


def test_datamodule_checkpoint_state_resumes_the_stream(features_dir: Path) -> None:
    dm = FeaturesDataModule(str(features_dir), batch_size=4)
    assert dm.state_dict() == {}
    iterator = iter(dm.train_dataloader())
    first = [next(iterator) for _ in range(4)]
    state = dm.state_dict()
    assert state["train_stream"]["batches"] == 4
    rest = list(iterator)
    again = FeaturesDataModule(str(features_dir), batch_size=4)
    again.load_state_dict(state)
    resumed = list(again.train_dataloader())
    assert [b["captions"] for b in resumed] == [b["captions"] for b in rest] and len(first) + len(rest) == len(resumed) + 4


def test_perf_section_measures_both_paths(tiny_root: Path, tmp_path: Path) -> None:  # noqa: F811
    """The `features` perf section trains the same model on both paths and reports their rates and ratio."""
    from tvr_bench.perf.features_bench import bench_features, render

    section = bench_features(tmp_path, batch_size=8, steps=2, warmup=1, rounds=1, accelerator="cpu", root=tiny_root)
    assert len(section["step_seconds"]["frames"]) == len(section["step_seconds"]["features"]) == 2
    assert section["speedup"] == pytest.approx(section["features_steps_per_s"] / section["frames_steps_per_s"])
    assert section["targets_met"]["speedup"] == (section["speedup"] >= 10.0)
    assert "steps/s" in "\n".join(render(section))



def test_fit_resumed_mid_epoch_ends_with_the_same_weights(features_dir: Path, tmp_path: Path) -> None:
    """A 6-step fit (one epoch) stopped after step 3 and resumed from its checkpoint sees the remaining batches
    and ends with exactly the weights of an uninterrupted fit."""
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    class Record(Callback):
        def __init__(self) -> None:
            self.keys: list[list[str]] = []

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self.keys.append(list(batch["video_key"]))

    class StopAt3(Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == 3:
                trainer.should_stop = True

    def fit(callbacks: list[Callback], ckpt: str | None = None) -> Any:
        model = make_model(XPool, lr=1e-3)
        trainer = L.Trainer(
            logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
            max_steps=6, limit_val_batches=0, callbacks=callbacks,
            enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, datamodule=FeaturesDataModule(str(features_dir), batch_size=8, val_split=None), ckpt_path=ckpt)
        return model

    seen = [Record(), Record(), Record()]
    whole = fit([seen[0]])
    fit([seen[1], StopAt3(), ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=3, save_top_k=0)])
    resumed = fit([seen[2]], ckpt=str(tmp_path / "last.ckpt"))
    assert len(seen[0].keys) == 6 and seen[1].keys + seen[2].keys == seen[0].keys
    a, b = dict(whole.named_parameters()), dict(resumed.named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a)
