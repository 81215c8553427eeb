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
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

from tvr_bench.perf.data_bench import bench_data, bench_data_memory
from tvr_bench.perf.data_bench import render as render_data
from tvr_bench.perf.data_bench import render_memory as render_data_memory
from tvr_bench.perf.eval_bench import EVAL_METHODS, bench_eval
from tvr_bench.perf.eval_bench import render as render_eval
from tvr_bench.perf.harness import FULL, QUICK, SCHEMA, TARGETS, load_average, machine_info
from tvr_bench.perf.metrics_bench import bench_metrics
from tvr_bench.perf.metrics_bench import render as render_metrics
from tvr_bench.perf.postproc_bench import TARGET_SECONDS as POSTPROC_TARGET_SECONDS
from tvr_bench.perf.search_bench import TARGETS as SEARCH_TARGETS
from tvr_bench.perf.train_bench import bench_train
from tvr_bench.perf.train_bench import render as render_train

#: Every target in the report: the shared table (perf/harness.py), then those the search (issue 20) and
#: post-processing (issue 19) sections own.
REPORT_TARGETS = {**TARGETS, **SEARCH_TARGETS, "postproc_seconds": POSTPROC_TARGET_SECONDS}


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
        lines += render_metrics(sec["metrics"])
    if "train" in sec:
        lines += render_train(sec["train"])
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
