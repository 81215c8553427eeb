"""Temporal probes (`--evaluator.probes`): the frame transforms, and a real test run in which a video side that
ignores frame order (CLIP4Clip meanP) scores exactly as without the probe while seqTransf does not."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.data_fixtures import tiny_root  # noqa: F401 - pytest fixture
from tvr_bench.callbacks.evaluator import RetrievalEvaluator
from tvr_bench.callbacks.leaderboard import LeaderboardWriter
from tvr_bench.data.benchmarks.synthetic import SyntheticDataModule
from tvr_bench.data.transforms import normalize_batch
from tvr_bench.methods.clip4clip import CLIP4Clip
from tvr_bench.probes import PROBES, check_probes, frame_order, probe_frames
from tvr_bench.report import build_leaderboard


def test_frame_orders_on_known_inputs() -> None:
    assert frame_order("reversed", 4) == [3, 2, 1, 0]
    assert frame_order("middle", 5) == [2] * 5 and frame_order("middle", 4) == [2] * 4
    shuffled = frame_order("shuffled", 6, "video-1")
    assert sorted(shuffled) == list(range(6)) and shuffled != list(range(6))
    assert shuffled == frame_order("shuffled", 6, "video-1") and frame_order("shuffled", 1, "v") == [0]
    assert {tuple(frame_order("shuffled", 6, f"video-{i}")) for i in range(8)} != {tuple(shuffled)}  # per key
    assert check_probes("all") == tuple(PROBES) and check_probes(["middle", "reversed"]) == ("reversed", "middle")
    assert check_probes("shuffled,middle") == ("shuffled", "middle") and check_probes(None) == ()
    with pytest.raises(ValueError, match="unknown temporal probe"):
        check_probes(["backwards"])


def test_probe_frames_move_only_the_valid_frames() -> None:
    frames = torch.arange(2 * 4, dtype=torch.float32).view(2, 4, 1, 1, 1).expand(2, 4, 3, 2, 2).clone()
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    out = probe_frames(frames, mask, "reversed", ["a", "b"])
    assert out[:, :, 0, 0, 0].tolist() == [[3, 2, 1, 0], [6, 5, 4, 7]]  # the padded slot stays
    out = probe_frames(frames, mask, "middle", ["a", "b"])
    assert out[:, :, 0, 0, 0].tolist() == [[2, 2, 2, 2], [5, 5, 5, 7]]
    features = torch.randn(2, 4, 8)  # cached frame features [B, F, D] move the same way
    assert torch.equal(probe_frames(features, mask, "reversed", ["a", "b"])[0], features[0].flip(0))
    with pytest.raises(ValueError, match="valid frames first"):
        probe_frames(frames, torch.tensor([[True, False, True, True], [True] * 4]), "reversed", ["a", "b"])


def _test_run(root: Path, runs: Path, model: L.LightningModule, probes: list[str]) -> tuple[Path, dict]:
    """A real test of `model` on the tiny synthetic test set with the probes, writing the result JSON."""
    evaluator = RetrievalEvaluator(probes=probes, print_table=False, bootstrap_resamples=200)
    writer = LeaderboardWriter(runs_dir=str(runs), seed=0, bootstrap_resamples=200, qualitative=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[evaluator, writer],
                        default_root_dir=str(runs))
    dm = SyntheticDataModule(size="tiny", root=str(root), num_workers=0, eval_batch_size=8)
    trainer.test(model, datamodule=dm, verbose=False)
    return writer.last_path, json.loads(writer.last_path.read_text())


def test_probes_equal_the_plain_score_when_the_video_side_ignores_order(tiny_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    path, result = _test_run(tiny_root, tmp_path / "runs", CLIP4Clip(backbone="tiny"), ["all"])
    probes = result["probes"]["probes"]
    assert list(probes) == ["reversed", "shuffled", "middle"]
    for name in ("reversed", "shuffled"):  # meanP averages the frames: order cannot matter
        assert probes[name]["metrics"] == result["metrics"], name
        assert probes[name]["drop"]["t2v/R@1"]["value"] == 0.0 and probes[name]["drop"]["t2v/R@1"]["p"] == 1.0
    assert probes["middle"]["metrics"] != result["metrics"]  # a still video is another video
    assert result["probes"]["cost"]["video_encodings_per_probe"] == 1
    # no training step: the run is the backbone's zero-shot row, labelled apart from fine-tuned rows
    assert result["protocol"]["training"] == "zero-shot" and result["protocol"]["variant"] == "training=zero-shot"
    assert path.name == "clip4clip__synthetic__tiny__training-zero-shot__seed0.json"
    # diagnostics by caption type: the five synthetic types, 16 captions each
    by_type = result["diagnostics"]["caption_types"]
    assert list(by_type) == ["full", "first", "second", "order", "objects"]
    assert all(e["queries"] == 16 and set(e["metrics"]) == {"t2v/R@1", "t2v/R@5"} for e in by_type.values())
    mean_r1 = sum(e["metrics"]["t2v/R@1"] for e in by_type.values()) / 5
    assert mean_r1 == pytest.approx(result["metrics"]["t2v/R@1"])  # equal counts per type
    assert set(probes["reversed"]["caption_types"]) == set(by_type)
    built = build_leaderboard(path.parents[1])
    md = built["paths"]["md"].read_text()
    assert "## Diagnostics by caption type" in md and "## Temporal probes" in md
    assert "clip4clip (training=zero-shot)" in md
    assert built["paths"]["diagnostics_png"].stat().st_size > 1000


@torch.no_grad()
def test_an_order_aware_head_sees_the_probe(tiny_root: Path) -> None:
    dm = SyntheticDataModule(size="tiny", root=str(tiny_root), num_workers=0, eval_batch_size=4)
    batch = normalize_batch(next(iter(dm.test_dataloader())))
    frames, mask, keys = batch["frames"], batch["frame_mask"], batch["video_key"]
    torch.manual_seed(0)
    for head, order_matters in (("meanP", False), ("seqTransf", True)):
        model = CLIP4Clip(backbone="tiny", head=head, temporal_layers=1).eval()
        plain = model.encode_video(frames, mask)["embeds"]
        for probe in ("reversed", "shuffled"):
            moved = model.encode_video(probe_frames(frames, mask, probe, keys), mask)["embeds"]
            assert torch.allclose(plain, moved, atol=1e-6) != order_matters, (head, probe)
        still = model.encode_video(probe_frames(frames, mask, "middle", keys), mask)["embeds"]
        assert not torch.allclose(plain, still, atol=1e-4)
