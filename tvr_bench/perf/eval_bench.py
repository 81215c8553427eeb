"""`tvr-bench perf` section `eval`: for every method's scorer at N x N (default 1000; D 512, 12 frames, 32 words
for DRL, M 20 for T-MASS), time and peak memory of the blocked scorer vs the one-shot scorer of the same math, and
the max |difference|; each scorer runs in its own fresh process (peak RSS growth over its inputs).
X-Pool / T-MASS / EMCL come from `tvr_bench.perf.eval_scorers`, DRL from `tvr_bench.perf.drl_scorer`, TS2-Net from `tvr_bench.perf.ts2net_scorer`,
X-CLIP from `tvr_bench.perf.xclip_scorer` (32 words; its one-shot math beyond N = 250 on 128 texts, scaled).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from tvr_bench.perf.harness import TARGETS, PerfSizes, _fmt, _mark, in_fresh_process, median
from tvr_bench.perf.memory import peak_rss_bytes, reset_peak_rss

EVAL_METHODS = ("clip4clip", "mascot", "xpool", "tmass", "drl", "ts2net", "emcl", "xclip")


class _MethodScorer:
    """Calls a method class's own `similarity` / `pair_cost_bytes` (methods whose scorer needs no state)."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def similarity(self, text: dict[str, Tensor], video: dict[str, Tensor]) -> Tensor:
        """The method's score of a text slice x video slice."""
        return self.cls.similarity(self, text, video)

    def pair_cost_bytes(self, text: dict[str, Tensor], video: dict[str, Tensor]) -> int:
        """The method's per-pair memory estimate."""
        return self.cls.pair_cost_bytes(self, text, video)


def _cosine_bench(class_path: str, n: int, d: int, budget_mb: float, repeats: int, seed: int) -> dict[str, Any]:
    """Blocked (evaluator path) vs one-shot (one matmul) cosine scores of one method, in this process: memory
    of each from a reset high-water mark, then both timed in alternation (the scores are a few ms)."""
    import importlib

    from tvr_bench.callbacks.evaluator import blocked_similarity

    module_name, _, cls_name = class_path.rpartition(".")
    scorer = _MethodScorer(getattr(importlib.import_module(module_name), cls_name))
    g = torch.Generator().manual_seed(seed)
    video = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    text = torch.nn.functional.normalize(video + 0.8 * torch.randn(n, d, generator=g), dim=-1)
    t, v = {"embeds": text, "index": torch.arange(n)}, {"embeds": video, "index": torch.arange(n)}
    fns = {"blocked": lambda: blocked_similarity(scorer, t, v, budget_mb), "one_shot": lambda: scorer.similarity(t, v)}
    out: dict[str, Any] = {}
    sims = {}
    with torch.no_grad():
        for name, fn in fns.items():
            base = reset_peak_rss()
            sims[name] = fn()
            out[name] = {"peak_extra_mib": max(0, peak_rss_bytes() - base) / 2**20, "peak_rss_mib": peak_rss_bytes() / 2**20}
        times: dict[str, list[float]] = {name: [] for name in fns}
        for i in range(repeats):
            for name in (("blocked", "one_shot") if i % 2 == 0 else ("one_shot", "blocked")):
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
    for name in fns:
        out[name].update(seconds=median(times[name]), seconds_all=[round(x, 5) for x in times[name]], threads=torch.get_num_threads())
    out["max_abs_diff"] = float((sims["blocked"] - sims["one_shot"]).abs().max())
    return out


def bench_cosine(class_path: str, n: int, d: int, repeats: int, budget_mb: float = 1024.0, seed: int = 0) -> dict[str, Any]:
    """Blocked (evaluator) vs one-shot cosine scores of one method, in a fresh process."""
    out: dict[str, Any] = {"n_text": n, "n_video": n, "d": d, "budget_mb": budget_mb, "repeats": repeats}
    out.update(in_fresh_process(_cosine_bench, class_path, n, d, budget_mb, repeats, seed))
    return out


