"""`tvr-bench perf`: the suite's performance figures, each measured side by side with its baseline.

Sections (all in one run, on one machine; see docs/scaling.md for the figures and how to read them):

* **data**: clips/s of the shard DataModule (12 stored JPEGs per clip, 224 px) vs decoding the same mp4
  files per item the reference way (PyAV decode, 1 fps frames, resize, crop, normalise, pick 12) vs the
  bare JPEG-decode ceiling of the very frames the shards store. Rounds interleave the three.
* **eval**: for every method's scorer at N x N (default 1000; D 512, 12 frames, 32 words for DRL, M 20 for
  T-MASS), time and peak memory of the blocked scorer vs the one-shot scorer of the same math, and the
  max |difference|; each scorer runs in its own fresh process (peak RSS growth over its inputs).
  X-Pool / T-MASS / EMCL come from `tvr_bench.perf.eval_scorers`, DRL from `tvr_bench.perf.drl_scorer`, TS2-Net from `tvr_bench.perf.ts2net_scorer`,
  X-CLIP from `tvr_bench.perf.xclip_scorer` (32 words; its one-shot math beyond N = 250 on 128 texts, scaled).
* **metrics**: `tvr_bench.metrics.retrieval_metrics` vs torchmetrics' retrieval metrics on one matrix.
* **train**: steps/s of the Lightning module (Trainer.fit) vs a plain PyTorch loop over the same model
  and the same in-memory batches, interleaved step by step (median of the paired step-time ratios).

The machine is noisy (../shared/anchors/perf.md): every ratio compares figures from the same run, and
the load average at start and end is recorded with them.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from tvr_bench.perf.data_bench import bench_data, bench_data_memory
from tvr_bench.perf.data_bench import render as render_data
from tvr_bench.perf.data_bench import render_memory as render_data_memory
from tvr_bench.perf.eval_bench import EVAL_METHODS, bench_eval
from tvr_bench.perf.eval_bench import render as render_eval
from tvr_bench.perf.harness import (FULL, QUICK, SCHEMA, TARGETS, PerfSizes, _fmt, _mark, load_average,
                                    machine_info, median)
from tvr_bench.perf.postproc_bench import TARGET_SECONDS as POSTPROC_TARGET_SECONDS
from tvr_bench.perf.search_bench import TARGETS as SEARCH_TARGETS

#: Every target in the report: the shared table (perf/harness.py), then those the search (issue 20) and
#: post-processing (issue 19) sections own.
REPORT_TARGETS = {**TARGETS, **SEARCH_TARGETS, "postproc_seconds": POSTPROC_TARGET_SECONDS}


# ================================================================================================ metrics
def bench_metrics(n: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    """`retrieval_metrics` (10 metrics, both directions) vs torchmetrics R@1/5/10 + MRR (both directions)."""
    import torchmetrics.retrieval as tmr

    from tvr_bench.metrics import retrieval_metrics

    g = torch.Generator().manual_seed(seed)
    sim = torch.rand(n, n, generator=g) + 0.5 * torch.eye(n)  # positive scores: torchmetrics counts <= 0 as a miss
    t2v = torch.arange(n)
    target = torch.eye(n, dtype=torch.bool)
    indexes = torch.arange(n)[:, None].expand(n, n)
    tm = {f"R@{k}": tmr.RetrievalRecall(top_k=k) for k in (1, 5, 10)}
    tm["MRR"] = tmr.RetrievalMRR()

    def ours() -> dict[str, float]:
        return retrieval_metrics(sim, t2v)

    def theirs() -> dict[str, float]:
        out = {}
        for direction, s in (("t2v", sim), ("v2t", sim.t())):
            for name, metric in tm.items():
                out[f"{direction}/{name}"] = float(metric(s.flatten(), target.flatten(), indexes=indexes.flatten()))
        return out

    times: dict[str, list[float]] = {"ours": [], "torchmetrics": []}
    results: dict[str, dict[str, float]] = {}
    for i in range(repeats + 1):
        for name, fn in (("ours", ours), ("torchmetrics", theirs)):
            t0 = time.perf_counter()
            results[name] = fn()
            if i:
                times[name].append(time.perf_counter() - t0)
    agree = max(abs(results["ours"][f"{d}/R@{k}"] - 100 * results["torchmetrics"][f"{d}/R@{k}"])
                for d in ("t2v", "v2t") for k in (1, 5, 10))  # fmt: skip
    return {
        "n": n,
        "ours_seconds": median(times["ours"]),
        "torchmetrics_seconds": median(times["torchmetrics"]),
        "speedup": median(times["torchmetrics"]) / median(times["ours"]),
        "seconds_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "recall_max_abs_diff_percent": agree,
        "note": "ours: R@1/5/10, MdR, MnR in both directions (10 numbers); torchmetrics: R@1/5/10 and MRR in both "
                "directions (8 numbers; it has no median/mean rank). Median after 1 warm-up.",
    }  # fmt: skip


# ================================================================================================ train
class _Batches:
    """A sized iterable over a fixed list of batches (Lightning treats a plain list as several loaders)."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.batches)


