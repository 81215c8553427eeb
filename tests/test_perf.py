"""`tvr-bench perf` pieces: the per-item decoder and the shards see the same frames; metrics and summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tvr_bench.perf.run import PerfSizes, bench_metrics, decode_per_item, make_clips, perf_main, prepare_clip_shards


@pytest.fixture(scope="module")
def small_clip_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    """One 320x240, 12 s, 10 fps clip and its shards (stored twice)."""
    base = tmp_path_factory.mktemp("perf")
    sizes = PerfSizes(clips=1, clip_width=320, clip_height=240, clip_fps=10, clip_seconds=12, copies=2)
    clips = make_clips(base / "clips", sizes)
    return clips, prepare_clip_shards(clips, base / "shards", sizes.copies)


def test_per_item_decoder_and_shard_datamodule_deliver_the_same_frames(small_clip_root: tuple[list[Path], Path]) -> None:
    """Both sides of the data benchmark do the same work: same 12 frames (up to JPEG q95 loss), same shape."""
    from tvr_bench.data.datamodule import RetrievalDataModule

    clips, root = small_clip_root
    seek = decode_per_item(clips[0])
    sequential = decode_per_item(clips[0], seek=False)
    assert seek.shape == (12, 3, 224, 224) and torch.equal(seek, sequential)
    dm = RetrievalDataModule(root=str(root), dataset="perf", num_frames=12, image_size=224, eval_batch_size=4, num_workers=0)
    batches = list(dm.test_dataloader())
    from tvr_bench.data.transforms import normalize_batch

    frames = torch.cat([normalize_batch(b)["frames"] for b in batches])
    assert frames.shape == (2, 12, 3, 224, 224) and bool(torch.cat([b["frame_mask"] for b in batches]).all())
    assert float((frames[0] - seek).abs().mean()) < 0.05  # CLIP-normalised units: a couple of grey levels
    assert torch.equal(frames[0], frames[1])  # the copies are the same sample under another key


def test_metrics_bench_agrees_with_torchmetrics() -> None:
    """Our recalls equal torchmetrics' on the benchmark matrix."""
    result = bench_metrics(n=200, repeats=1)
    assert result["recall_max_abs_diff_percent"] < 1e-4
    assert result["ours_seconds"] > 0 and result["torchmetrics_seconds"] > 0


def test_perf_main_writes_json_and_markdown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tvr-bench perf --sections metrics` writes the JSON (machine, load, targets) and the Markdown summary."""
    import dataclasses

    import tvr_bench.perf.run as run

    monkeypatch.setattr(run, "QUICK", dataclasses.replace(run.QUICK, metrics_n=100, metrics_repeats=1))
    out = tmp_path / "perf.json"
    assert perf_main(["--quick", "--sections", "metrics", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["schema"] == "tvr-bench/perf/v1" and set(result["sections"]) == {"metrics"}
    assert result["machine"]["cpu_count"] and "torch" in result["machine"]
    md = (tmp_path / "perf.md").read_text()
    assert md.startswith("# tvr-bench perf") and "## Metrics (100 × 100)" in md
    with pytest.raises(SystemExit):
        perf_main(["--sections", "nope"])
