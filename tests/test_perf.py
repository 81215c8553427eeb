"""`tvr-bench perf` pieces: the per-item decoder and the shards see the same frames; metrics and summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tvr_bench.perf.data_bench import decode_per_item, prepare_clip_shards
from tvr_bench.perf.harness import PerfSizes, make_clips
from tvr_bench.perf.metrics_bench import bench_metrics
from tvr_bench.perf.run import perf_main


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


def test_precision_step_timer_runs_both_precisions_on_cpu() -> None:
    """The CUDA-only precision section's step timer (Trainer + clock callback) works at 32-true and bf16-mixed."""
    from tvr_bench.perf.precision_bench import _batches, _steps_per_s

    batches = _batches(4, 2, 2, 64, torch.device("cpu"), seed=0)
    assert batches[0]["frames"].shape == (2, 2, 3, 64, 64) and len(batches[0]["captions"]) == 2
    for precision in ("32-true", "bf16-mixed"):
        rate = _steps_per_s(precision, "tiny", batches, warmup=1, accelerator="cpu")
        assert 0 < rate < float("inf")


def test_precision_section_summary_and_report_with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """With CUDA present the section reports both precisions, the bf16 speed-up and the workers that feed the GPU."""
    import tvr_bench.perf.precision_bench as pb

    rates = {"32-true": [2.0, 2.2], "bf16-mixed": [5.0, 4.6]}
    calls: list[str] = []

    def fake_rate(precision: str, *args: object, **kwargs: object) -> float:
        calls.append(precision)
        return rates[precision][sum(1 for c in calls if c == precision) - 1]

    monkeypatch.setattr(pb.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pb.torch.cuda, "get_device_name", lambda index=0: "Fake GPU")
    monkeypatch.setattr(pb, "_batches", lambda *args, **kwargs: [])
    monkeypatch.setattr(pb, "_steps_per_s", fake_rate)
    sec = pb.bench_precision(quick=False, per_core_clips_per_s=50.0, per_core_source="1 worker")
    assert calls == ["32-true", "bf16-mixed"] * 2  # rounds alternate the two precisions
    assert sec["steps_per_s"] == {"32-true": 2.1, "bf16-mixed": 4.8}
    assert sec["bf16_speedup"] == pytest.approx(4.8 / 2.1)
    assert sec["measured_feed"]["workers"] == 4  # 4.8 steps/s x 32 clips = 153.6 clips/s at 50 per core
    assert sec["h100_feed"]["workers"] == 5  # 250 clips/s at 50 per core
    text = "\n".join(pb.render(sec))
    assert "Fake GPU" in text and "**2.29×**" in text and "4 loader workers" in text and "(data section, 1 worker)" in text


def test_emcl_scorers_equal_their_one_shot_math() -> None:
    """`make perf`'s EMCL variants: the evaluator's 32 x 32 blocks equal every block batched at once (ragged last
    blocks included), and the pairwise scorer under a tiny budget equals all pairs batched."""
    from tvr_bench.perf.eval_scorers import run_emcl_variant

    args = dict(frames=4, d=32, bases=8, repeats=1, budget_mb=0.05, seed=0, threads=None)
    sims = {v: run_emcl_variant(v, 40 if not v.startswith("pair") else 7, **args)["sim"]
            for v in ("blocked", "one_shot", "pair_blocked", "pair_one_shot")}  # fmt: skip
    assert sims["blocked"].shape == (40, 40) and sims["pair_blocked"].shape == (7, 7)
    assert float((sims["blocked"] - sims["one_shot"]).abs().max()) <= 1e-5
    assert float((sims["pair_blocked"] - sims["pair_one_shot"]).abs().max()) <= 1e-5


def test_train_order_section_rows_on_known_orders(tmp_path: Path) -> None:
    """The section's statistics on known orders (a sequential stream, a uniform permutation), then the section
    end to end at 150 videos x 20 captions: the loader meets every target that is not statistical at this size."""
    import numpy as np

    from tvr_bench.perf.train_order_bench import bench_train_order, order_statistics, render, uniform_epoch

    sequential = [np.stack([np.arange(j * 128, (j + 1) * 128) // 20, np.arange(j * 128, (j + 1) * 128) % 20], axis=1) for j in range(70)]
    seq = order_statistics(sequential, 448)
    assert seq["consecutive_mean_corr"] > 0.99 and seq["spread"] < 0.1 and seq["pairs_never_seen"] == 0
    assert seq["min_distinct_per_batch"] == 7 and seq["batch_last_video_first_seen"] == 70
    uniform = order_statistics(uniform_epoch(448), 448)
    assert 0.97 < uniform["spread"] < 1.02 and uniform["pairs_never_seen"] == 448 * 20 % 128
    section = bench_train_order(tmp_path, videos=150, configs=(("0 workers", 0, 1), ("2 ranks x 2 workers", 2, 2)))
    for name in ("0 workers", "2 ranks x 2 workers"):
        s, met = section["runs"][name], section["targets_met"][name]
        assert met["pairs_once"] and met["distinct"] and s["batches"] == 3000 // 128
    lines = render(section)
    assert lines[0].startswith("## Training order (150 videos") and any("pairs never seen" in line for line in lines)


@pytest.mark.slow
def test_xclip_scorer_bench_agrees_and_reports_its_floor() -> None:
    """The X-CLIP eval-section benchmark (two spawned processes): blocked == one-shot on the rows the one-shot ran,
    the scaled one-shot is marked, and the summary and report lines name the work ratio."""
    import tvr_bench.perf.eval_bench as eval_bench
    from tvr_bench.perf.xclip_scorer import bench_xclip

    raw = bench_xclip(n=40, words=8, frames=4, d=16, repeats=1, budget_mb=64.0, one_shot_rows=10)
    assert raw["max_abs_diff"] <= 1e-5 and raw["blocked_within_budget"]
    assert raw["one_shot"]["rows_run"] == 10 and raw["one_shot"]["estimated_from_rows"]
    assert raw["one_shot"]["seconds"] == pytest.approx(4 * raw["one_shot"]["seconds_measured"])
    summary = eval_bench._eval_summary("xclip", raw, "blocked")
    assert summary["targets_met"]["equal"] and summary["one_shot_estimated_from_rows"] == 10
    lines = eval_bench._floor_lines({"product_seconds": raw["product_seconds"], "summary": {"xclip": summary}})
    assert any(line.startswith("- xclip: blocked scorer") and "first 10 texts" in line for line in lines)