def _train_batches(n: int, batch_size: int, image_size: int = 64, frames: int = 12, seed: int = 0) -> list[dict[str, Any]]:
    """`n` synthetic training batches in the DataModule's format (normalised frames, captions, keys)."""
    g = torch.Generator().manual_seed(seed)
    words = "a the red blue green square circle moves left right up down then before after slowly quickly".split()
    rng = np.random.default_rng(seed)
    out = []
    for b in range(n):
        out.append({
            "frames": torch.randn(batch_size, frames, 3, image_size, image_size, generator=g),
            "frame_mask": torch.ones(batch_size, frames, dtype=torch.bool),
            "captions": [" ".join(rng.choice(words, size=int(rng.integers(5, 14)))) for _ in range(batch_size)],
            "video_key": [f"b{b}-{i}" for i in range(batch_size)],
        })  # fmt: skip
    return out


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_train(sizes: PerfSizes, accelerator: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Step time of Trainer.fit vs a plain PyTorch loop, interleaved step by step: two copies of one CLIP4Clip
    (tiny) init see the same batches; after each Lightning step, a callback runs the plain loop's step."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from tvr_bench.functional.losses import clamp_logit_scale_
    from tvr_bench.methods.clip4clip import CLIP4Clip

    torch.manual_seed(seed)
    template = CLIP4Clip(backbone="tiny", freeze="none", lr=5e-4, backbone_lr=5e-4)
    steps = sizes.train_warmup + sizes.train_steps
    batches = _train_batches(steps, sizes.train_batch, seed=seed)

    class PlainLoop:
        """The plain PyTorch training loop, one step per call, on its own copy of the model."""

        def __init__(self, device: torch.device) -> None:
            self.device = device
            self.model = copy.deepcopy(template).to(device).train()
            conf = self.model.configure_optimizers()
            self.opt, self.sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]

        def step(self, batch: dict[str, Any]) -> None:
            model = self.model
            frames, mask = batch["frames"].to(self.device), batch["frame_mask"].to(self.device)
            with torch.enable_grad():
                text = model.encode_text(**model.tokenize(batch["captions"]))
                video = model.encode_video(frames, mask)
                loss, _ = model.training_loss(text, video)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                self.opt.step()
                self.sched.step()
                clamp_logit_scale_(model.backbone.logit_scale, model.hparams.logit_scale_max)

    class PairedClock(Callback):
        """Times every Lightning step (between consecutive step starts, minus the plain step run in between)
        and runs + times the plain loop's step on the same batch right after it."""

        def __init__(self) -> None:
            self.starts: list[float] = []
            self.plain: list[float] = []
            self.loop: PlainLoop | None = None
            self.device = "cpu"

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            _sync(pl_module.device)
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if self.loop is None:
                self.loop = PlainLoop(pl_module.device)
                self.device = str(pl_module.device)
            _sync(pl_module.device)
            t0 = time.perf_counter()
            self.loop.step(batches[batch_idx])
            _sync(pl_module.device)
            self.plain.append(time.perf_counter() - t0)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            _sync(pl_module.device)
            self.starts.append(time.perf_counter())

    clock = PairedClock()
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, max_steps=steps, max_epochs=1, precision="32-true",
        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clock],
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer.fit(copy.deepcopy(template), train_dataloaders=_Batches(batches))
    wall = time.perf_counter() - t0
    s = clock.starts
    lightning = [b - a - p for a, b, p in zip(s, s[1:], clock.plain)][sizes.train_warmup :]
    plain = clock.plain[sizes.train_warmup :]
    ratios = [a / b for a, b in zip(lightning, plain)]
    overhead = median(ratios) - 1.0
    return {
        "model": "CLIP4Clip meanP, tiny CLIP preset (random init), all parameters trained",
        "device": clock.device,
        "batch_size": sizes.train_batch,
        "frames": 12,
        "image_size": 64,
        "timed_steps": sizes.train_steps,
        "warmup_steps": sizes.train_warmup,
        "lightning_steps_per_s": 1.0 / median(lightning),
        "plain_steps_per_s": 1.0 / median(plain),
        "overhead": overhead,
        "overhead_of_medians": median(lightning) / median(plain) - 1.0,
        "pair_ratios": [round(x, 4) for x in ratios],
        "step_seconds_all": {"lightning": [round(x, 4) for x in lightning], "plain": [round(x, 4) for x in plain]},
        "fit_wall_seconds": round(wall, 2),
        "targets_met": {"overhead": overhead <= TARGETS["train_overhead"]},
        "note": "overhead = median over steps of (Lightning step / plain step of the same batch) - 1. One Trainer.fit; "
                "after each of its steps a callback runs the plain loop's step on the same batch with a second "
                "copy of the same initial model, so both see the same phase of a noisy machine. Lightning step = "
                "time between consecutive step starts minus the plain step run in between (data fetch, forward, "
                "backward, clip, AdamW, scheduler, temperature clamp, plus its loop, hooks and 3 self.log calls); "
                "plain step = the same work in a bare loop. Warm-up steps dropped.",
    }  # fmt: skip


