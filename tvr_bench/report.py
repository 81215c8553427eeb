"""`tvr-bench leaderboard`: build `leaderboard.csv`, `leaderboard.md` and `leaderboard.png` from the result
JSONs under `runs/results/`, with mean ± std over seeds and the published numbers of `recipes/expected/`.

Everything but the file writing is a pure function of the loaded results, so it is easy to test.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import re
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from tvr_bench.results import GROUP_KEY, RESULTS_SUBDIR, atomic_write, canonical_backbone, flat_row, load_results

DIRECTIONS = ("t2v", "v2t")
METRICS = ("R@1", "R@5", "R@10", "MdR", "MnR")
RETRIEVAL_KEYS = tuple(f"{d}/{m}" for d in DIRECTIONS for m in METRICS)
#: flat-row fields that describe a run rather than measure it (never averaged)
IDENTITY_FIELDS = ("method", "dataset", "backbone", "frames", "words", "seed", "git_commit", "timestamp", "device")
UNVERIFIED_TAG = "[P?]"
UNVERIFIED_MARK = "†"

__all__ = [
    "aggregate",
    "build_leaderboard",
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
            entries.append(
                {
                    "method": str(item.get("method", doc.get("method"))),
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
        if e["method"] == method
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


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (method, dataset, backbone): seeds, and mean/std/n of every numeric field over them."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault(tuple(str(result[k]) for k in GROUP_KEY), []).append(flat_row(result))
    out = []
    for key, rows in groups.items():
        fields = [f for f in dict.fromkeys(f for r in rows for f in r) if f not in IDENTITY_FIELDS]
        stats = {}
        for field in fields:
            values = [r.get(field) for r in rows]
            if all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values):
                mean, std, n = mean_std(values)
                if n:
                    stats[field] = {"mean": mean, "std": std, "n": n}
        seeds = sorted((r["seed"] for r in rows if r.get("seed") is not None), key=lambda s: (str(type(s)), s))
        out.append(
            {
                **dict(zip(GROUP_KEY, key)),
                "frames": _joined(r.get("frames") for r in rows),
                "words": _joined(r.get("words") for r in rows),
                "seeds": seeds,
                "n_runs": len(rows),
                "stats": stats,
                "git_commits": sorted({r["git_commit"] for r in rows if r.get("git_commit")}),
                "devices": _joined(r.get("device") for r in rows),
                "last_timestamp": max((r.get("timestamp") or "" for r in rows), default=""),
            }
        )
    out.sort(key=lambda g: (g["dataset"], g["backbone"], -(g["stats"].get("t2v/R@1", {}).get("mean") or 0.0), g["method"]))
    return out


def leaderboard_rows(aggregated: list[dict[str, Any]], expected: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat CSV rows: identity, `<field>` mean and `<field>_std` for every measured field, the first paper entry."""
    fields = list(dict.fromkeys(f for g in aggregated for f in g["stats"]))
    fields.sort(key=lambda f: (0, RETRIEVAL_KEYS.index(f)) if f in RETRIEVAL_KEYS else (1, 0))
    rows = []
    for g in aggregated:
        row: dict[str, Any] = {k: g[k] for k in GROUP_KEY}
        row.update(frames=g["frames"], words=g["words"], n_runs=g["n_runs"], seeds=" ".join(map(str, g["seeds"])))
        for field in fields:
            stat = g["stats"].get(field) or {}
            row[field] = stat.get("mean")
            row[f"{field}_std"] = stat.get("std")
        papers = paper_entries(expected, g["method"], g["dataset"], g["backbone"])
        paper = papers[0] if papers else None
        row["paper_label"] = paper["label"] if paper else None
        for key in RETRIEVAL_KEYS:
            row[f"paper/{key}"] = paper["metrics"].get(key) if paper else None
            row[f"paper/{key}_provenance"] = paper["provenance"].get(key) if paper else None
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


def _fmt_stat(stat: dict[str, Any] | None, digits: int = 1, scale: float = 1.0) -> str:
    """`mean ± std` (std only with several seeds), `–` when missing."""
    if not stat or stat.get("mean") is None:
        return "–"
    text = f"{stat['mean'] * scale:.{digits}f}"
    return text + (f" ± {stat['std'] * scale:.{digits}f}" if stat.get("std") is not None else "")


TEXT_COLUMNS = {"method", "dataset", "backbone", "frames", "words", "source", "seeds", "device", "commit"}


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


