"""The leaderboard's diagnostics: retrieval by caption type and the temporal probes (tables and one plot).

Built by `tvr-bench leaderboard` from the aggregated rows of :func:`tvr_bench.report.aggregate`: the per-type
and per-probe columns of each result (:func:`tvr_bench.results.diagnostic_columns`) averaged over seeds, with the
95% bootstrap interval of the seed mean recomputed from the saved per-query ranks and their caption types
(tvr_bench/diagnostics.py). A probe's drop (plain - probe) carries its paired interval when the row has one seed.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from tvr_bench.diagnostics import GROUP_METRICS, group_metrics
from tvr_bench.results import atomic_write
from tvr_bench.stats import DEFAULT_RESAMPLES

#: The plot written beside leaderboard.png when some row has diagnostics.
PLOT_FILE = "leaderboard_diagnostics.png"

__all__ = ["PLOT_FILE", "diagnostics_markdown", "plot_diagnostics", "probe_names", "type_names"]


def _names(aggregated: list[dict[str, Any]], prefix: str, suffix: str) -> list[str]:
    """Middle parts `X` of the stats fields `<prefix>X<suffix>` in first-seen order."""
    found = [f[len(prefix): -len(suffix)] for g in aggregated for f in g["stats"]
             if f.startswith(prefix) and f.endswith(suffix) and "/" not in f[len(prefix): -len(suffix)]]
    return list(dict.fromkeys(found))


def type_names(aggregated: list[dict[str, Any]]) -> list[str]:
    """The caption types any row reports (`types/<type>/t2v/R@1`)."""
    return _names(aggregated, "types/", "/t2v/R@1")


def probe_names(aggregated: list[dict[str, Any]]) -> list[str]:
    """The temporal probes any row reports (`probe/<name>/t2v/R@1`)."""
    return _names(aggregated, "probe/", "/t2v/R@1")


def _label(g: dict[str, Any], several_datasets: bool) -> str:
    label = g["method"] + (f" ({g['variant']})" if g["variant"] else "")
    return f"{label} · {g['dataset']}" if several_datasets else label


def type_intervals(g: dict[str, Any], n_boot: int = DEFAULT_RESAMPLES) -> dict[str, dict[str, list[float]]]:
    """`{type: {metric: [lo, hi]}}` of a row: the interval of the seed mean from the saved ranks, else (one run)
    the interval stored in its result; empty when neither exists."""
    sets = g.get("_per_query") or []
    if sets and all(pq is not None and pq.t2v_group is not None for pq in sets):
        try:
            return {t: e.get("intervals", {}) for t, e in group_metrics(sets, n_boot).items()}
        except ValueError:
            pass  # the seeds were tested on different queries
    if g.get("n_runs") != 1:
        return {}
    out: dict[str, dict[str, list[float]]] = {}
    for t in type_names([g]):
        for m in GROUP_METRICS:
            lo, hi = (g["stats"].get(f"types/{t}/{m}_ci_{b}") or {} for b in ("lo", "hi"))
            if lo.get("mean") is not None and hi.get("mean") is not None:
                out.setdefault(t, {})[m] = [lo["mean"], hi["mean"]]
    return out


def _cell(stat: dict[str, Any] | None, interval: list[float] | None = None) -> str:
    """`mean ± std [lo, hi]` as the retrieval tables write it."""
    from tvr_bench.report import _fmt_stat

    return _fmt_stat(stat, interval=interval)


def _drop_interval(g: dict[str, Any], probe: str) -> list[float] | None:
    """The paired interval of a one-run row's t2v R@1 drop under `probe`."""
    if g.get("n_runs") != 1:
        return None
    lo, hi = (g["stats"].get(f"probe/{probe}/drop/t2v/R@1_ci_{b}") or {} for b in ("lo", "hi"))
    return [lo["mean"], hi["mean"]] if lo.get("mean") is not None and hi.get("mean") is not None else None


