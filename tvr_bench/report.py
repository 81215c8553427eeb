"""`tvr-bench leaderboard`: build `leaderboard.csv`, `leaderboard.md` and `leaderboard.png` from the result
JSONs under `runs/results/`: mean ± std over seeds, 95% bootstrap intervals over test queries, the rows not
significantly different from the best of each ranking block, and the published numbers of `recipes/expected/`.

A *ranking block* is (dataset, backbone, profile, features, complete test set): rows of different blocks are
never ranked together, and a row whose test set is below the protocol size is marked ("987/1,000 videos").

Everything but the file writing is a pure function of the loaded results, so it is easy to test.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import re
import statistics
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

import numpy as np

from tvr_bench.results import (
    GROUP_KEY,
    LABEL_DEPENDENT,
    RANKED_CLASSES,
    RESULTS_SUBDIR,
    TRANSDUCTIVE,
    UNAUDITED,
    atomic_write,
    canonical_backbone,
    data_identity,
    flat_row,
    identity_differences,
    load_results,
    protocol_of,
    result_class_of,
    test_set_label,
    variant_of,
    worst_class,
)
from tvr_bench.stats import DEFAULT_RESAMPLES, PerQuery, bootstrap_intervals, permutation_pvalues_ratio

DIRECTIONS = ("t2v", "v2t")
METRICS = ("R@1", "R@5", "R@10", "MdR", "MnR")
RETRIEVAL_KEYS = tuple(f"{d}/{m}" for d in DIRECTIONS for m in METRICS)
#: flat-row fields that describe a run rather than measure it (never averaged)
IDENTITY_FIELDS = ("method", "dataset", "backbone", "frames", "words", "seed", "git_commit", "timestamp", "device",
                   "profile", "features", "selection", "pairing", "eps_mode", "optimizer", "variant", "test_set",
                   "test_videos", "protocol_videos", "result_class", "training")
#: significance level of the "not significantly different from the best" grouping
ALPHA = 0.05
BEST_MARK = "★"
TIED_MARK = "≈"
UNVERIFIED_TAG = "[P?]"
UNVERIFIED_MARK = "†"

__all__ = [
    "aggregate",
    "build_leaderboard",
    "load_per_query",
    "mark_significance",
    "default_expected_dir",
    "leaderboard_main",
    "leaderboard_rows",
    "load_expected",
    "load_results",
    "mean_std",
    "paper_entries",
    "plot_leaderboard",
    "to_csv",
    "to_markdown",
]


# ---------------------------------------------------------------------------------------------- loading
def default_expected_dir() -> Path | None:
    """`recipes/expected` in the working directory, else next to the installed package's source tree."""
    for candidate in (Path.cwd() / "recipes" / "expected", Path(__file__).resolve().parents[1] / "recipes" / "expected"):
        if candidate.is_dir():
            return candidate
    return None