def to_markdown(aggregated: list[dict[str, Any]], expected: list[dict[str, Any]], n_files: int | None = None,
                built_at: str | None = None) -> str:
    """Markdown leaderboard: retrieval (this run, then the paper rows), DSL when present, efficiency, sources."""
    built_at = built_at or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    n_files = sum(g["n_runs"] for g in aggregated) if n_files is None else n_files
    out = [
        "# tvr-bench leaderboard",
        "",
        f"Built by `tvr-bench leaderboard` from {n_files} result file(s) on {built_at}. "
        "Recalls in %, ranks 1-based; `mean ± std` is over seeds (sample standard deviation) when a row has "
        f"several. \"paper\" rows are the published figures in `recipes/expected/`; {UNVERIFIED_MARK} marks a "
        "number recalled from the paper but not verified against the PDF (`[P?]`).",
        "",
    ]
    if not aggregated:
        out += ["No results yet: run `make bench` (each test writes `runs/results/*.json`).", ""]
        return "\n".join(out)
    header = ["method", "dataset", "backbone", "frames", "words", "source", "seeds"] + [
        f"{d} {m}" for d in DIRECTIONS for m in METRICS
    ]
    rows = []
    sources = []
    for g in aggregated:
        seeds = ",".join(map(str, g["seeds"])) or str(g["n_runs"])
        rows.append([g["method"], g["dataset"], g["backbone"], g["frames"], g["words"], "this run", seeds]
                    + [_fmt_stat(g["stats"].get(k)) for k in RETRIEVAL_KEYS])
        for paper in paper_entries(expected, g["method"], g["dataset"], g["backbone"]):
            cells = []
            for key in RETRIEVAL_KEYS:
                value = paper["metrics"].get(key)
                mark = "" if value is None or is_verified(paper["provenance"][key]) else UNVERIFIED_MARK
                cells.append(_fmt(value) + mark)
            rows.append(["", "", "", "", "", paper["label"], ""] + cells)
            tags = sorted(set(paper["provenance"].values()))
            sources.append(f"- **{g['method']} / {g['dataset']} / {g['backbone']}**, {paper['label']}: "
                           f"{paper['source']} (provenance: {', '.join(tags)}; `recipes/expected/{paper['file']}`)"
                           + (f". {paper['note']}" if paper["note"] else ""))
    out += ["## Retrieval", "", _md_table(header, rows), ""]
    if any(k.startswith("dsl/") for g in aggregated for k in g["stats"]):
        dsl_rows = [[g["method"], g["dataset"], g["backbone"], g["frames"], g["words"], "this run",
                     ",".join(map(str, g["seeds"]))] + [_fmt_stat(g["stats"].get(f"dsl/{k}")) for k in RETRIEVAL_KEYS]
                    for g in aggregated if any(k.startswith("dsl/") for k in g["stats"])]
        out += ["## With dual softmax at inference (DSL)", "", _md_table(header, dsl_rows), ""]
    eff_header = ["method", "dataset", "backbone", "seeds", "params (M)", "trainable (M)", "train time (s)",
                  "train pairs/s", "eval time (s)", "eval ms/query", "texts", "videos", "device", "commit"]
    eff_rows = []
    for g in aggregated:
        s = g["stats"]
        eff_rows.append([
            g["method"], g["dataset"], g["backbone"], ",".join(map(str, g["seeds"])) or str(g["n_runs"]),
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
        out += ["## Paper sources", "", *sources, ""]
    out += ["![R@1 per method and dataset](leaderboard.png)", ""]
    return "\n".join(out)


def plot_leaderboard(aggregated: list[dict[str, Any]], expected: list[dict[str, Any]], path: str | Path) -> Path:
    """Bar chart of t2v and v2t R@1 per (dataset, backbone) and method: error bars over seeds, paper values as diamonds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = list(dict.fromkeys((g["dataset"], g["backbone"]) for g in aggregated))
    methods = list(dict.fromkeys(g["method"] for g in aggregated))
    color = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    most = max((sum(1 for g in aggregated if (g["dataset"], g["backbone"]) == grp) for grp in groups), default=1)
    fig = Figure(figsize=(min(24.0, max(7.0, 2.0 + 2 * len(groups) * (0.6 + 0.45 * most))), 4.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    labelled: set[str] = set()
    for ax, direction in zip(axes, DIRECTIONS):
        key = f"{direction}/R@1"
        for gi, (dataset, backbone) in enumerate(groups):
            members = [g for g in aggregated if (g["dataset"], g["backbone"]) == (dataset, backbone)
                       and (g["stats"].get(key) or {}).get("mean") is not None]
            width = 0.8 / max(1, len(members))
            for mi, g in enumerate(members):
                stat = g["stats"][key]
                x = gi - 0.4 + width * (mi + 0.5)
                show = g["method"] not in labelled
                labelled.add(g["method"])
                bars = ax.bar([x], [stat["mean"]], width=width * 0.9, color=color[g["method"]],
                              label=g["method"] if show else None,
                              yerr=[stat["std"]] if stat.get("std") is not None else None, capsize=4)
                ax.bar_label(bars, labels=[f"{stat['mean']:.1f}"], label_type="center", fontsize=7, color="white")
                for paper in paper_entries(expected, g["method"], dataset, backbone)[:1]:
                    if key in paper["metrics"]:
                        show_paper = "paper" not in labelled
                        labelled.add("paper")
                        ax.plot([x], [paper["metrics"][key]], marker="D", markersize=6, markeredgecolor="white",
                                color="black", linestyle="none", label="paper" if show_paper else None)
        ax.set_xticks(range(len(groups)), [f"{d}\n{b}" for d, b in groups], fontsize=8)
        ax.set_xlim(-0.6, max(0, len(groups) - 1) + 0.6)
        ax.set_title(f"{direction} R@1", fontsize=10)
        ax.set_ylim(0, min(100.0, max(10.0, _ymax(aggregated, expected) * 1.15)))
        ax.grid(axis="y", alpha=0.3)
        if not aggregated:
            ax.text(0.5, 0.5, "no results yet", ha="center", va="center", transform=ax.transAxes)
    axes[0].set_ylabel("R@1 (%)")
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.suptitle("tvr-bench: R@1 per method and dataset (mean ± std over seeds)", y=0.985, fontsize=11)
    if handles:
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.93), ncol=min(6, len(handles)),
                   fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write(path, buf.getvalue())


def _ymax(aggregated: list[dict[str, Any]], expected: list[dict[str, Any]]) -> float:
    """Largest R@1 (+ std) or paper R@1 on the plot."""
    top = 0.0
    for g in aggregated:
        for d in DIRECTIONS:
            stat = g["stats"].get(f"{d}/R@1") or {}
            if stat.get("mean") is not None:
                top = max(top, stat["mean"] + (stat.get("std") or 0.0))
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
    paths = {
        "csv": atomic_write(out / "leaderboard.csv", to_csv(leaderboard_rows(aggregated, expected))),
        "md": atomic_write(out / "leaderboard.md", to_markdown(aggregated, expected, n_files=len(results))),
        "png": plot_leaderboard(aggregated, expected, out / "leaderboard.png"),
    }
    return {"paths": paths, "aggregated": aggregated, "expected": expected, "n_results": len(results)}


def _print_console(aggregated: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """A compact rich table of the leaderboard on the terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tvr-bench leaderboard (R@1, mean ± std over seeds)")
    for i, col in enumerate(("method", "dataset", "backbone", "seeds", "t2v R@1", "paper t2v", "v2t R@1", "paper v2t")):
        table.add_column(col, justify="left" if i < 3 else "right", no_wrap=True)
    for g in aggregated:
        papers = paper_entries(expected, g["method"], g["dataset"], g["backbone"])
        p = papers[0]["metrics"] if papers else {}
        table.add_row(g["method"], g["dataset"], g["backbone"], ",".join(map(str, g["seeds"])) or str(g["n_runs"]),
                      _fmt_stat(g["stats"].get("t2v/R@1")), _fmt(p.get("t2v/R@1")),
                      _fmt_stat(g["stats"].get("v2t/R@1")), _fmt(p.get("v2t/R@1")))
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)


def leaderboard_main(argv: list[str] | None = None) -> int:
    """`tvr-bench leaderboard --runs runs`: rebuild the leaderboard files and print a summary table."""
    parser = argparse.ArgumentParser(prog="tvr-bench leaderboard", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs", help="folder holding results/*.json (default: runs)")
    parser.add_argument("--expected", default=None, help="folder of paper numbers (default: recipes/expected)")
    parser.add_argument("--out", default=None, help="where to write leaderboard.{csv,md,png} (default: --runs)")
    parser.add_argument("--quiet", action="store_true", help="do not print the table")
    args = parser.parse_args(argv)
    built = build_leaderboard(args.runs, args.expected, args.out)
    if not args.quiet:
        _print_console(built["aggregated"], built["expected"])
        for kind, path in built["paths"].items():
            print(f"wrote {path}")
    if built["n_results"] == 0:
        print(f"no result files under {Path(args.runs) / RESULTS_SUBDIR}: run `make bench` first")
        return 1
    return 0