def _eval_summary(name: str, raw: dict[str, Any], blocked_key: str, blocking_applies: bool = True) -> dict[str, Any]:
    """Common figures of one scorer benchmark: seconds, peak MiB, ratios, max |diff|, targets (memory and
    speed are n/a for a cosine scorer: its one block is the one-shot computation itself), and the distance to
    the floor where measured (X-Pool/T-MASS: time in [1000, 512] x [512, 12000] products; DRL: time / work)."""
    b, o = raw[blocked_key], raw["one_shot"]
    diff = raw.get("max_abs_diff", b.get("max_abs_diff_vs_one_shot"))
    speed = o["seconds"] / b["seconds"]
    memory = b["peak_extra_mib"] / max(o["peak_extra_mib"], 1e-9)
    out = {
        "method": name,
        "blocked_seconds": b["seconds"],
        "one_shot_seconds": o["seconds"],
        "blocked_peak_mib": b["peak_extra_mib"],
        "one_shot_peak_mib": o["peak_extra_mib"],
        "speedup": speed,
        "memory_ratio": memory,
        "max_abs_diff": diff,
        "product_seconds": raw.get("product_seconds"),
        "targets_met": {
            "equal": diff is not None and diff <= TARGETS["eval_max_abs_diff"],
            "memory": memory <= TARGETS["eval_memory_ratio"] if blocking_applies else None,
            "speed": speed >= TARGETS["eval_speed_ratio"] if blocking_applies else None,
        },
    }
    if name in ("xpool", "tmass"):
        out["blocked_in_products"] = raw.get("fast_in_products")
        out["speedup_in_own_products"] = raw.get("speedup_in_own_products")
        out["targets_met"]["fast_vs_one_shot"] = speed >= TARGETS["eval_fast_vs_one_shot"]
    if name == "emcl":  # the pairwise grouping at pair_n x pair_n (its one-shot does not fit at n x n)
        out.update({k: raw.get(k) for k in ("pair_n", "pair_max_abs_diff", "pair_speedup_blocked_vs_one_shot", "pair_memory_ratio",
                                            "pair_seconds_per_million_pairs")})  # fmt: skip
        out["targets_met"]["pair_equal"] = raw["pair_max_abs_diff"] <= TARGETS["eval_max_abs_diff"]
    if name == "xclip":
        out["work_ratio"] = raw.get("work_ratio")
        out["one_shot_estimated_from_rows"] = raw["one_shot"].get("rows_run")
    if name == "drl":
        out["work_macs"] = raw.get("work_macs")
        out["work_floor_seconds"] = raw.get("work_floor_seconds")
        out["scoring_seconds"] = b.get("scoring_seconds")
        out["work_ratio"] = raw.get("work_ratio")
        out["targets_met"]["work_ratio"] = raw["work_ratio"] <= TARGETS["drl_work_ratio"] if "work_ratio" in raw else None
        if "reference_loop" in raw:
            ref = raw["reference_loop"]
            out["reference_loop_peak_mib"] = ref["peak_extra_mib"]
            out["memory_vs_reference_loop"] = raw.get("memory_vs_reference_loop")
            out["targets_met"]["memory_vs_reference_loop"] = raw["memory_vs_reference_loop"] <= TARGETS["drl_memory_vs_reference_loop"]
    return out