def load_expected(expected_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Published results from `recipes/expected/*.yaml` as flat entries (method, dataset, backbone, metrics, provenance)."""
    folder = Path(expected_dir) if expected_dir is not None else default_expected_dir()
    if folder is None or not folder.is_dir():
        return []
    entries = []
    for path in sorted(folder.glob("*.y*ml")):
        doc = yaml.safe_load(path.read_text()) or {}
        for item in doc.get("results") or []:
            metrics: dict[str, float] = {}
            for direction in DIRECTIONS:
                for name, value in (item.get(direction) or {}).items():
                    if value is not None:
                        metrics[f"{direction}/{name}"] = float(value)
            tags = dict(item.get("provenance") or {})
            default_tag = tags.pop("default", UNVERIFIED_TAG)
            method = str(item.get("method", doc.get("method")))
            entries.append(
                {
                    "method": method,
                    # the leaderboard row that reproduces the published scoring (T-MASS: `tmass_refpairing`)
                    "row_method": str(item.get("row_method", doc.get("row_method", method))),
                    # the scoring audit's class of the published scoring (docs/methods/<m>.md), when stated
                    "result_class": item.get("result_class", doc.get("result_class")),
                    "dataset": str(item["dataset"]),
                    "aliases": [str(a) for a in item.get("aliases") or []],
                    "backbone": canonical_backbone(item.get("backbone")),
                    "label": str(item.get("label", "paper")),
                    "metrics": metrics,
                    "provenance": {k: str(tags.get(k, default_tag)) for k in metrics},
                    "source": str(item.get("source", doc.get("paper", ""))),
                    "note": str(item.get("note", "")),
                    "file": path.name,
                }
            )
    return entries


def _norm(name: str) -> str:
    """Dataset names compared without case or punctuation (`MSR-VTT` == `msrvtt`)."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def paper_entries(expected: list[dict[str, Any]], method: str, dataset: str, backbone: str) -> list[dict[str, Any]]:
    """Published entries for (method, dataset, backbone), in file order."""
    return [
        e
        for e in expected
        if e.get("row_method", e["method"]) == method
        and e["backbone"] == backbone
        and _norm(dataset) in {_norm(e["dataset"]), *map(_norm, e["aliases"])}
    ]


def is_verified(tag: str) -> bool:
    """False for numbers recalled from a paper but not checked against it (`[P?]`)."""
    return UNVERIFIED_TAG not in tag


# ---------------------------------------------------------------------------------------------- aggregation
def mean_std(values: Iterable[float]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (None below two values) and count of the non-None values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None), len(vals)


def _joined(values: Iterable[Any]) -> str:
    """Distinct non-None values in first-seen order, joined by `/` (`12` or `12/64` when runs differ)."""
    return "/".join(str(v) for v in dict.fromkeys(v for v in values if v is not None))


def load_per_query(result: dict[str, Any]) -> PerQuery | None:
    """The per-query ranks saved beside a loaded result JSON (None when the run saved none or the file is gone)."""
    name = (result.get("per_query") or {}).get("file")
    if not name or not result.get("_path"):
        return None
    path = Path(result["_path"]).parent / name
    if not path.is_file():
        warnings.warn(f"{result['_path']} names the ranks file {path}, which is missing")
        return None
    return PerQuery.load(str(path))


def _same_queries(sets: list[PerQuery]) -> bool:
    """True when every rank set holds exactly the same text queries and videos."""
    first = sets[0].sorted()
    for other in sets[1:]:
        o = other.sorted()
        if not (np.array_equal(first.t2v_key, o.t2v_key) and np.array_equal(first.v2t_key, o.v2t_key)
                and np.array_equal(first.t2v_video, o.t2v_video)):
            return False
    return True


def _group_intervals(results: list[dict[str, Any]], per_query: list[PerQuery | None]) -> tuple[dict, dict, str]:
    """(metric intervals, DSL intervals, what they are) of one leaderboard row."""
    stored = [r.get("intervals") or {} for r in results]
    if len(results) == 1:
        if stored[0].get("metrics"):
            return stored[0]["metrics"], stored[0].get("dsl_metrics") or {}, "95% bootstrap over test queries"
        return {}, {}, "none (the result has no intervals)"
    if any(pq is None for pq in per_query):
        return {}, {}, "none (a seed has no per-query ranks)"
    sets = [pq.sorted() for pq in per_query if pq is not None]
    if not _same_queries(sets):
        return {}, {}, "none (the seeds were tested on different queries)"
    n_boot = int(stored[0].get("resamples") or DEFAULT_RESAMPLES)
    metrics = bootstrap_intervals([pq.directions() for pq in sets], n_boot)
    dsl = {}
    if all(pq.dsl_t2v_rank is not None for pq in sets):
        dsl = bootstrap_intervals([pq.directions(dsl=True) for pq in sets], n_boot)
    return metrics, dsl, f"95% bootstrap over test queries of the mean of {len(sets)} seeds (queries resampled jointly)"


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (method, dataset, backbone, protocol variant): seeds, mean/std/n of every numeric field over
    them, protocol, 95% intervals, and the significance marks of :func:`mark_significance`."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for result in results:
        key = (*(str(result[k]) for k in GROUP_KEY), variant_of(result))
        groups.setdefault(key, []).append(result)
    out = []
    for key, members in groups.items():
        rows = [flat_row(r) for r in members]
        fields = [f for f in dict.fromkeys(f for r in rows for f in r) if f not in IDENTITY_FIELDS]
        stats = {}
        for field in fields:
            values = [r.get(field) for r in rows]
            if all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values):
                mean, std, n = mean_std(values)
                if n:
                    stats[field] = {"mean": mean, "std": std, "n": n}
        seeds = sorted((r["seed"] for r in rows if r.get("seed") is not None), key=lambda s: (str(type(s)), s))
        protocols = [protocol_of(r) for r in members]
        test_videos = min((p.get("test_videos") for p in protocols if p.get("test_videos")), default=None)
        protocol_videos = max((p.get("protocol_videos") for p in protocols if p.get("protocol_videos")), default=None)
        complete = all(p.get("complete", True) is not False for p in protocols) and (
            not protocol_videos or not test_videos or test_videos >= protocol_videos)
        per_query = [load_per_query(r) for r in members]
        intervals, dsl_intervals, interval_kind = _group_intervals(members, per_query)
        classes = [result_class_of(r) for r in members]
        post: dict[str, dict[str, Any]] = {}
        for p, r in zip(protocols, members):
            for name, block in (p.get("postprocessing") or {}).items():
                entry = post.setdefault(name, {**block, "classes": [], "intervals": {}})
                entry["classes"].append(block.get("result_class"))
                if len(members) == 1:
                    entry["intervals"] = ((r.get("intervals") or {}).get("post_metrics") or {}).get(name) or (
                        dsl_intervals if name == "dsl" else {})
        for entry in post.values():
            entry["result_class"] = UNAUDITED if UNAUDITED in entry["classes"] or None in entry["classes"] else \
                worst_class(*entry.pop("classes"))
            entry.pop("classes", None)
        out.append(
            {
                **dict(zip(GROUP_KEY, key[:3])),
                "variant": key[3],
                "profile": protocols[0]["profile"],
                "features": protocols[0]["features"],
                "selection": _joined(p.get("selection") for p in protocols),
                "optimizer": _joined(p.get("optimizer") for p in protocols),
                "pairing": _joined(p.get("pairing") for p in protocols),
                "eps_mode": _joined(p.get("eps_mode") for p in protocols),
                "test_videos": test_videos,
                "protocol_videos": protocol_videos,
                "complete": complete,
                "test_set": test_set_label(test_videos, protocol_videos),
                "frames": _joined(r.get("frames") for r in rows),
                "words": _joined(r.get("words") for r in rows),
                "seeds": seeds,
                "n_runs": len(rows),
                "stats": stats,
                "intervals": intervals,
                "dsl_intervals": dsl_intervals,
                "interval_kind": interval_kind,
                # the least trustworthy verdict over the seeds (a seed without one makes the row unaudited)
                "result_class": UNAUDITED if UNAUDITED in classes else worst_class(*classes),
                "post": post,
                "git_commits": sorted({r["git_commit"] for r in rows if r.get("git_commit")}),
                "devices": _joined(r.get("device") for r in rows),
                "last_timestamp": max((r.get("timestamp") or "" for r in rows), default=""),
                "data_identity": _common_data_identity(members),
                "_per_query": per_query,
            }
        )
    out.sort(key=lambda g: (*block_of(g), -(g["stats"].get("t2v/R@1", {}).get("mean") or 0.0), g["method"], g["variant"]))
    mark_significance(out)
    return out


