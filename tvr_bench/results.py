"""Result files shared by the LeaderboardWriter callback, the leaderboard builder and `tvr-bench compare`:
the result JSON schema and file names, atomic writes, the canonical backbone label, the flat leaderboard row
and the loader of `runs/results/*.json`. Pure helpers without Lightning hooks, so that
`tvr_bench.callbacks.leaderboard` and `tvr_bench.report` both import this module and not each other.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from tvr_bench.loggers import slug

SCHEMA = "tvr-bench/result/v1"
RESULTS_SUBDIR = "results"
#: the fields that name a leaderboard row (one row per distinct value of these, seeds averaged)
GROUP_KEY = ("method", "dataset", "backbone")

__all__ = [
    "GALLERY_NORMALISED",
    "GROUP_KEY",
    "LABEL_DEPENDENT",
    "PAIRWISE",
    "RANKED_CLASSES",
    "RESULT_CLASSES",
    "TRANSDUCTIVE",
    "UNAUDITED",
    "RESULTS_SUBDIR",
    "SCHEMA",
    "atomic_write",
    "canonical_backbone",
    "diagnostic_columns",
    "flat_row",
    "load_results",
    "protocol_of",
    "data_differences",
    "data_identity",
    "identity_differences",
    "result_class_of",
    "ranks_path",
    "result_filename",
    "test_set_label",
    "variant_label",
    "variant_of",
    "worst_class",
]


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def canonical_backbone(name: str | None) -> str:
    """Backbone label used in leaderboards: `ViT-B/32` for any CLIP B/32 (hub name or folder), else the name."""
    if not name:
        return "unknown"
    text = str(name).rstrip("/\\")
    low = text.lower().replace("_", "-")
    for pattern, label in (("large-patch14", "ViT-L/14"), ("l-14", "ViT-L/14"), ("l/14", "ViT-L/14"),
                           ("patch32", "ViT-B/32"), ("b-32", "ViT-B/32"), ("b/32", "ViT-B/32"), ("b32", "ViT-B/32"),
                           ("patch16", "ViT-B/16"), ("b-16", "ViT-B/16"), ("b/16", "ViT-B/16"), ("b16", "ViT-B/16")):
        if pattern in low:
            return label
    return os.path.basename(text) or text


#: Result classes of a scoring, from the scoring audit (tvr_bench/audit.py; docs/leaderboard.md, "What counts as a
#: retrieval result"): score(t, v) depends on t and v alone / also on the gallery / on the other test queries /
#: on the test labels. Only the first two are ranked together; a result without a verdict is `unaudited`.
PAIRWISE, GALLERY_NORMALISED, TRANSDUCTIVE, LABEL_DEPENDENT = "pairwise", "gallery-normalised", "transductive", "label-dependent"
RESULT_CLASSES = (PAIRWISE, GALLERY_NORMALISED, TRANSDUCTIVE, LABEL_DEPENDENT)
RANKED_CLASSES = (PAIRWISE, GALLERY_NORMALISED)
UNAUDITED = "unaudited"


def worst_class(*classes: str | None) -> str:
    """The least trustworthy of some result classes (`unaudited` when none is known)."""
    known = [c for c in classes if c in RESULT_CLASSES]
    return max(known, key=RESULT_CLASSES.index) if known else UNAUDITED


def result_class_of(result: dict[str, Any]) -> str:
    """The result class of a result JSON's plain numbers (`unaudited` for results that predate the audit)."""
    return str((result.get("protocol") or {}).get("result_class") or UNAUDITED)


#: the `protocol` values a result has when its JSON predates the block (or an input was not exposed)
PROTOCOL_DEFAULTS: dict[str, Any] = {"profile": "default", "features": "end-to-end", "training": "fine-tuned"}
#: protocol fields that make runs different leaderboard rows (besides method, dataset, backbone)
VARIANT_FIELDS = ("profile", "features", "pairing", "eps_mode", "grouping", "padding", "training")
RANKS_SUFFIX = ".ranks.npz"


def protocol_of(result: dict[str, Any]) -> dict[str, Any]:
    """The result's `protocol` block with the defaults filled in."""
    return {**PROTOCOL_DEFAULTS, **(result.get("protocol") or {})}


