"""`tvr-bench compare RUN_A RUN_B`: is the difference between two runs on the same test set real?

Each run is a result JSON (`runs/results/<...>.json`, or the `result.json` copy in a run directory) or a run
directory (searched for its `result.json`). Both must have saved their per-query ranks (every test does), have
been tested on the same data (dataset, split, protocol size, synthetic generation seed: query keys alone can
match on different videos; `--allow-different-data` overrides, and the verdict then says so) and have ranked
exactly the same queries; otherwise the command refuses and names the difference. For every
metric it prints A, B, A - B with its 95% paired-bootstrap interval (the same resampled videos for both runs)
and the paired permutation p-value (see `tvr_bench/stats.py`), then a one-paragraph verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tvr_bench.results import SCHEMA, data_differences, protocol_of, test_set_label, variant_of
from tvr_bench.stats import DEFAULT_RESAMPLES, KeyMismatchError, PerQuery, paired_comparison

RUN_RESULT = "result.json"
EXIT_REFUSED = 2

__all__ = ["DataMismatchError", "compare_main", "compare_runs", "format_p", "load_run", "verdict"]

#: the command-line flag that compares runs tested on different data anyway
ALLOW_FLAG = "--allow-different-data"


class DataMismatchError(ValueError):
    """Two runs were tested on different data (their query keys may still match): no paired comparison."""


def format_p(p: float, n_perm: int) -> str:
    """A permutation p-value with 4 decimals; at the resampling floor 1 / (1 + n_perm), where no permutation
    reached the observed difference, `< 1/n_perm` (`< 0.0001` for 10,000 permutations)."""
    if n_perm > 0 and p <= 1.0 / (1 + n_perm) * (1 + 1e-9):
        return f"< {1.0 / n_perm:.2g}"
    return f"{p:.4f}"


def _find_result(path: Path) -> Path:
    """The result JSON a command-line argument names (a file, or the single `result.json` under a directory)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such result file or run directory")
    found = sorted(path.rglob(RUN_RESULT))
    if not found:
        raise FileNotFoundError(f"{path}: no {RUN_RESULT} under this directory (is it a run directory of a finished test?)")
    if len(found) > 1:
        shown = ", ".join(str(p) for p in found[:4])
        raise ValueError(f"{path}: {len(found)} runs under this directory ({shown}...): name one of them")
    return found[0]


def load_run(arg: str | Path) -> tuple[dict[str, Any], PerQuery, Path]:
    """(result JSON, per-query ranks, result path) of one run; clear errors when either is missing."""
    path = _find_result(Path(arg))
    try:
        result = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: not a JSON file: {err}") from None
    if not isinstance(result, dict) or result.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a {SCHEMA} result file")
    name = (result.get("per_query") or {}).get("file")
    if not name:
        raise ValueError(f"{path}: this result has no per-query ranks (written by an older tvr-bench): re-run its test")
    ranks = path.parent / name
    if not ranks.is_file():
        raise FileNotFoundError(f"{path} names its per-query ranks {ranks}, which is missing")
    return result, PerQuery.load(str(ranks)), path


def _label(result: dict[str, Any]) -> str:
    variant = variant_of(result)
    return f"{result.get('method')}" + (f" [{variant}]" if variant else "") + f" (seed {result.get('seed')})"