def _common_data_identity(members: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The test data (:func:`tvr_bench.results.data_identity`) all the seeds of a row share; None when they differ."""
    first = data_identity(members[0])
    if any(identity_differences(first, data_identity(m)) for m in members[1:]):
        return None
    return first


def _data_gap(best: dict[str, Any], g: dict[str, Any]) -> str:
    """How the test data of two leaderboard rows differ (dataset, split, protocol size, synthetic generation seed);
    '' when they are the same. Query keys alone can match on different data, so such rows get no ≈."""
    a, b = best.get("data_identity", {}), g.get("data_identity", {})
    if a is None or b is None:
        return "the seeds of a row were tested on different data"
    return "; ".join(identity_differences(a, b))


#: Which rows share a ranking, by result class (docs/leaderboard.md, "What counts as a retrieval result"):
#: 0 plain retrieval (pairwise and gallery-normalised), 1 transductive, 2 unaudited, 3 label-dependent.
CLASS_GROUPS = {**{c: 0 for c in RANKED_CLASSES}, TRANSDUCTIVE: 1, UNAUDITED: 2, LABEL_DEPENDENT: 3}
CLASS_GROUP_TITLES = {
    0: "",
    1: " · TRANSDUCTIVE scoring: a text's scores depend on the other test queries (ranked only among themselves)",
    2: " · UNAUDITED: the result predates the scoring audit (rerun its test; ranked only among themselves)",
    3: " · NOT A VALID RETRIEVAL RESULT: label-dependent scoring, it reads the test labels (not ranked)",
}


def class_group(g: dict[str, Any]) -> int:
    """The class group of a row (CLASS_GROUPS)."""
    return CLASS_GROUPS.get(g.get("result_class") or UNAUDITED, CLASS_GROUPS[UNAUDITED])


def block_of(g: dict[str, Any]) -> tuple[str, str, str, str, bool, int]:
    """The ranking block of a row: (dataset, backbone, profile, features, incomplete, class group); rows of
    different blocks never share a ranking (complete rows sort before incomplete ones; plain retrieval before
    transductive, unaudited and label-dependent rows)."""
    return (g["dataset"], g["backbone"], g["profile"], g["features"], not g.get("complete", True), class_group(g))


def block_title(block: tuple) -> str:
    """Heading of a ranking block."""
    dataset, backbone, profile, features, incomplete = block[:5]
    text = f"{dataset} · {backbone} · profile {profile} · {features}"
    text += " · INCOMPLETE test set (not comparable with complete rows)" if incomplete else ""
    return text + (CLASS_GROUP_TITLES[block[5]] if len(block) > 5 else "")


def _hits_at_1(g: dict[str, Any]) -> tuple[PerQuery, np.ndarray] | None:
    """(reference rank set, per-video t2v hits@1 averaged over the row's seeds), None without ranks."""
    sets = g.get("_per_query") or []
    if not sets or any(pq is None for pq in sets):
        return None
    sets = [pq.sorted() for pq in sets]
    if not _same_queries(sets):
        return None
    hits = np.mean([pq.directions()["t2v"].per_unit(("hits", 1)) for pq in sets], axis=0)
    return sets[0], hits


def mark_significance(aggregated: list[dict[str, Any]], alpha: float = ALPHA, n_perm: int = DEFAULT_RESAMPLES) -> None:
    """Mark, in each ranking block, the best row by t2v R@1 (`best`) and the rows whose paired permutation test
    against it gives p >= `alpha` (`tied`: not significantly different), in place: `significance`, `p_vs_best`."""
    blocks: dict[tuple, list[dict[str, Any]]] = {}
    for g in aggregated:
        g.update(significance="", p_vs_best=None, tied_with_best=None)
        if (g["stats"].get("t2v/R@1") or {}).get("mean") is not None:
            blocks.setdefault(block_of(g), []).append(g)
    for block, members in blocks.items():
        if block[5] == CLASS_GROUPS[LABEL_DEPENDENT]:  # not retrieval results: no ranking, no marks
            for g in members:
                g["significance"] = "n/a (label-dependent: not ranked)"
            continue
        best = max(members, key=lambda g: g["stats"]["t2v/R@1"]["mean"])
        best.update(significance="best", tied_with_best=True)
        ref = _hits_at_1(best)
        for g in members:
            if g is best:
                continue
            gap = _data_gap(best, g)
            if gap:
                g["significance"] = f"n/a (different test data: {gap})"
                continue
            mine = _hits_at_1(g)
            if ref is None or mine is None:
                g["significance"] = "n/a (no per-query ranks)"
                continue
            if not _same_queries([ref[0], mine[0]]):
                g["significance"] = "n/a (different test queries)"
                continue
            p = float(permutation_pvalues_ratio(ref[1] - mine[1], n_perm)[0])
            g["p_vs_best"] = p
            g["tied_with_best"] = p >= alpha
            g["significance"] = "tied" if p >= alpha else "worse"


def _paper_for(g: dict[str, Any], expected: list[dict[str, Any]]) -> dict[str, Any] | None:
    papers = paper_entries(expected, g["method"], g["dataset"], g["backbone"])
    return papers[0] if papers else None


def leaderboard_rows(aggregated: list[dict[str, Any]], expected: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat CSV rows: identity, protocol, test set, `<field>` mean, `<field>_std` over seeds and `<field>_ci_lo/hi`
    (95% interval over queries) for every measured field, significance vs the block's best, the first paper entry
    and, for `profile: paper` rows, `diff/<metric>` = ours - paper."""
    fields = list(dict.fromkeys(f for g in aggregated for f in g["stats"] if "_ci_" not in f))
    fields.sort(key=lambda f: (0, RETRIEVAL_KEYS.index(f)) if f in RETRIEVAL_KEYS else (1, 0))
    rows = []
    for g in aggregated:
        row: dict[str, Any] = {k: g[k] for k in GROUP_KEY}
        row.update(variant=g["variant"], profile=g["profile"], features=g["features"], selection=g["selection"],
                   optimizer=g["optimizer"], pairing=g["pairing"], eps_mode=g["eps_mode"],
                   test_videos=g["test_videos"], protocol_videos=g["protocol_videos"], complete=g["complete"],
                   test_set=g["test_set"], result_class=g["result_class"],
                   ranking_block=" | ".join(map(str, block_of(g)[:4])) + (
                       " | incomplete" if not g["complete"] else "") + (
                       f" | {g['result_class']}" if class_group(g) else ""),
                   significance=g["significance"], p_vs_best=g["p_vs_best"], tied_with_best=g["tied_with_best"])
        row.update(frames=g["frames"], words=g["words"], n_runs=g["n_runs"], seeds=" ".join(map(str, g["seeds"])))
        for field in fields:
            stat = g["stats"].get(field) or {}
            row[field] = stat.get("mean")
            row[f"{field}_std"] = stat.get("std")
            bounds = (g["dsl_intervals"].get(field[4:]) if field.startswith("dsl/") else g["intervals"].get(field))
            if field in RETRIEVAL_KEYS or field.startswith("dsl/"):
                row[f"{field}_ci_lo"] = bounds[0] if bounds else None
                row[f"{field}_ci_hi"] = bounds[1] if bounds else None
        for name, entry in sorted(g.get("post", {}).items()):  # post-processed numbers: their own columns and class
            row[f"{name}/result_class"] = entry.get("result_class")
            for key, bounds in (entry.get("intervals") or {}).items():
                if name != "dsl":
                    row[f"{name}/{key}_ci_lo"], row[f"{name}/{key}_ci_hi"] = bounds[0], bounds[1]
        row["interval"] = g["interval_kind"]
        paper = _paper_for(g, expected)
        row["paper_label"] = paper["label"] if paper else None
        for key in RETRIEVAL_KEYS:
            row[f"paper/{key}"] = paper["metrics"].get(key) if paper else None
            row[f"paper/{key}_provenance"] = paper["provenance"].get(key) if paper else None
        if g["profile"] == "paper":
            for key in RETRIEVAL_KEYS:
                ours = (g["stats"].get(key) or {}).get("mean")
                theirs = paper["metrics"].get(key) if paper else None
                row[f"diff/{key}"] = None if ours is None or theirs is None else ours - theirs
        row["paper_source"] = paper["source"] if paper else None
        row["git_commits"] = " ".join(g["git_commits"])
        row["devices"] = g["devices"]
        row["last_timestamp"] = g["last_timestamp"]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- rendering
def to_csv(rows: list[dict[str, Any]]) -> str:
    """CSV text of the flat rows (header from the union of their keys)."""
    columns = list(dict.fromkeys(k for r in rows for k in r)) or ["method", "dataset", "backbone"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _fmt_stat(stat: dict[str, Any] | None, digits: int = 1, scale: float = 1.0,
              interval: list[float] | None = None) -> str:
    """`mean ± std [lo, hi]`: std over seeds only with several seeds, the 95% interval when known; `–` when missing."""
    if not stat or stat.get("mean") is None:
        return "–"
    text = f"{stat['mean'] * scale:.{digits}f}"
    text += f" ± {stat['std'] * scale:.{digits}f}" if stat.get("std") is not None else ""
    if interval:
        text += f" [{interval[0] * scale:.{digits}f}, {interval[1] * scale:.{digits}f}]"
    return text


TEXT_COLUMNS = {"", "method", "dataset", "backbone", "frames", "words", "source", "seeds", "device", "commit",
                "protocol", "test set", "variant"}


def _fmt_const(stat: dict[str, Any] | None, scale: float = 1.0) -> str:
    """A quantity that should not vary over seeds (parameters): the mean, flagged when it does vary."""
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean'] * scale:.2f}" + (" (varies)" if stat.get("std") else "")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table; text columns left-aligned, numbers right-aligned."""
    align = ["---" if h in TEXT_COLUMNS else "---:" for h in header]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _mark(g: dict[str, Any]) -> str:
    return {"best": BEST_MARK, "tied": TIED_MARK}.get(g.get("significance", ""), "")


def _protocol_cell(g: dict[str, Any]) -> str:
    """Selection, optimizer and (T-MASS) pairing of a row, compactly."""
    parts = [f"sel={g['selection'] or '?'}", f"opt={g['optimizer'] or '?'}"]
    if g.get("pairing"):
        parts.append(f"pairing={g['pairing']}")
    if g.get("eps_mode"):
        parts.append(f"eps={g['eps_mode']}")
    return ", ".join(parts)


def _test_set_cell(g: dict[str, Any]) -> str:
    """`complete`, `987/1,000 videos`, or the tested size when the benchmark defines no protocol size."""
    if g.get("test_set"):
        return g["test_set"]
    return f"{int(g['test_videos']):,} videos" if g.get("test_videos") else "–"


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.1f}"


def to_markdown(aggregated: list[dict[str, Any]], expected: list[dict[str, Any]], n_files: int | None = None,
                built_at: str | None = None) -> str:
    """Markdown leaderboard: one retrieval table per ranking block (this run, then the paper rows), DSL when
    present, efficiency, sources."""
    built_at = built_at or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    n_files = sum(g["n_runs"] for g in aggregated) if n_files is None else n_files
    out = [
        "# tvr-bench leaderboard",
        "",
        f"Built by `tvr-bench leaderboard` from {n_files} result file(s) on {built_at}. "
        "Recalls in %, ranks 1-based. A cell reads `mean ± std [lo, hi]`: `± std` is the seed spread (sample "
        "standard deviation over seeds, only with several seeds); `[lo, hi]` is the 95% bootstrap interval over "
        "test queries (10,000 resamples of the test videos with all their captions) of the number shown, i.e. of "
        "the seed mean when there are several seeds. "
        f"{BEST_MARK} marks the best row (t2v R@1) of each table, {TIED_MARK} the rows not significantly different "
        f"from it (paired permutation test on per-query t2v R@1, p ≥ {ALPHA}). Each table is one ranking block: "
        "rows of different datasets, backbones, profiles or features, with an incomplete test set, or whose scoring "
        "is of another result class (pairwise and gallery-normalised rows rank together; transductive rows apart; "
        "label-dependent rows are not valid retrieval results and are not ranked), are never "
        f"ranked together. \"paper\" rows are the published figures in `recipes/expected/`; {UNVERIFIED_MARK} marks a "
        "number recalled from the paper but not verified against the PDF (`[P?]`).",
        "",
    ]
    if not aggregated:
        out += ["No results yet: run `make bench` (each test writes `runs/results/*.json`).", ""]
        return "\n".join(out)
    header = ["", "method", "dataset", "backbone", "frames", "words", "protocol", "class", "test set", "source",
              "seeds"] + [f"{d} {m}" for d in DIRECTIONS for m in METRICS]
    blank = [""] * header.index("source")  # the paper rows: their label under "source", numbers aligned
    sources = []
    out += ["## Retrieval", ""]
    blocks = list(dict.fromkeys(block_of(g) for g in aggregated))
    blocks.sort(key=lambda b: b[5])  # plain retrieval first; label-dependent last, in a section of its own
    for block in blocks:
        if block[5] == CLASS_GROUPS[LABEL_DEPENDENT] and "## Not valid retrieval results" not in out:
            out += ["## Not valid retrieval results (label-dependent scoring)", "",
                    "These rows were scored with the test labels (the scoring audit's label-invariance check fails: "
                    "changing which captions belong to which video changes the scores). They are shown so that a "
                    "published number can be traced, never ranked (docs/leaderboard.md, 'What counts as a retrieval "
                    "result').", ""]
        rows = []
        for g in (g for g in aggregated if block_of(g) == block):
            seeds = ",".join(map(str, g["seeds"])) or str(g["n_runs"])
            method = g["method"] + (f" ({g['variant']})" if g["variant"] else "")
            rows.append([_mark(g), method, g["dataset"], g["backbone"], g["frames"], g["words"], _protocol_cell(g),
                         g.get("result_class") or UNAUDITED, _test_set_cell(g), "this run", seeds]
                        + [_fmt_stat(g["stats"].get(k), interval=g["intervals"].get(k)) for k in RETRIEVAL_KEYS])
            for paper in paper_entries(expected, g["method"], g["dataset"], g["backbone"]):
                cells = []
                for key in RETRIEVAL_KEYS:
                    value = paper["metrics"].get(key)
                    mark = "" if value is None or is_verified(paper["provenance"][key]) else UNVERIFIED_MARK
                    cells.append(_fmt(value) + mark)
                paper_blank = list(blank)
                paper_blank[header.index("class")] = paper.get("result_class") or ""
                rows.append(paper_blank + [paper["label"]] + [""] + cells)
                if g["profile"] == "paper":
                    diffs = [_signed(None if paper["metrics"].get(k) is None or (g["stats"].get(k) or {}).get("mean") is None
                                     else g["stats"][k]["mean"] - paper["metrics"][k]) for k in RETRIEVAL_KEYS]
                    rows.append(blank + ["ours − paper"] + [""] + diffs)
                tags = sorted(set(paper["provenance"].values()))
                sources.append(f"- **{g['method']} / {g['dataset']} / {g['backbone']}**, {paper['label']}: "
                               f"{paper['source']} (provenance: {', '.join(tags)}; `recipes/expected/{paper['file']}`)"
                               + (f". {paper['note']}" if paper["note"] else ""))
        out += [f"### {block_title(block)}", "", _md_table(header, rows), ""]
    kinds = sorted({g["interval_kind"] for g in aggregated})
    out += ["Intervals: " + "; ".join(kinds) + ".", ""]
    out += postprocessing_sections(aggregated, header)
    from tvr_bench.report_diagnostics import diagnostics_markdown

    out += diagnostics_markdown(aggregated)  # by caption type and temporal probes, when any row has them
    eff_header = ["method", "dataset", "backbone", "seeds", "params (M)", "trainable (M)", "train time (s)",
                  "train pairs/s", "eval time (s)", "eval ms/query", "texts", "videos", "device", "commit"]
    eff_rows = []
    for g in aggregated:
        s = g["stats"]
        eff_rows.append([
            g["method"] + (f" ({g['variant']})" if g["variant"] else ""), g["dataset"], g["backbone"],
            ",".join(map(str, g["seeds"])) or str(g["n_runs"]),
            _fmt_const(s.get("params"), 1e-6), _fmt_const(s.get("trainable_params"), 1e-6),
            _fmt_stat(s.get("train_seconds")), _fmt_stat(s.get("train_pairs_per_s")),
            _fmt_stat(s.get("eval_seconds"), 2), _fmt_stat(s.get("eval_ms_per_query"), 2),
            _fmt((s.get("n_texts") or {}).get("mean"), 0), _fmt((s.get("n_videos") or {}).get("mean"), 0),
            g["devices"] or "–", " ".join(c[:8] for c in g["git_commits"]) or "–",
        ])
    out += ["## Efficiency", "", _md_table(eff_header, eff_rows), "",
            "Train time is the wall time of `fit` (validation included); pairs/s counts training (text, video) "
            "pairs over the fit time minus validation. Eval time is the whole test loop (encoding and scoring); "
            "per query = eval time / number of text queries.", ""]
    if sources:
        out += ["## Paper sources", "", *dict.fromkeys(sources), ""]
    out += ["![R@1 per method and dataset](leaderboard.png)", ""]
    return "\n".join(out)


#: figure fonts (points): value labels, marks and notes above a bar, the subtitle, the legend
VALUE_FONT, MARK_FONT, TITLE_FONT, LEGEND_FONT = 7.0, 8.0, 8.5, 8.0
#: figure margin (pixels) that no text may cross; the subtitle and legend wrap to keep twice that from the edges
FIGURE_MARGIN_PX = 6.0
#: what the picture's marks mean: the subtitle, as parts joined by "; " and wrapped to the figure's width
PLOT_LEGEND_PARTS = (
    "tvr-bench: R@1 per method.",
    "error bars: 95% bootstrap interval over test queries",
    f"{BEST_MARK} best, {TIED_MARK} not significantly different",
    "'n seeds' under a value: the bar is the mean of n seeds",
    "hatched: incomplete test set",
)


def postprocessing_sections(aggregated: list[dict[str, Any]], header: list[str]) -> list[str]:
    """One Markdown section per post-processing (DSL, QB-Norm, SK-norm, Sinkhorn): its rows under their own
    keys, with the post-processed scoring's result class, never in a plain ranking block."""
    names = ["dsl"] if any(k.startswith("dsl/") for g in aggregated for k in g["stats"]) else []
    names = list(dict.fromkeys(names + [n for g in aggregated for n in g.get("post", {})]))
    out: list[str] = []
    for name in names:
        members = [g for g in aggregated if any(k.startswith(f"{name}/") for k in g["stats"])]
        if not members:
            continue
        entry = next((g["post"][name] for g in members if name in g.get("post", {})), {})
        title = "dual softmax at inference (DSL)" if name == "dsl" else entry.get("title", name)
        rows = []
        for g in sorted(members, key=lambda g: -((g["stats"].get(f"{name}/t2v/R@1") or {}).get("mean") or 0.0)):
            post = g.get("post", {}).get(name, {})
            spans = g["dsl_intervals"] if name == "dsl" else post.get("intervals") or {}
            rows.append(["", g["method"] + (f" ({g['variant']})" if g["variant"] else ""), g["dataset"], g["backbone"],
                         g["frames"], g["words"], _protocol_cell(g),
                         worst_class(g.get("result_class"), post.get("result_class")) if post.get("result_class")
                         else UNAUDITED, _test_set_cell(g), "this run", ",".join(map(str, g["seeds"]))]
                        + [_fmt_stat(g["stats"].get(f"{name}/{k}"), interval=spans.get(k)) for k in RETRIEVAL_KEYS])
        classes = sorted({r[7] for r in rows})
        settings = ", ".join(f"{k} {v}" for k, v in (entry.get("settings") or {}).items())
        out += [f"## With {title}", "",
                f"Post-processed scores under their own keys (`{name}/...`), never ranked with the plain numbers "
                f"(★/≈ refer to the plain ranking above); class: {', '.join(classes)}"
                + (f"; settings: {settings}" if settings else "") + (f"; source: {entry['source']}" if entry.get("source") else "")
                + (f"; {entry['note']}" if entry.get("note") else "") + ".", "",
                _md_table(header, rows), ""]
    return out


def plotted_rows(aggregated: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows the PNG shows: none whose scoring is transductive or label-dependent (listed in the Markdown)."""
    return [g for g in aggregated if class_group(g) not in (CLASS_GROUPS[TRANSDUCTIVE], CLASS_GROUPS[LABEL_DEPENDENT])]


def plot_leaderboard(aggregated: list[dict[str, Any]], expected: list[dict[str, Any]], path: str | Path) -> Path:
    """Write :func:`leaderboard_figure` as a PNG to `path`."""
    fig = leaderboard_figure(aggregated, expected)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write(path, buf.getvalue())


def _label(g: dict[str, Any]) -> str:
    return g["method"] + (f" ({g['variant']})" if g["variant"] else "")


def leaderboard_figure(aggregated: list[dict[str, Any]], expected: list[dict[str, Any]]) -> Any:
    """Bar chart of t2v and v2t R@1 per ranking block and method: 95% query-bootstrap error bars, ★/≈ for the best
    and tied rows, "n seeds" under the value of a seed mean, hatched bars and the test-set size for incomplete
    test sets, paper values as diamonds. Every text stays inside the figure (the subtitle and the legend wrap to
    its width) and no value label touches an error bar: a label sits inside its bar, below the interval, when it
    fits there, else above the interval, under the marks (tests/test_leaderboard.py renders and checks it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    shown = plotted_rows(aggregated)  # the picture ranks plain retrieval only
    hidden = [g for g in aggregated if g not in shown]
    aggregated = shown
    blocks = list(dict.fromkeys(block_of(g) for g in aggregated))
    labels = list(dict.fromkeys(_label(g) for g in aggregated))
    color = {m: f"C{i % 10}" for i, m in enumerate(labels)}
    most = max((sum(1 for g in aggregated if block_of(g) == b) for b in blocks), default=1)
    # about 0.6 in per bar: a "n seeds" value label (0.4 in) and a gap, so that neighbouring labels never meet
    fig = Figure(figsize=(min(24.0, max(7.0, 2.0 + 2 * len(blocks) * (0.6 + 0.6 * most))), 5.0), dpi=110)
    FigureCanvasAgg(fig)
    renderer = fig.canvas.get_renderer()
    axes = fig.subplots(1, 2, sharey=True)
    labelled: set[str] = set()
    placed: list[dict[str, Any]] = []  # one entry per bar: where its value label and marks go
    for ax, direction in zip(axes, DIRECTIONS):
        key = f"{direction}/R@1"
        for bi, block in enumerate(blocks):
            members = [g for g in aggregated if block_of(g) == block and (g["stats"].get(key) or {}).get("mean") is not None]
            width = 0.8 / max(1, len(members))
            for mi, g in enumerate(members):
                stat = g["stats"][key]
                label = _label(g)
                x = bi - 0.4 + width * (mi + 0.5)
                show = label not in labelled
                labelled.add(label)
                interval = g["intervals"].get(key)
                yerr = None
                lo = hi = stat["mean"]
                if interval:
                    yerr = [[max(0.0, stat["mean"] - interval[0])], [max(0.0, interval[1] - stat["mean"])]]
                    lo, hi = min(interval[0], stat["mean"]), max(interval[1], stat["mean"])
                elif stat.get("std") is not None:
                    yerr = [[stat["std"]], [stat["std"]]]
                    lo, hi = stat["mean"] - stat["std"], stat["mean"] + stat["std"]
                ax.bar([x], [stat["mean"]], width=width * 0.9, color=color[label], label=label if show else None,
                       yerr=yerr, capsize=4, hatch="//" if not g["complete"] else None,
                       edgecolor="white" if g["complete"] else "black")
                value = f"{stat['mean']:.1f}" + (f"\n{g['n_runs']} seeds" if g.get("n_runs", 1) > 1 else "")
                mark = _mark(g) if direction == "t2v" else ""
                note = "\n".join(p for p in (mark, g["test_set"].replace(" videos", "") if not g["complete"] and
                                             g["test_set"] else "") if p)
                placed.append({"ax": ax, "x": x, "width": width * 0.9, "mean": stat["mean"], "lo": max(0.0, lo),
                               "hi": hi, "value": value, "note": note})
                for paper in paper_entries(expected, g["method"], g["dataset"], g["backbone"])[:1]:
                    if key in paper["metrics"]:
                        show_paper = "paper" not in labelled
                        labelled.add("paper")
                        ax.plot([x], [paper["metrics"][key]], marker="D", markersize=6, markeredgecolor="white",
                                color="black", linestyle="none", label="paper" if show_paper else None)
        names = []
        for dataset, backbone, profile, features, incomplete, group in blocks:
            extra = "" if profile == "default" else f"\n{profile}"
            extra += "" if features == "end-to-end" else f"\n{features}"
            extra += "\nUNAUDITED" if group == CLASS_GROUPS[UNAUDITED] else ""
            names.append(f"{dataset}\n{backbone}{extra}" + ("\nINCOMPLETE" if incomplete else ""))
        ax.set_xticks(range(len(blocks)), names, fontsize=8)
        ax.set_xlim(-0.6, max(0, len(blocks) - 1) + 0.6)
        ax.set_title(f"{direction} R@1", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if not aggregated:
            ax.text(0.5, 0.5, "no results yet", ha="center", va="center", transform=ax.transAxes)
    axes[0].set_ylabel("R@1 (%)")

    # the header: subtitle and legend, each wrapped to the figure's width, then the axes below them
    usable = fig.bbox.width - 4 * FIGURE_MARGIN_PX
    parts = PLOT_LEGEND_PARTS + ((f"not plotted: {len(hidden)} transductive or label-dependent row(s), see "
                                  "leaderboard.md",) if hidden else ())
    title = fig.suptitle(_wrap_parts(fig, renderer, parts, TITLE_FONT, usable), fontsize=TITLE_FONT,
                         y=1 - FIGURE_MARGIN_PX / fig.bbox.height, va="top")
    title.set_in_layout(False)  # the rect given to tight_layout below already leaves its room
    bottom = title.get_window_extent(renderer).y0
    names = [lab for lab in labels if lab in labelled]
    handles: list[Any] = [Patch(color=color[lab]) for lab in names]  # plain patches: a hatched first bar is no key
    if "paper" in labelled:
        handles.append(Line2D([], [], marker="D", color="black", linestyle="none", markeredgecolor="white"))
        names.append("paper")
    if handles:
        ncol = min(6, len(handles))
        while True:
            legend = fig.legend(handles, names, loc="upper center", ncol=ncol, fontsize=LEGEND_FONT, frameon=False,
                                bbox_to_anchor=(0.5, (bottom - 2) / fig.bbox.height))
            if legend.get_window_extent(renderer).width <= usable or ncol == 1:
                break
            legend.remove()
            ncol -= 1
        bottom = legend.get_window_extent(renderer).y0
    fig.tight_layout(rect=(0, 0, 1, max(0.3, (bottom - 4) / fig.bbox.height)))
    _place_value_labels(fig, renderer, axes, placed, _ymax(aggregated, expected))
    return fig


def _wrap_parts(fig: Any, renderer: Any, parts: tuple[str, ...], fontsize: float, width_px: float) -> str:
    """`parts` joined by "; " into as few lines as fit `width_px` at `fontsize` (measured, not guessed)."""
    lines: list[str] = []
    for part in parts:
        candidate = f"{lines[-1]}; {part}" if lines and not lines[-1].endswith(".") else None
        if candidate is not None and _text_px(fig, renderer, candidate, fontsize)[0] <= width_px:
            lines[-1] = candidate
        else:
            lines.append(part)
    return "\n".join(lines)


def _text_px(fig: Any, renderer: Any, text: str, fontsize: float) -> tuple[float, float]:
    """(width, height) in pixels of `text` drawn at `fontsize` points."""
    probe = fig.text(0, 0, text, fontsize=fontsize)
    box = probe.get_window_extent(renderer)
    probe.remove()
    return box.width, box.height


def _place_value_labels(fig: Any, renderer: Any, axes: Any, placed: list[dict[str, Any]], ymax: float) -> None:
    """Write each bar's value label and marks: the label inside the bar, centred below its interval, when it fits
    there (white), else above the interval (black) with the marks above it; the y range grows to hold the marks."""
    pad = 2.0  # points between a whisker, a label and a mark
    to_px = fig.dpi / 72.0
    for item in placed:
        item["value_px"] = _text_px(fig, renderer, item["value"], VALUE_FONT)
        item["note_px"] = _text_px(fig, renderer, item["note"], MARK_FONT) if item["note"] else (0.0, 0.0)
    top = min(100.0, max(10.0, ymax * 1.2))
    for _ in range(3):  # a larger y range makes more labels fit inside their bars: settle in a few rounds
        for ax in axes:
            ax.set_ylim(0, top)
        needed = top
        for item in placed:
            ax = item["ax"]
            per_px = top / max(1.0, ax.get_window_extent(renderer).height)  # data units per pixel
            bar_px = item["width"] * ax.get_window_extent(renderer).width / max(1e-9, ax.get_xlim()[1] - ax.get_xlim()[0])
            w, h = item["value_px"]
            item["inside"] = (pad * to_px + h + pad * to_px) * per_px <= item["lo"] and w + 2 <= bar_px
            stack_px = (0.0 if item["inside"] else pad * to_px + h) + (pad * to_px + item["note_px"][1] if item["note"] else 0.0)
            needed = max(needed, item["hi"] + (stack_px + 2 * pad * to_px) * per_px)
        if needed <= top * 1.0001:
            break
        top = needed
    for item in placed:
        ax = item["ax"]
        above = pad
        if item["inside"]:  # centred between the base and the interval's lower end
            ax.annotate(item["value"], xy=(item["x"], item["lo"] / 2), ha="center", va="center", fontsize=VALUE_FONT,
                        color="white", gid="value-label")
        else:
            ax.annotate(item["value"], xy=(item["x"], item["hi"]), xytext=(0, pad), textcoords="offset points",
                        ha="center", va="bottom", fontsize=VALUE_FONT, color="black", gid="value-label")
            above += item["value_px"][1] / to_px + pad
        if item["note"]:
            ax.annotate(item["note"], xy=(item["x"], item["hi"]), xytext=(0, above), textcoords="offset points",
                        ha="center", va="bottom", fontsize=MARK_FONT, gid="bar-mark")


def _ymax(aggregated: list[dict[str, Any]], expected: list[dict[str, Any]]) -> float:
    """Largest R@1 (upper interval bound or + std) or paper R@1 on the plot."""
    top = 0.0
    for g in aggregated:
        for d in DIRECTIONS:
            stat = g["stats"].get(f"{d}/R@1") or {}
            if stat.get("mean") is not None:
                interval = g["intervals"].get(f"{d}/R@1")
                top = max(top, interval[1] if interval else stat["mean"] + (stat.get("std") or 0.0))
            for paper in paper_entries(expected, g["method"], g["dataset"], g["backbone"])[:1]:
                top = max(top, paper["metrics"].get(f"{d}/R@1", 0.0))
    return top


# ---------------------------------------------------------------------------------------------- building
def build_leaderboard(runs_dir: str | Path = "runs", expected_dir: str | Path | None = None,
                      out_dir: str | Path | None = None) -> dict[str, Any]:
    """Rebuild `leaderboard.csv`, `.md` and `.png` in `out_dir` (default `runs_dir`) from the result JSONs."""
    out = Path(out_dir) if out_dir is not None else Path(runs_dir)
    results = load_results(runs_dir)
    expected = load_expected(expected_dir)
    aggregated = aggregate(results)
    from tvr_bench.perf.search_bench import cost_markdown, cost_row_fields, load_leaderboard_costs

    costs = load_leaderboard_costs(Path(runs_dir) / "perf.json")  # `make perf`'s search section, when it ran
    rows = [{**row, **cost_row_fields(row["method"], costs)} for row in leaderboard_rows(aggregated, expected)]
    cost_lines = cost_markdown([(g["method"] + (f" ({g['variant']})" if g["variant"] else ""), g["dataset"], g["backbone"],
                                 (g["stats"].get("t2v/R@1") or {}).get("mean")) for g in aggregated], costs)
    paths = {
        "csv": atomic_write(out / "leaderboard.csv", to_csv(rows)),
        "md": atomic_write(out / "leaderboard.md", "\n".join([to_markdown(aggregated, expected, n_files=len(results)),
                                                              *cost_lines])),
        "png": plot_leaderboard(aggregated, expected, out / "leaderboard.png"),
    }
    from tvr_bench.report_diagnostics import PLOT_FILE, plot_diagnostics

    diagnostics_png = plot_diagnostics(aggregated, out / PLOT_FILE)
    if diagnostics_png is not None:
        paths["diagnostics_png"] = diagnostics_png
    return {"paths": paths, "aggregated": aggregated, "expected": expected, "n_results": len(results)}


def _print_console(aggregated: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """A compact rich table of the leaderboard on the terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tvr-bench leaderboard (R@1: mean ± seed std [95% bootstrap interval over test queries]; "
                        f"{BEST_MARK} best, {TIED_MARK} not significantly different)")
    for i, col in enumerate(("", "method", "dataset", "backbone", "profile", "class", "test set", "seeds", "t2v R@1",
                             "paper t2v", "v2t R@1", "paper v2t")):
        table.add_column(col, justify="left" if i < 7 else "right", no_wrap=True)
    for g in aggregated:
        papers = paper_entries(expected, g["method"], g["dataset"], g["backbone"])
        p = papers[0]["metrics"] if papers else {}
        table.add_row(_mark(g), g["method"] + (f" ({g['variant']})" if g["variant"] else ""), g["dataset"],
                      g["backbone"], g["profile"], g.get("result_class") or UNAUDITED, _test_set_cell(g),
                      ",".join(map(str, g["seeds"])) or str(g["n_runs"]),
                      _fmt_stat(g["stats"].get("t2v/R@1"), interval=g["intervals"].get("t2v/R@1")), _fmt(p.get("t2v/R@1")),
                      _fmt_stat(g["stats"].get("v2t/R@1"), interval=g["intervals"].get("v2t/R@1")), _fmt(p.get("v2t/R@1")))
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        console = Console(width=200)
    console.print(table)


def leaderboard_main(argv: list[str] | None = None) -> int:
    """`tvr-bench leaderboard --runs runs`: rebuild the leaderboard files and print a summary table."""
    parser = argparse.ArgumentParser(prog="tvr-bench leaderboard", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs", help="folder holding results/*.json (default: runs)")
    parser.add_argument("--expected", default=None, help="folder of paper numbers (default: recipes/expected)")
    parser.add_argument("--out", default=None, help="where to write leaderboard.{csv,md,png} (default: --runs)")
    parser.add_argument("--quiet", action="store_true", help="do not print the table")
    args = parser.parse_args(argv)
    if not load_results(args.runs):  # nothing to show: write nothing (no empty leaderboard over an old one)
        print(f"error: no result files under {Path(args.runs) / RESULTS_SUBDIR}: run `make bench` first (each test "
              "writes one); nothing was written", file=sys.stderr)
        return 1
    built = build_leaderboard(args.runs, args.expected, args.out)
    if not args.quiet:
        _print_console(built["aggregated"], built["expected"])
        for kind, path in built["paths"].items():
            print(f"wrote {path}")
    return 0