def render_markdown(result: dict[str, Any]) -> str:
    """A short Markdown summary of a perf result (ratios first, absolute figures beside them)."""
    m = result["machine"]
    device = m.get("gpu") or "no GPU"
    lines = [
        "# tvr-bench perf",
        "",
        f"`{result['command']}` on {m['cpu']} ({m['cpu_count']} cores, {m.get('memory_gib', '?')} GiB), {device}; "
        f"torch {m['torch']}, {m['torch_threads']} threads; load average {result['load_start']} → {result['load_end']}; "
        f"{result['seconds']:.0f} s in all{' (quick sizes)' if result['quick'] else ''}.",
        "Every ratio compares figures measured side by side in this run.",
        "",
    ]
    sec = result["sections"]
    if "data" in sec:
        lines += render_data(sec["data"])
    if "data-memory" in sec:
        lines += render_data_memory(sec["data-memory"])
    if "eval" in sec:
        lines += render_eval(sec["eval"])
    if "metrics" in sec:
        x = sec["metrics"]
        lines += [
            f"## Metrics ({x['n']} × {x['n']})",
            "",
            f"`retrieval_metrics` (R@1/5/10, MdR, MnR, both directions) {x['ours_seconds'] * 1000:.1f} ms vs "
            f"torchmetrics (R@1/5/10 + MRR, both directions) {x['torchmetrics_seconds'] * 1000:.1f} ms: "
            f"**{_fmt(x['speedup'], 1)}× faster**; recalls agree within {x['recall_max_abs_diff_percent']:.1e} points.",
            "",
        ]
    if "train" in sec:
        t = sec["train"]
        lines += [
            f"## Training loop ({t['model']}, batch {t['batch_size']} × 12 frames at 64 px, {t['device']})",
            "",
            f"Lightning {t['lightning_steps_per_s']:.2f} steps/s vs plain PyTorch {t['plain_steps_per_s']:.2f} steps/s "
            f"(median steps, interleaved step by step); overhead (median of the {len(t['pair_ratios'])} paired steps): "
            f"**{100 * t['overhead']:+.1f} %** (target ≤ 5 % {_mark(t['targets_met']['overhead'])}).",
            "",
        ]
    if "features" in sec:
        from tvr_bench.perf.features_bench import render as render_features

        lines += render_features(sec["features"])
    if "intervals" in sec:
        from tvr_bench.perf.intervals_bench import render as render_intervals

        lines += render_intervals(sec["intervals"])
    if "precision" in sec:
        from tvr_bench.perf.precision_bench import render as render_precision

        lines += render_precision(sec["precision"])
    if "train-order" in sec:
        from tvr_bench.perf.train_order_bench import render as render_train_order

        lines += render_train_order(sec["train-order"])
    if "search" in sec:
        from tvr_bench.perf.search_bench import render as render_search

        lines += render_search(sec["search"])
    if "postproc" in sec:
        from tvr_bench.perf.postproc_bench import render as render_postproc

        lines += render_postproc(sec["postproc"])
    return "\n".join(lines)


SECTIONS = ("data", "data-memory", "eval", "metrics", "train", "features", "intervals", "precision", "train-order", "search",
            "postproc")