def diagnostics_markdown(aggregated: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of the two diagnostic tables (nothing when no row has diagnostics)."""
    from tvr_bench.report import _md_table

    out: list[str] = []
    types, probes = type_names(aggregated), probe_names(aggregated)
    several = len({g["dataset"] for g in aggregated}) > 1
    if types:
        rows = []
        for g in (g for g in aggregated if any(f"types/{t}/t2v/R@1" in g["stats"] for t in types)):
            intervals = type_intervals(g)
            cells = [_cell(g["stats"].get(f"types/{t}/{m}"), (intervals.get(t) or {}).get(m))
                     for t in types for m in GROUP_METRICS]
            rows.append([_label(g, several), g["dataset"], g["backbone"], ",".join(map(str, g["seeds"])) or str(g["n_runs"]),
                         *cells])
        header = ["method", "dataset", "backbone", "seeds"] + [f"{t} {m.split('/')[-1]}" for t in types for m in GROUP_METRICS]
        out += ["## Diagnostics by caption type", "",
                "Text-to-video recall (t2v R@1, R@5) of each kind of caption alone (every caption still ranks all test videos): "
                "`mean ± seed std [95% bootstrap interval of the seed mean]`. Synthetic caption types "
                "(data_cards/synthetic.md): `full` both events in order with the background, `first` / `second` one "
                "event only, `order` both events and their order, `objects` the two objects and the background, no "
                "motion. Plot: `" + PLOT_FILE + "`.", "", _md_table(header, rows), ""]
    if probes:
        rows = []
        for g in (g for g in aggregated if any(f"probe/{p}/t2v/R@1" in g["stats"] for p in probes)):
            cells = [_cell(g["stats"].get("t2v/R@1"))]
            for p in probes:
                cells += [_cell(g["stats"].get(f"probe/{p}/t2v/R@1")),
                          _cell(g["stats"].get(f"probe/{p}/drop/t2v/R@1"), _drop_interval(g, p))]
            order_drop = g["stats"].get("probe/reversed/types/order/t2v/R@1")
            plain_order = g["stats"].get("types/order/t2v/R@1")
            cells.append("–" if not order_drop or not plain_order else f"{plain_order['mean'] - order_drop['mean']:.1f}")
            rows.append([_label(g, several), g["dataset"], g["backbone"], ",".join(map(str, g["seeds"])) or str(g["n_runs"]),
                         *cells])
        header = (["method", "dataset", "backbone", "seeds", "t2v R@1"]
                  + [c for p in probes for c in (f"{p} R@1", f"{p} drop")] + ["reversed drop, `order` captions"])
        out += ["## Temporal probes", "",
                "The test set scored again with every video's frames reversed, shuffled, or all replaced by the middle "
                "frame (`--evaluator.probes all`; the single-frame probe follows Lei et al. 2022). Drop = plain − probe "
                "t2v R@1 (`[lo, hi]`: 95% paired bootstrap interval, one seed; `±`: seed std). A model that ignores "
                "frame order loses nothing under `reversed`/`shuffled`; one that reads a single frame loses little "
                "under `middle`. Each probe costs one more encoding of the test videos.", "",
                _md_table(header, rows), ""]
    return out


def plot_diagnostics(aggregated: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Bar chart of t2v R@1 by caption type per row (95% interval bars) and of each probe's t2v R@1 drop per row;
    None (nothing written) when no row has diagnostics."""
    types, probes = type_names(aggregated), probe_names(aggregated)
    if not types and not probes:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    several = len({g["dataset"] for g in aggregated}) > 1
    panels = [p for p, names in (("types", types), ("probes", probes)) if names]
    fig = Figure(figsize=(6.5 * len(panels), 4.8), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        names = types if panel == "types" else probes
        key = (lambda n: f"types/{n}/t2v/R@1") if panel == "types" else (lambda n: f"probe/{n}/drop/t2v/R@1")
        rows = [g for g in aggregated if any(key(n) in g["stats"] for n in names)]
        width = 0.8 / max(1, len(rows))
        for ri, g in enumerate(rows):
            intervals = type_intervals(g) if panel == "types" else {}
            xs, heights, lows, highs = [], [], [], []
            for ni, n in enumerate(names):
                stat = g["stats"].get(key(n))
                if not stat:
                    continue
                bounds = (intervals.get(n) or {}).get("t2v/R@1") if panel == "types" else _drop_interval(g, n)
                spread = stat.get("std") or 0.0
                xs.append(ni - 0.4 + width * (ri + 0.5))
                heights.append(stat["mean"])
                lows.append(max(0.0, stat["mean"] - bounds[0]) if bounds else spread)
                highs.append(max(0.0, bounds[1] - stat["mean"]) if bounds else spread)
            ax.bar(xs, heights, width=width * 0.9, yerr=[lows, highs], capsize=3, color=f"C{ri % 10}",
                   label=_label(g, several))
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.grid(axis="y", alpha=0.3)
        if panel == "types":
            ax.set_title("t2v R@1 by caption type (95% interval bars)", fontsize=9)
            ax.set_ylabel("R@1 (%)")
        else:
            ax.set_title("t2v R@1 drop under each temporal probe (plain − probe)", fontsize=9)
            ax.set_ylabel("drop (points)")
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write(path, buf.getvalue())