def data_identity(result: dict[str, Any]) -> dict[str, Any]:
    """The test data a result was measured on, beyond its query keys (which can match on different data):
    dataset, test split, protocol size, and for the synthetic benchmark its generation seed and size
    (None where the result does not record it)."""
    proto = protocol_of(result)
    hparams = (result.get("datamodule") or {}).get("hparams") or {}
    synthetic = str(result.get("dataset")) == "synthetic"
    return {
        "dataset": result.get("dataset"),
        "split": proto.get("test_split"),
        "protocol size": proto.get("protocol_videos"),
        "synthetic generation seed": hparams.get("synth_seed") if synthetic else None,
        "synthetic size": hparams.get("size") if synthetic else None,
    }


def data_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """How the test data of two results differ (`"synthetic generation seed 0 vs 1"`), from their
    :func:`data_identity`; a field recorded by only one of them is not counted. Empty: the same data."""
    return identity_differences(data_identity(a), data_identity(b))


def identity_differences(ia: dict[str, Any], ib: dict[str, Any]) -> list[str]:
    """The fields in which two :func:`data_identity` dicts differ, both sides known."""
    return [f"{k} {ia[k]} vs {ib.get(k)}" for k in ia if ia[k] is not None and ib.get(k) is not None and ia[k] != ib[k]]


def variant_label(protocol: dict[str, Any]) -> str:
    """Label of a protocol variant (`""` for the default): non-default profile and features, T-MASS pairing, EMCL grouping."""
    proto = {**PROTOCOL_DEFAULTS, **protocol}
    parts = []
    for name in VARIANT_FIELDS:
        value = proto.get(name)
        if value is not None and value != PROTOCOL_DEFAULTS.get(name):
            parts.append(f"{name}={value}")
    return ", ".join(parts)


def variant_of(result: dict[str, Any]) -> str:
    """The protocol variant label of a result JSON: its `protocol.variant` (written by LeaderboardWriter, which
    leaves out settings equal to the method's defaults), else :func:`variant_label` of its protocol."""
    proto = protocol_of(result)
    return str(proto["variant"]) if proto.get("variant") is not None else variant_label(proto)


def test_set_label(test_videos: Any, protocol_videos: Any) -> str:
    """`"987/1,000 videos"` when the test set is below the protocol size, `"complete"` at it, `""` when unknown."""
    if not test_videos or not protocol_videos:
        return ""
    if int(test_videos) >= int(protocol_videos):
        return "complete"
    return f"{int(test_videos):,}/{int(protocol_videos):,} videos"


def result_filename(method: str, dataset: str, backbone: str, seed: int | None, variant: str = "") -> str:
    """File name of one run's result JSON: unique per (method, dataset, backbone, protocol variant, seed)."""
    tail = f"__{slug(variant)}" if variant else ""
    return f"{slug(method)}__{slug(dataset)}__{slug(backbone)}{tail}__seed{'none' if seed is None else seed}.json"


def ranks_path(result_path: str | os.PathLike[str]) -> Path:
    """The per-query ranks file beside a result JSON (`x.json` -> `x.ranks.npz`)."""
    path = Path(result_path)
    return path.with_name(path.name[: -len(".json")] + RANKS_SUFFIX if path.name.endswith(".json") else path.name + RANKS_SUFFIX)


