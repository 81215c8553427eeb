"""The pretrained synthetic backbone: frame labels, frame captions, the multi-positive loss, the stage itself
(deterministic, cached, loaded through the CLIP wrapper's local-directory path) and its zero-shot gain."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.data_fixtures import tiny_root  # noqa: F401 - pytest fixture
from tvr_bench.backbones.clip import CLIPBackbone
from tvr_bench.data import synth
from tvr_bench.data.benchmarks.synthetic import SyntheticDataModule
from tvr_bench.data.shards import iter_shard, parse_sample, read_index
from tvr_bench.data.transforms import normalize_batch
from tvr_bench.functional.losses import symmetric_infonce
from tvr_bench.functional.pretrain import multi_positive_infonce, multi_positive_log_likelihood
from tvr_bench.methods.clip4clip import CLIP4Clip
from tvr_bench.metrics import retrieval_metrics
from tvr_bench.pretrain import (
    RECORD_FILE,
    TEMPLATES,
    PretrainConfig,
    build_pretrained,
    frame_caption,
    frame_labels,
    is_current,
    load_frames,
    positives_matrix,
    pretrain_main,
)

#: A pretraining short enough for the fast suite on the tiny set (576 frames).
TINY = PretrainConfig(steps=40, batch_size=48, lr=1e-3, max_words=16)


def test_multi_positive_loss_is_clip_loss_with_one_positive_per_row() -> None:
    torch.manual_seed(0)
    image, text = torch.randn(6, 8), torch.randn(6, 8)
    scale = torch.tensor(2.0)
    sims = F.normalize(text, dim=-1) @ F.normalize(image, dim=-1).t()
    expected = symmetric_infonce(sims, scale)
    assert multi_positive_infonce(image, text, torch.eye(6, dtype=torch.bool), scale) == pytest.approx(float(expected), abs=1e-6)
    # two positives: -log of the summed probability
    logits = torch.tensor([[1.0, 2.0, 0.0]])
    pos = torch.tensor([[True, True, False]])
    p = torch.softmax(logits, dim=1)
    assert float(multi_positive_log_likelihood(logits, pos)) == pytest.approx(float(-torch.log(p[0, 0] + p[0, 1])), abs=1e-6)
    with pytest.raises(ValueError, match="at least one positive"):
        multi_positive_log_likelihood(logits, torch.zeros_like(pos))


def test_frame_labels_follow_the_events_and_captions_never_say_motion(tiny_root: Path) -> None:
    split = tiny_root / "train"
    index = read_index(split, "synthetic")
    meta, jpegs = parse_sample(next(iter(iter_shard(split / index["shards"][0]["file"]))))
    labels = frame_labels(meta)
    first, second = meta["extra"]["events"]
    assert len(labels) == len(jpegs) == 12
    for native, label in zip(meta["frame_indices"], labels):
        event = first if native < second["start_frame"] else second
        assert label == (event["colour"], event["shape"], meta["extra"]["background"])
    rng = random.Random(0)
    motion_words = {w for phrases in synth.MOTIONS.values() for p in phrases for w in p.split()} - {"to", "the", "a"}
    for name, states, _ in TEMPLATES:
        text, constraint = frame_caption(labels[0], name, rng)
        assert not set(text.split()) & motion_words and not {"first", "then", "after", "before"} & set(text.split())
        assert [c is not None for c in constraint] == [a in states for a in ("colour", "shape", "background")]
    with pytest.raises(ValueError, match="not a synthetic shard"):
        frame_labels({"key": "x", "captions": ["c"]})


def test_positives_follow_what_each_caption_states() -> None:
    labels = [("red", "circle", "gray"), ("red", "square", "gray"), ("blue", "circle", "black")]
    constraints = [("red", "circle", "gray"), ("red", None, None), (None, "circle", None), (None, None, "black")]
    expected = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(positives_matrix(labels, constraints), expected)


@torch.no_grad()
def _zero_shot_t2v_r1(backbone: str, root: Path) -> float:
    """Mean-pooled zero-shot t2v R@1 of a backbone on the tiny test set (CLIP4Clip meanP, no training)."""
    torch.manual_seed(0)
    model = CLIP4Clip(backbone=backbone).eval()
    dm = SyntheticDataModule(size="tiny", root=str(root), num_workers=0, eval_batch_size=16)
    texts, videos, t2v = [], [], []
    for batch in dm.test_dataloader():
        batch = normalize_batch(batch)
        texts.append(model.encode_text(**model.tokenize(batch["captions"]))["embeds"])
        t2v.append(batch["caption_video"] + sum(len(v) for v in videos))
        videos.append(model.encode_video(batch["frames"], batch["frame_mask"])["embeds"])
    sim = model.similarity({"embeds": torch.cat(texts)}, {"embeds": torch.cat(videos)})
    return retrieval_metrics(sim, torch.cat(t2v))["t2v/R@1"]


def test_tiny_pretrain_beats_a_random_backbone_zero_shot(tiny_root: Path, tmp_path: Path) -> None:
    out = build_pretrained(tiny_root, tmp_path / "pretrained", TINY, progress=False)
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["frames"] == 48 * 12 and record["config"]["steps"] == TINY.steps
    assert record["loss_curve"][-1]["loss"] < record["loss_curve"][0]["loss"] - 0.5
    # loaded through the CLIP wrapper's local-directory path, tokenizer included
    backbone = CLIPBackbone(str(out))
    assert backbone.image_size == 64 and backbone.tokenize(["a red circle"], 8)["input_ids"][0, 0] == 49406
    pretrained, random_init = _zero_shot_t2v_r1(str(out), tiny_root), _zero_shot_t2v_r1("tiny", tiny_root)
    assert pretrained >= random_init + 5.0, (pretrained, random_init)  # chance is 6.25 on 16 videos


def test_stage_is_deterministic_and_cached(tiny_root: Path, tmp_path: Path) -> None:
    config = PretrainConfig(steps=3, batch_size=32, max_words=16)
    a = build_pretrained(tiny_root, tmp_path / "a", config, progress=False)
    b = build_pretrained(tiny_root, tmp_path / "b", config, progress=False)
    weights = lambda p: CLIPBackbone(str(p)).clip.state_dict()  # noqa: E731
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert is_current(a, tiny_root, config) and not is_current(a, tiny_root, PretrainConfig(steps=4, batch_size=32))
    stamp = (a / RECORD_FILE).stat().st_mtime_ns
    build_pretrained(tiny_root, a, config, progress=False)  # current: kept as it is
    assert (a / RECORD_FILE).stat().st_mtime_ns == stamp
    frames, labels, fingerprint = load_frames(tiny_root)
    assert frames.dtype == torch.uint8 and frames.shape == (576, 3, 64, 64) and len(labels) == 576
    assert fingerprint["videos"] == 48 and len(fingerprint["shards"]) == 3


def test_command_refuses_bad_settings_and_a_set_that_is_not_synthetic(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert pretrain_main(["--steps", "0", "--root", str(tmp_path)]) == 2
    assert "--steps" in capsys.readouterr().err
    (tmp_path / "train").mkdir()
    assert pretrain_main(["--root", str(tmp_path), "--size", "tiny", "--no-progress", "--out", str(tmp_path / "o")]) != 0


def test_a_missing_pretrained_backbone_names_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    from tvr_bench.cli import EXIT_CONFIG, main

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)  # no data/synthetic-default/tiny-pretrained here
    configs = [a for c in ("base", "methods/clip4clip", "data/synthetic") for a in ("--config", str(repo / "recipes" / f"{c}.yaml"))]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *configs])
    assert exit_info.value.code == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "tiny-pretrained' does not exist" in err and "tvr-bench pretrain --size default" in err