def _bench_features(work: Path, quick: bool, accelerator: str) -> dict[str, Any]:
    """Section `features`: head training on cached frozen features vs encoding frames (perf/features_bench.py)."""
    from tvr_bench.perf.features_bench import bench_features

    sizes = {"steps": 6, "warmup": 2, "rounds": 1} if quick else {"steps": 12, "warmup": 3, "rounds": 2}
    return bench_features(work, accelerator=accelerator, **sizes)


def _bench_precision(result: dict[str, Any], quick: bool) -> dict[str, Any]:
    """Section `precision`: train steps/s at 32-true vs bf16-mixed on CUDA ('no CUDA' otherwise) and the workers that
    feed one H100, at the per-core DataModule rate of this run's data section (1 worker, else 0 workers)."""
    from tvr_bench.perf.precision_bench import bench_precision

    rates = result["sections"].get("data", {}).get("clips_per_s", {})
    source = "1 worker" if rates.get("datamodule_1_worker") else "0 workers"
    per_core = rates.get("datamodule_1_worker") or rates.get("datamodule_0_workers")
    return bench_precision(quick, per_core, source)


def perf_main(argv: list[str]) -> int:
    """`tvr-bench perf [--out runs/perf.json] [--quick] [--sections ...]`: run the benchmarks, write JSON + Markdown."""
    parser = argparse.ArgumentParser(prog="tvr-bench perf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/perf.json", help="result JSON (the Markdown summary goes next to it, .md)")
    parser.add_argument("--md", default=None, help="Markdown summary path (default: --out with .md)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (N = 250, fewer clips and rounds): a smoke run")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument("--methods", default=",".join(EVAL_METHODS), help="eval section: comma-separated methods")
    parser.add_argument("--work-dir", default="runs/perf-data", help="generated clips and shards (reused across runs)")
    parser.add_argument("--accelerator", default="auto", help="training section: Lightning accelerator (auto picks a GPU)")
    parser.add_argument("--search-methods", default="", help="search section: comma-separated recipes (default: all built-in)")
    parser.add_argument("--drl-reference-loop", action="store_true",
                        help="eval section: also time DRL's reference-style 32 x 32 block loop (minutes at N = 1000)")
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    sizes = QUICK if args.quick else FULL
    if args.drl_reference_loop:
        sizes = dataclasses.replace(sizes, drl_reference_loop=True)
    out = Path(args.out)
    md = Path(args.md) if args.md else out.with_suffix(".md")
    start = time.perf_counter()
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "command": "tvr-bench perf " + " ".join(argv),
        "quick": args.quick,
        "sizes": dataclasses.asdict(sizes),
        "machine": machine_info(),
        "targets": REPORT_TARGETS,
        "load_start": load_average(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sections": {},
        "section_seconds": {},
    }
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "data": lambda: bench_data(Path(args.work_dir), sizes),
        "data-memory": lambda: bench_data_memory(Path(args.work_dir), sizes),
        "eval": lambda: bench_eval(sizes, [m.strip() for m in args.methods.split(",") if m.strip()]),
        "metrics": lambda: bench_metrics(sizes.metrics_n, sizes.metrics_repeats),
        "train": lambda: bench_train(sizes, args.accelerator),
        "features": lambda: _bench_features(Path(args.work_dir), args.quick, args.accelerator),
        "intervals": lambda: __import__("tvr_bench.perf.intervals_bench", fromlist=["x"]).bench_intervals(args.quick),
        "precision": lambda: _bench_precision(result, args.quick),
        "train-order": lambda: __import__("tvr_bench.perf.train_order_bench", fromlist=["x"]).bench_train_order(Path(args.work_dir), args.quick),
        "search": lambda: __import__("tvr_bench.perf.search_bench", fromlist=["x"]).bench_search(
            Path(args.work_dir), out.parent, args.quick, [m.strip() for m in args.search_methods.split(",") if m.strip()] or None),
        "postproc": lambda: __import__("tvr_bench.perf.postproc_bench", fromlist=["x"]).bench_postproc(args.quick),
    }
    for name in sections:
        t0 = time.perf_counter()
        print(f"[perf] {name} ...", file=sys.stderr, flush=True)
        result["sections"][name] = runners[name]()
        result["section_seconds"][name] = round(time.perf_counter() - t0, 1)
        print(f"[perf] {name} done in {result['section_seconds'][name]} s", file=sys.stderr, flush=True)
    result["load_end"] = load_average()
    result["seconds"] = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
    text = render_markdown(result)
    md.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(perf_main(sys.argv[1:]))