def flat_row(result: dict[str, Any]) -> dict[str, Any]:
    """The flat leaderboard row of a result JSON (one scalar per column): CSV, W&B table, summary."""
    row: dict[str, Any] = {k: result.get(k) for k in ("method", "dataset", "backbone", "frames", "words", "seed")}
    row.update({k: float(v) for k, v in sorted((result.get("metrics") or {}).items())})
    row.update({f"dsl/{k}": float(v) for k, v in sorted((result.get("dsl_metrics") or {}).items())})
    for name, block in sorted((result.get("post_metrics") or {}).items()):  # QB-Norm, SK-norm, Sinkhorn
        row.update({f"{name}/{k}": float(v) for k, v in sorted(block.items())})
    intervals = result.get("intervals") or {}
    blocks = [("", intervals.get("metrics")), ("dsl/", intervals.get("dsl_metrics"))]
    blocks += [(f"{name}/", b) for name, b in sorted((intervals.get("post_metrics") or {}).items())]
    for prefix, block in blocks:
        for key, (lo, hi) in sorted((block or {}).items()):
            row[f"{prefix}{key}_ci_lo"] = float(lo)
            row[f"{prefix}{key}_ci_hi"] = float(hi)
    proto = protocol_of(result)
    row.update({k: proto.get(k) for k in ("profile", "features", "selection", "pairing", "eps_mode", "padding", "optimizer")})
    row["result_class"] = result_class_of(result)
    for name, block in sorted((proto.get("postprocessing") or {}).items()):
        row[f"{name}/result_class"] = block.get("result_class") or UNAUDITED
    row["variant"] = variant_of(result)
    row["training"] = proto.get("training")
    row.update(diagnostic_columns(result))
    row["test_videos"] = proto.get("test_videos")
    row["protocol_videos"] = proto.get("protocol_videos")
    row["test_set"] = test_set_label(proto.get("test_videos"), proto.get("protocol_videos"))
    params = result.get("params") or {}
    train = result.get("train") or {}
    ev = result.get("eval") or {}
    row.update(
        {
            "params": params.get("total"),
            "trainable_params": params.get("trainable"),
            "train_seconds": train.get("seconds"),
            "train_pairs_per_s": train.get("pairs_per_s"),
            "eval_seconds": ev.get("seconds"),
            "eval_ms_per_query": ev.get("ms_per_query"),
            "n_texts": ev.get("texts"),
            "n_videos": ev.get("videos"),
            "git_commit": (result.get("git") or {}).get("commit"),
            "timestamp": result.get("timestamp"),
            "device": (result.get("device") or {}).get("name"),
        }
    )
    return row


def diagnostic_columns(result: dict[str, Any]) -> dict[str, float]:
    """Flat columns of a result's diagnostics: `types/<type>/t2v/R@k` (with `_ci_lo/_ci_hi`) by caption type, and
    `probe/<name>/t2v/R@1` with `probe/<name>/drop/t2v/R@1` (plain - probe, with its paired interval) per probe."""
    row: dict[str, float] = {}
    for group, entry in (((result.get("diagnostics") or {}).get("caption_types")) or {}).items():
        for key, value in (entry.get("metrics") or {}).items():
            row[f"types/{group}/{key}"] = float(value)
        for key, (lo, hi) in (entry.get("intervals") or {}).items():
            row[f"types/{group}/{key}_ci_lo"], row[f"types/{group}/{key}_ci_hi"] = float(lo), float(hi)
    for name, entry in (((result.get("probes") or {}).get("probes")) or {}).items():
        for key in ("t2v/R@1", "v2t/R@1"):
            if key in (entry.get("metrics") or {}):
                row[f"probe/{name}/{key}"] = float(entry["metrics"][key])
            drop = (entry.get("drop") or {}).get(key) or {}
            if "value" in drop:
                row[f"probe/{name}/drop/{key}"] = float(drop["value"])
            if drop.get("ci"):
                row[f"probe/{name}/drop/{key}_ci_lo"], row[f"probe/{name}/drop/{key}_ci_hi"] = map(float, drop["ci"])
        for group, e in (entry.get("caption_types") or {}).items():
            if "t2v/R@1" in (e.get("metrics") or {}):
                row[f"probe/{name}/types/{group}/t2v/R@1"] = float(e["metrics"]["t2v/R@1"])
    return row


def load_results(runs_dir: str | Path) -> list[dict[str, Any]]:
    """Every valid result JSON under `runs_dir/results/` (sorted by file name); broken files are skipped with a warning."""
    results = []
    for path in sorted((Path(runs_dir) / RESULTS_SUBDIR).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            warnings.warn(f"skipping unreadable result {path}: {err}")
            continue
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or not all(data.get(k) for k in GROUP_KEY):
            warnings.warn(f"skipping {path}: not a {SCHEMA} result")
            continue
        data["_path"] = str(path)
        results.append(data)
    return results