def protocol_notes(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Differences of setup between the two runs that a reader of the comparison should know about."""
    notes = []
    for field in ("backbone", "frames", "words"):  # the data itself: data_differences, which refuses
        if a.get(field) != b.get(field):
            notes.append(f"{field} differs: {a.get(field)} vs {b.get(field)}")
    pa, pb = protocol_of(a), protocol_of(b)
    for field in ("profile", "features", "selection", "optimizer", "pairing", "eps_mode"):
        if pa.get(field) != pb.get(field):
            notes.append(f"protocol {field} differs: {pa.get(field)} vs {pb.get(field)}")
    for name, p in (("A", pa), ("B", pb)):
        label = test_set_label(p.get("test_videos"), p.get("protocol_videos"))
        if label and label != "complete":
            notes.append(f"run {name}'s test set is incomplete ({label}): both runs share it, but neither is "
                         "comparable with published numbers")
    return notes


def compare_runs(a: str | Path, b: str | Path, n_boot: int = DEFAULT_RESAMPLES, seed: int = 0,
                 dsl: bool = False, allow_different_data: bool = False) -> dict[str, Any]:
    """The paired comparison of two runs: DataMismatchError naming the difference when they were tested on
    different data (unless `allow_different_data`), KeyMismatchError naming the difference of their queries."""
    ra, qa, pa = load_run(a)
    rb, qb, pb = load_run(b)
    different = data_differences(ra, rb)
    if different and not allow_different_data:
        raise DataMismatchError(
            f"refused: A ({pa}) and B ({pb}) were tested on different data ({'; '.join(different)}); matching query "
            f"keys do not make them the same queries. Compare runs on the same test data, or pass {ALLOW_FLAG} to "
            "compare them anyway (the verdict then says so)"
        )
    names = (f"A ({pa})", f"B ({pb})")
    metrics = paired_comparison(qa, qb, n_boot=n_boot, seed=seed, dsl=dsl, names=names)
    from tvr_bench.diagnostics import paired_group_comparison

    # t2v R@1/R@5 by caption type when both ranks files carry the types (synthetic; tvr_bench/diagnostics.py)
    by_type = {} if dsl else paired_group_comparison(qa, qb, n_boot=n_boot, seed=seed, names=names)
    return {
        "a": {"path": str(pa), "label": _label(ra)},
        "b": {"path": str(pb), "label": _label(rb)},
        "dataset": ra.get("dataset"),
        "queries": {"t2v": int(len(qa.t2v_rank)), "v2t": int(len(qa.v2t_rank))},
        "resamples": n_boot,
        "seed": seed,
        "dsl": dsl,
        "alpha": 0.05,
        "metrics": metrics,
        "by_caption_type": by_type,
        "notes": protocol_notes(ra, rb),
        "different_data": different,  # non-empty only under allow_different_data
    }


def verdict(comparison: dict[str, Any]) -> str:
    """One paragraph: the headline difference (t2v R@1), its interval and p-value, and what it does not cover."""
    m = comparison["metrics"]
    r1 = m["t2v/R@1"]
    a, b = comparison["a"]["label"], comparison["b"]["label"]
    alpha = comparison["alpha"]
    significant = [k for k, v in m.items() if v["p"] < alpha]
    better = sorted({(a if ((v["diff"] > 0) == k.endswith(("R@1", "R@5", "R@10"))) else b) for k, v in m.items()
                     if k in significant})
    lead = a if r1["diff"] > 0 else b
    p_text = format_p(r1["p"], comparison["resamples"])
    p_text = f"p {p_text}" if p_text.startswith("<") else f"p = {p_text}"
    if r1["p"] < alpha:
        head = (f"On the {comparison['queries']['t2v']:,} text queries of this {comparison['dataset']} test set, {lead} "
                f"retrieves better: t2v R@1 {r1['a']:.1f} vs {r1['b']:.1f}, a difference of {r1['diff']:+.1f} points "
                f"(95% paired bootstrap interval [{r1['ci'][0]:+.1f}, {r1['ci'][1]:+.1f}], paired permutation "
                f"{p_text}), which is significant at the {alpha:.0%} level.")
    else:
        head = (f"On the {comparison['queries']['t2v']:,} text queries of this {comparison['dataset']} test set, the "
                f"t2v R@1 difference between {a} and {b} ({r1['a']:.1f} vs {r1['b']:.1f}, {r1['diff']:+.1f} points, "
                f"95% paired bootstrap interval [{r1['ci'][0]:+.1f}, {r1['ci'][1]:+.1f}], paired permutation "
                f"{p_text}) is not significant at the {alpha:.0%} level: this test set cannot tell the two "
                "apart on that metric.")
    if significant:
        tail = (f" {len(significant)} of {len(m)} metrics differ significantly ({', '.join(significant)}), in favour "
                f"of {' and '.join(better)}.")
    else:
        tail = f" None of the {len(m)} metrics differs significantly."
    caveat = (" These intervals cover the sampling of test queries only, not training randomness: with one seed per "
              "method, a significant difference can still be within seed-to-seed variation (compare several seeds "
              "in the leaderboard).")
    notes = (" Note: " + "; ".join(comparison["notes"]) + ".") if comparison["notes"] else ""
    different = comparison.get("different_data") or []
    override = (f"These runs were tested on DIFFERENT data ({'; '.join(different)}), compared anyway because of "
                f"{ALLOW_FLAG}: the paired test assumes the same queries, so read what follows with that in mind. "
                if different else "")
    return override + head + tail + caveat + notes


def _print(comparison: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"A = {comparison['a']['label']}   B = {comparison['b']['label']}"
                        + ("   (DSL)" if comparison["dsl"] else ""))
    for i, col in enumerate(("metric", "A", "B", "A - B", "95% paired interval", "p (permutation)")):
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=True)
    for key, v in comparison["metrics"].items():
        table.add_row(key, f"{v['a']:.2f}", f"{v['b']:.2f}", f"{v['diff']:+.2f}",
                      f"[{v['ci'][0]:+.2f}, {v['ci'][1]:+.2f}]",
                      format_p(v["p"], comparison["resamples"]) + (" *" if v["p"] < comparison["alpha"] else ""))
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table)
    if comparison.get("by_caption_type"):
        by_type = Table(title="t2v by caption type (each caption type alone; paired over the same videos)")
        for i, col in enumerate(("caption type", "metric", "A", "B", "A - B", "95% paired interval", "p (permutation)")):
            by_type.add_column(col, justify="left" if i < 2 else "right", no_wrap=True)
        for group, metrics in comparison["by_caption_type"].items():
            for key, v in metrics.items():
                by_type.add_row(group, key, f"{v['a']:.2f}", f"{v['b']:.2f}", f"{v['diff']:+.2f}",
                                f"[{v['ci'][0]:+.2f}, {v['ci'][1]:+.2f}]",
                                f"{v['p']:.4f}" + (" *" if v["p"] < comparison["alpha"] else ""))
        console.print(by_type)
    console.print(verdict(comparison), soft_wrap=not console.is_terminal)


def compare_main(argv: list[str] | None = None) -> int:
    """`tvr-bench compare RUN_A RUN_B [--resamples N] [--seed S] [--dsl] [--json PATH]`; exit 2 when refused."""
    parser = argparse.ArgumentParser(prog="tvr-bench compare", description=__doc__.splitlines()[0])
    parser.add_argument("run_a", help="result JSON or run directory of run A")
    parser.add_argument("run_b", help="result JSON or run directory of run B")
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="bootstrap resamples and permutations")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the resampling")
    parser.add_argument("--dsl", action="store_true", help="compare the dual-softmax (DSL) ranks")
    parser.add_argument("--json", default=None, help="also write the comparison as JSON to this file")
    parser.add_argument(ALLOW_FLAG, action="store_true",
                        help="compare runs tested on different data (dataset, split, protocol size, synthetic "
                             "generation seed) anyway; the verdict says so")
    args = parser.parse_args(argv)
    try:
        comparison = compare_runs(args.run_a, args.run_b, args.resamples, args.seed, args.dsl,
                                  allow_different_data=args.allow_different_data)
    except (KeyMismatchError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    _print(comparison)
    if args.json:
        comparison["verdict"] = verdict(comparison)
        Path(args.json).write_text(json.dumps(comparison, indent=2) + "\n")
    return 0
