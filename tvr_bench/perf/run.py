"""`tvr-bench perf`: the suite's performance figures, each measured side by side with its baseline.

Sections (all in one run, on one machine; see docs/scaling.md for the figures and how to read them), each in its own
module with a `bench_<name>(...) -> dict` and a `render(section) -> list[str]` (Markdown lines): `data` and
`data-memory` (data_bench.py), `eval` (eval_bench.py), `metrics` (metrics_bench.py), `train` (train_bench.py),
`features`, `intervals`, `precision`, `train-order`, `search`, `postproc` (<name>_bench.py). What they share lives in
harness.py. This module holds only the registry (`SECTIONS`: each section's runner and renderer) and the command.

The machine is noisy (../shared/anchors/perf.md): every ratio compares figures from the same run, and
the load average at start and end is recorded with them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tvr_bench.perf import (data_bench, eval_bench, features_bench, intervals_bench, metrics_bench, postproc_bench,
                            precision_bench, search_bench, train_bench, train_order_bench)
from tvr_bench.perf.harness import FULL, QUICK, SCHEMA, TARGETS, PerfSizes, load_average, machine_info

#: Every target in the report: the shared table (perf/harness.py), then those the search (issue 20) and
#: post-processing (issue 19) sections own.
REPORT_TARGETS = {**TARGETS, **search_bench.TARGETS, "postproc_seconds": postproc_bench.TARGET_SECONDS}


@dataclass(frozen=True)
class RunOptions:
    """What a section runner reads: the parsed command line, the run's sizes and the report so far."""

    args: argparse.Namespace
    sizes: PerfSizes
    result: dict[str, Any]

    @property
    def work(self) -> Path:
        """The folder of generated clips and shards (reused across runs)."""
        return Path(self.args.work_dir)


@dataclass(frozen=True)
class Section:
    """One section of the report: its runner (-> the section's JSON) and its renderer (-> Markdown lines)."""

    run: Callable[[RunOptions], dict[str, Any]]
    render: Callable[[dict[str, Any]], list[str]]


def _names(text: str) -> list[str]:
    """The names of a comma-separated list, stripped, empty ones dropped."""
    return [m.strip() for m in text.split(",") if m.strip()]


def _bench_features(o: RunOptions) -> dict[str, Any]:
    """Section `features`: head training on cached frozen features vs encoding frames (perf/features_bench.py)."""
    sizes = {"steps": 6, "warmup": 2, "rounds": 1} if o.args.quick else {"steps": 12, "warmup": 3, "rounds": 2}
    return features_bench.bench_features(o.work, accelerator=o.args.accelerator, **sizes)


def _bench_precision(o: RunOptions) -> dict[str, Any]:
    """Section `precision`: train steps/s at 32-true vs bf16-mixed on CUDA ('no CUDA' otherwise) and the workers that
    feed one H100, at the per-core DataModule rate of this run's data section (1 worker, else 0 workers)."""
    rates = o.result["sections"].get("data", {}).get("clips_per_s", {})
    source = "1 worker" if rates.get("datamodule_1_worker") else "0 workers"
    per_core = rates.get("datamodule_1_worker") or rates.get("datamodule_0_workers")
    return precision_bench.bench_precision(o.args.quick, per_core, source)


#: The sections, in the report's order: name -> runner and renderer.
SECTIONS: dict[str, Section] = {
    "data": Section(lambda o: data_bench.bench_data(o.work, o.sizes), data_bench.render),
    "data-memory": Section(lambda o: data_bench.bench_data_memory(o.work, o.sizes), data_bench.render_memory),
    "eval": Section(lambda o: eval_bench.bench_eval(o.sizes, _names(o.args.methods)), eval_bench.render),
    "metrics": Section(lambda o: metrics_bench.bench_metrics(o.sizes.metrics_n, o.sizes.metrics_repeats), metrics_bench.render),
    "train": Section(lambda o: train_bench.bench_train(o.sizes, o.args.accelerator), train_bench.render),
    "features": Section(_bench_features, features_bench.render),
    "intervals": Section(lambda o: intervals_bench.bench_intervals(o.args.quick), intervals_bench.render),
    "precision": Section(_bench_precision, precision_bench.render),
    "train-order": Section(lambda o: train_order_bench.bench_train_order(o.work, o.args.quick), train_order_bench.render),
    "search": Section(lambda o: search_bench.bench_search(o.work, Path(o.args.out).parent, o.args.quick,
                                                          _names(o.args.search_methods) or None), search_bench.render),
    "postproc": Section(lambda o: postproc_bench.bench_postproc(o.args.quick), postproc_bench.render),
}


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
    for name, section in SECTIONS.items():
        if name in result["sections"]:
            lines += section.render(result["sections"][name])
    return "\n".join(lines)


def perf_main(argv: list[str]) -> int:
    """`tvr-bench perf [--out runs/perf.json] [--quick] [--sections ...]`: run the benchmarks, write JSON + Markdown."""
    parser = argparse.ArgumentParser(prog="tvr-bench perf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/perf.json", help="result JSON (the Markdown summary goes next to it, .md)")
    parser.add_argument("--md", default=None, help="Markdown summary path (default: --out with .md)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (N = 250, fewer clips and rounds): a smoke run")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument("--methods", default=",".join(eval_bench.EVAL_METHODS), help="eval section: comma-separated methods")
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
    options = RunOptions(args, sizes, result)
    for name in sections:
        t0 = time.perf_counter()
        print(f"[perf] {name} ...", file=sys.stderr, flush=True)
        result["sections"][name] = SECTIONS[name].run(options)
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