def bench_eval(sizes: PerfSizes, methods: list[str]) -> dict[str, Any]:
    """Blocked vs one-shot scorer of every method at N x N (each variant in its own process)."""
    n, reps = sizes.eval_n, sizes.eval_repeats
    out: dict[str, Any] = {"n": n, "d": 512, "frames": 12, "words_drl": 32, "trials_tmass": 20, "summary": {}, "raw": {}}
    for name in methods:
        t0 = time.perf_counter()
        if name in ("clip4clip", "mascot"):
            path = {"clip4clip": "tvr_bench.methods.clip4clip.CLIP4Clip", "mascot": "tvr_bench.methods.mascot.MASCOT"}[name]
            raw, key = bench_cosine(path, n, 512, 20), "blocked"
        elif name == "xpool":
            from tvr_bench.perf.eval_scorers import bench_xpool

            raw, key = bench_xpool(n=n, d=512, frames=12, repeats=reps), "fast"
        elif name == "tmass":
            from tvr_bench.perf.eval_scorers import bench_tmass

            raw, key = bench_tmass(n=n, d=512, frames=12, trials=20, repeats=sizes.tmass_repeats, fast_repeats=max(reps, 3)), "fast"
        elif name == "ts2net":
            from tvr_bench.perf.ts2net_scorer import bench_ts2net

            raw, key = bench_ts2net(n=n, frames=12, d=512, repeats=max(reps, 1)), "blocked"
        elif name == "emcl":
            from tvr_bench.perf.eval_scorers import bench_emcl

            raw, key = bench_emcl(n=n, d=512, frames=12, repeats=1), "blocked"
        elif name == "drl":
            from tvr_bench.perf.drl_scorer import bench_drl

            # the reference loop's peak memory is reached in its first row of 32 x 32 blocks: by default only its first
            # 128 texts run (time scaled to all rows, marked as an estimate); --drl-reference-loop runs all of it
            rows = None if sizes.drl_reference_loop else 128
            raw, key = bench_drl(n=n, words=32, frames=12, d=512, repeats=max(reps, 1), budget_mb=1024.0,
                                 variants=("blocked", "one_shot", "reference_loop"), reference_rows=rows), "blocked"  # fmt: skip
        elif name == "xclip":
            from tvr_bench.perf.xclip_scorer import bench_xclip

            # the one-shot math holds several [rows, 32, N, 12] float copies (about 8 GiB at N = 1000): beyond N = 250 it
            # runs on the first 128 texts against every video, its time and memory scaled to all rows (marked estimates)
            raw, key = bench_xclip(n=n, words=32, frames=12, d=512, repeats=max(reps, 1), budget_mb=1024.0,
                                   one_shot_rows=None if n <= 250 else 128), "blocked"  # fmt: skip
        else:
            raise ValueError(f"unknown method {name!r}")
        raw["wall_seconds"] = time.perf_counter() - t0
        out["raw"][name] = raw
        out["summary"][name] = _eval_summary(name, raw, key, blocking_applies=name not in ("clip4clip", "mascot"))
    out["note"] = ("clip4clip (meanP and seqTransf) and mascot score by a cosine of pooled embeddings: the blocked "
                   "path is the evaluator's `blocked_similarity`; the [N, N] matrix is the whole cost, so memory "
                   "and time are equal by construction (one block = the one-shot call; memory and speed targets n/a). xpool/tmass: `fast` folded scorer under a "
                   "512 MiB budget (cache-sized steps) vs the reference math materialising [N, N, D]; drl: length-sorted blocked WTI "
                   "in cache-sized 2 MiB chunks (WTI_CHUNK_BYTES, chosen from the work) under the module's 1 GiB default budget "
                   "vs one [N, L, N, F] tensor and vs the reference's 32 x 32 loop; ts2net: the module's scorer through the "
                   "evaluator (cache-sized chunks) vs [N, N, F] at once (tvr_bench/perf/ts2net_scorer.py); emcl: its reference "
                   "32 x 32 blocks through the evaluator vs every block batched ([N, N, D] twice). peak = RSS growth over the inputs, each "
                   "variant in a fresh process. product_seconds: one [1000, 512] x [512, 12000] float32 product, timed in "
                   "every scorer process before and after its scorer (median).")
    products = [r["product_seconds"] for r in out["raw"].values() if r.get("product_seconds")]
    out["product_seconds"] = median(products) if products else None
    return out


def _floor_lines(e: dict[str, Any]) -> list[str]:
    """Markdown lines: the scorers' distance to their floor (same-run product time, work ratio, memory)."""
    if not e.get("product_seconds"):
        return []
    summ = e["summary"]
    lines = [f"Floor unit: one [1000, 512] × [512, 12000] float32 product = **{e['product_seconds'] * 1000:.0f} ms** in this run "
             "(timed in every scorer's process).", ""]  # fmt: skip
    for name in ("xpool", "tmass"):
        s = summ.get(name)
        if s and s.get("blocked_in_products") is not None:
            lines.append(
                f"- {name}: fast scorer {s['blocked_seconds']:.3f} s = {s['blocked_in_products']:.1f} products; "
                f"{s['speedup']:.1f}× the one-shot math (target ≥ {TARGETS['eval_fast_vs_one_shot']:.0f}× "
                f"{_mark(s['targets_met']['fast_vs_one_shot'])}), max |diff| {s['max_abs_diff']:.1e} (≤ 1e-5 {_mark(s['targets_met']['equal'])})."
            )
            if s.get("speedup_in_own_products") is not None:
                lines[-1] += (f" Each side in its own process's product units: {s['speedup_in_own_products']:.1f}× (steadier when a "
                              "neighbour slows one process and not the other).")  # fmt: skip
    s = summ.get("drl")
    if s and s.get("work_ratio") is not None:
        line = (f"- drl: token-wise scoring {s['scoring_seconds']:.3f} s for {s['work_macs'] / 1e9:.0f} G multiply-adds "
                f"(real tokens × real frames × D) = {s['work_floor_seconds']:.3f} s at the product rate: "
                f"**{s['work_ratio']:.2f}×** its work (target ≤ {TARGETS['drl_work_ratio']} {_mark(s['targets_met']['work_ratio'])})")  # fmt: skip
        if s.get("memory_vs_reference_loop") is not None:
            line += (f"; peak {s['blocked_peak_mib']:.0f} MiB vs the reference loop's {s['reference_loop_peak_mib']:.0f} MiB "
                     f"on the same inputs ({_mark(s['targets_met']['memory_vs_reference_loop'])})")  # fmt: skip
        lines.append(line + ".")
    s = summ.get("xclip")
    if s and s.get("work_ratio") is not None:
        rows = s.get("one_shot_estimated_from_rows")
        lines.append(f"- xclip: blocked scorer {s['blocked_seconds']:.3f} s = **{s['work_ratio']:.2f}×** its word-frame products "
                     f"(real tokens × real frames × D) at the product rate; {s['speedup']:.1f}× the one-shot math"
                     + (f" (one-shot time and memory scaled from its first {rows} texts)" if rows else "") + ".")  # fmt: skip
    return lines + [""]


def render(e: dict[str, Any]) -> list[str]:
    """Markdown lines of the eval section."""
    lines = [
        f"## Evaluation scorers ({e['n']} × {e['n']}, D 512, 12 frames; DRL 32 words; T-MASS M = 20)",
        "",
        "| method | blocked s | one-shot s | speed-up | blocked MiB | one-shot MiB | memory ratio | max abs diff | targets (equal / ≤ 1/8 mem / no slower) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in e["summary"].items():
        t = s["targets_met"]
        lines.append(
            f"| {name} | {_fmt(s['blocked_seconds'], 3)} | {_fmt(s['one_shot_seconds'], 3)} | {_fmt(s['speedup'])}× | "
            f"{_fmt(s['blocked_peak_mib'], 1)} | {_fmt(s['one_shot_peak_mib'], 1)} | {_fmt(s['memory_ratio'], 3)} | "
            f"{s['max_abs_diff']:.1e} | {_mark(t['equal'])} {_mark(t['memory'])} {_mark(t['speed'])} |"
        )
    drl = e["raw"].get("drl", {})
    if "reference_loop" in drl:
        lines += ["", f"DRL reference-style loop (32 × 32 blocks, weights recomputed per block): "
                      f"{_fmt(drl['reference_loop']['seconds'], 2)} s = "
                      f"{_fmt(drl['reference_loop']['seconds'] / drl['blocked']['seconds'], 1)}× the blocked scorer"
                      f"{' (estimated from its first ' + str(drl['reference_loop']['rows_run']) + ' texts)' if drl['reference_loop'].get('rows_run') else ''}."]  # fmt: skip
    em = e["summary"].get("emcl")
    if em:
        lines += ["", f"EMCL: the row is its reference grouping (EM over each 32 × 32 block, through the evaluator, vs every block "
                      f"batched at once). Pairwise grouping (EM on each pair alone) at {em['pair_n']} × {em['pair_n']}: "
                      f"{_fmt(em['pair_speedup_blocked_vs_one_shot'])}× the all-pairs one-shot at {_fmt(em['pair_memory_ratio'], 3)} of its "
                      f"memory, max |diff| {em['pair_max_abs_diff']:.1e} ({_mark(em['targets_met']['pair_equal'])}); "
                      f"{_fmt(em['pair_seconds_per_million_pairs'], 1)} s per million pairs."]  # fmt: skip
    lines += ["", "CLIP4Clip (meanP, seqTransf) and MASCOT score by one cosine per pair: blocking changes nothing "
                  "there (the [N, N] matrix is the whole cost); the memory and speed targets apply to X-Pool, T-MASS, DRL, TS2-Net.", ""]  # fmt: skip
    lines += _floor_lines(e)
    return lines
