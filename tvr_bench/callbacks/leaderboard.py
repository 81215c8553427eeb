"""LeaderboardWriter: after every test, one self-describing result JSON per run, the local leaderboard
rebuilt from all of them, and the same row logged to W&B (table + run summary).

The metrics come from the RetrievalEvaluator callback (found in `trainer.callbacks`, read in `on_test_end`,
so the order of the callbacks does not matter). Timings are measured here: fit wall time, training pairs per
second (fit time minus validation time), and the wall time of the whole test loop (encoding + scoring).
"""

from __future__ import annotations

import datetime as _dt
import inspect
import io
import json
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger

from tvr_bench.loggers import OfflineWandbLogger, run_directory
from tvr_bench.report import build_leaderboard, leaderboard_rows
from tvr_bench.callbacks.evaluator import query_intervals
from tvr_bench.stats import DEFAULT_RESAMPLES, PerQuery
from tvr_bench.results import (  # noqa: F401  (re-exported: the names this module always offered)
    RESULTS_SUBDIR,
    UNAUDITED,
    SCHEMA,
    atomic_write,
    canonical_backbone,
    flat_row,
    ranks_path,
    result_filename,
    test_set_label,
    variant_label,
    variant_of,
)

__all__ = [
    "LeaderboardWriter",
    "SCHEMA",
    "atomic_write",
    "canonical_backbone",
    "dataset_name",
    "find_evaluator",
    "flat_row",
    "git_info",
    "device_info",
    "result_filename",
]


# ---------------------------------------------------------------------------------------------- helpers
def dataset_name(datamodule: Any) -> str:
    """The datamodule's `name` (or `dataset`/`dataset_name`), else its class name without `DataModule`."""
    if datamodule is None:
        return "unknown"
    for attr in ("name", "dataset_name", "dataset"):
        value = getattr(datamodule, attr, None)
        if isinstance(value, str) and value:
            return value
    cls = type(datamodule).__name__
    return (cls[: -len("DataModule")] if cls.endswith("DataModule") and cls != "DataModule" else cls).lower()


def _lookup(objs: list[Any], names: tuple[str, ...]) -> Any:
    """First non-None attribute or hparam called one of `names` on any of `objs`."""
    for obj in objs:
        if obj is None:
            continue
        hparams = getattr(obj, "hparams", None) or {}
        for name in names:
            value = getattr(obj, name, None)
            if value is None and hasattr(hparams, "get"):
                value = hparams.get(name)
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                return value
    return None


def _git(root: Path) -> dict[str, Any] | None:
    """Commit and dirty flag of the repository containing `root`, or None."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0 or not commit.stdout.strip():
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def git_info(cwd: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Git commit and dirty flag of the code that ran (its source tree, else `cwd`); `None`s without git."""
    roots = [Path(cwd)] if cwd is not None else [Path(__file__).resolve().parents[2], Path.cwd()]
    for root in roots:
        if root.is_dir():
            info = _git(root)
            if info is not None:
                return info
    return {"commit": None, "dirty": None}


def _cpu_name() -> str:
    """The CPU model name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_info(trainer: Any) -> dict[str, Any]:
    """Accelerator, device name, world size, precision and library versions of this run."""
    root = getattr(getattr(trainer, "strategy", None), "root_device", torch.device("cpu"))
    if root.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(root)
    else:
        name = _cpu_name()
    return {
        "type": root.type,
        "name": name,
        "world_size": int(getattr(trainer, "world_size", 1) or 1),
        "precision": str(getattr(trainer, "precision", "")),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
    }


def find_evaluator(callbacks: list[Any]) -> Any | None:
    """The evaluation callback among `callbacks`: the one holding `last_metrics` (RetrievalEvaluator)."""
    for cb in callbacks:
        if isinstance(getattr(cb, "last_metrics", None), dict):
            return cb
    return None


def _json_safe(value: Any) -> Any:
    """A JSON-serialisable copy (tensors to lists, unknown objects to strings)."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------------------------------------- callback
class LeaderboardWriter(L.Callback):
    """Writes `runs_dir/results/<method>__<dataset>__<backbone>__seed<k>.json` after each test, rebuilds
    `runs_dir/leaderboard.{csv,md,png}` and logs the row to W&B (table `leaderboard` + run summary).

    Args:
        runs_dir: folder of the leaderboard; result JSONs go to its `results/` subfolder.
        enabled: switch the whole callback off.
        rebuild: rebuild the CSV/Markdown/PNG after writing the JSON.
        expected_dir: folder of the paper numbers (`recipes/expected`; default: found next to the package).
        seed: the run's seed; default: the one Lightning's `seed_everything` recorded (`PL_GLOBAL_SEED`).
        wandb_table_key: key of the W&B table.
        profile: the recipe profile recorded in the result's `protocol` (`paper` for the paper-reproduction
            layer); rows of different profiles are never ranked together.
        bootstrap_resamples: resamples of the 95% intervals over test queries (0: no intervals).
        qualitative: number of sampled text queries on the qualitative page and W&B table (0: none).
    """

    def __init__(
        self,
        runs_dir: str = "runs",
        enabled: bool = True,
        rebuild: bool = True,
        expected_dir: str | None = None,
        seed: int | None = None,
        wandb_table_key: str = "leaderboard",
        profile: str = "default",
        bootstrap_resamples: int = DEFAULT_RESAMPLES,
        qualitative: int = 50,
    ) -> None:
        super().__init__()
        self.profile = profile
        self.bootstrap_resamples = bootstrap_resamples
        self.qualitative = qualitative
        self.last_qualitative: Path | None = None
        self._per_query: PerQuery | None = None
        self.runs_dir = runs_dir
        self.enabled = enabled
        self.rebuild = rebuild
        self.expected_dir = expected_dir
        self.seed = seed
        self.wandb_table_key = wandb_table_key
        self._fit_start: float | None = None
        self._val_start: float | None = None
        self._fit_val_seconds = 0.0
        self._train_pairs = 0
        self._train_steps = 0
        self.fit_stats: dict[str, Any] = {}
        self._test_start: float | None = None
        self._metrics_before: Any = None
        self._train_epochs = 0
        self.last_result: dict[str, Any] | None = None
        self.last_path: Path | None = None

    # ------------------------------------------------------------------ identity
    def run_seed(self) -> int | None:
        """The seed of this run (explicit `seed`, else `PL_GLOBAL_SEED`)."""
        if self.seed is not None:
            return int(self.seed)
        env = os.environ.get("PL_GLOBAL_SEED")
        return int(env) if env not in (None, "") else None

    def identity(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        """Method, dataset, backbone (canonical and as configured), frames, words and seed of this run."""
        datamodule = getattr(trainer, "datamodule", None)
        hparams = getattr(pl_module, "hparams", {}) or {}
        backbone_source = hparams.get("backbone") if hasattr(hparams, "get") else None
        return {
            "method": str(getattr(pl_module, "method_name", type(pl_module).__name__.lower())),
            "dataset": dataset_name(datamodule),
            "backbone": canonical_backbone(backbone_source),
            "backbone_source": None if backbone_source is None else str(backbone_source),
            "frames": _lookup([datamodule], ("num_frames", "frames", "max_frames", "n_frames")),
            "words": _lookup([pl_module, datamodule], ("max_words", "words")),
            "seed": self.run_seed(),
        }

    # ------------------------------------------------------------------ timing hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Name the W&B run from method and dataset (a no-op when the CLI already did before it started)."""
        if not self.enabled:
            return
        ident = self.identity(trainer, pl_module)
        for logger in trainer.loggers:
            if isinstance(logger, OfflineWandbLogger):
                logger.describe(ident["method"], ident["dataset"], ident["backbone"], ident["seed"])
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                _define_best_val_summaries(logger.experiment)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the fit clock."""
        self._fit_start = time.perf_counter()
        self._fit_val_seconds = 0.0
        self._train_pairs = 0
        self._train_steps = 0
        self._train_epochs = 0
        self.fit_stats = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Count the (text, video) pairs of the global batch."""
        self._train_pairs += _batch_pairs(batch) * int(getattr(trainer, "world_size", 1) or 1)
        self._train_steps += 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Count finished training epochs."""
        self._train_epochs += 1

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the validation clock (time spent validating during fit is not training time)."""
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stop the validation clock."""
        if self._val_start is not None and self._fit_start is not None:
            self._fit_val_seconds += time.perf_counter() - self._val_start
        self._val_start = None

    def _current_fit_stats(self) -> dict[str, Any]:
        if self._fit_start is None:
            return dict(self.fit_stats)
        seconds = time.perf_counter() - self._fit_start
        train_only = max(seconds - self._fit_val_seconds, 1e-9)
        return {
            "seconds": seconds,
            "validation_seconds": self._fit_val_seconds,
            "pairs": self._train_pairs,
            "steps": self._train_steps,
            "epochs": self._train_epochs,
            "pairs_per_s": self._train_pairs / train_only if self._train_pairs else None,
        }

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stop the fit clock and keep the training statistics for the test that follows."""
        self.fit_stats = self._current_fit_stats()
        self._fit_start = None

    def state_dict(self) -> dict[str, Any]:
        """Training statistics so far, stored in checkpoints so that a later `test --ckpt_path` can report them."""
        return {"fit_stats": self._current_fit_stats()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take the checkpoint's training statistics unless this process measured its own fit."""
        if not self.fit_stats and self._fit_start is None:
            self.fit_stats = dict(state_dict.get("fit_stats") or {})
            if self.fit_stats:
                self.fit_stats["from_checkpoint"] = True

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the test clock and remember the evaluator's previous metrics (to detect a missing result)."""
        self._test_start = time.perf_counter()
        evaluator = find_evaluator(trainer.callbacks)
        self._metrics_before = None if evaluator is None else evaluator.last_metrics

    # ------------------------------------------------------------------ the result
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Assemble the result, write the JSON and the leaderboard (rank 0), log it to W&B."""
        if not self.enabled:
            return
        eval_seconds = time.perf_counter() - self._test_start if self._test_start is not None else None
        evaluator = find_evaluator(trainer.callbacks)
        if evaluator is None or not evaluator.last_metrics or evaluator.last_metrics is self._metrics_before:
            warnings.warn("LeaderboardWriter: no fresh test metrics from the evaluator; no result written")
            return
        run_dir = run_directory(trainer)  # collective call: before any rank-0-only branch
        if not trainer.is_global_zero:
            return
        own_dir = run_dir if trainer.loggers else None
        honest = self.write_companion(trainer, pl_module, evaluator, eval_seconds, run_dir, own_dir)
        result = self.build_result(trainer, pl_module, evaluator, eval_seconds, run_dir)
        if honest is not None:  # the same test features scored twice: each result names the other
            result["companion"] = {"file": honest[1].name, "result_class": honest[0]["protocol"]["result_class"],
                                   "relation": "the honest scoring of the same test features (reported first)"}
        self.last_result = result
        self.last_path = self.write_result(result)
        # a run folder exists only with a logger; without one, run_directory() is the working directory
        if own_dir is not None:
            self.write_run_copy(result, own_dir)
        built = None
        if self.rebuild:
            try:
                built = build_leaderboard(self.runs_dir, self.expected_dir)
            except Exception as err:  # a broken foreign JSON must not lose this run's result
                warnings.warn(f"LeaderboardWriter: could not rebuild the leaderboard: {err}")
        self.log_to_wandb(trainer, result, built, None if honest is None else honest[0])
        if self.qualitative > 0:
            page = Path(own_dir) / "qualitative.html" if own_dir is not None else \
                self.last_path.with_name(self.last_path.name[: -len(".json")] + ".qualitative.html")
            try:
                self.write_qualitative(trainer, evaluator, result, page)
            except Exception as err:  # frames unreadable (remote shards, deleted files): the result stays
                warnings.warn(f"LeaderboardWriter: no qualitative page: {type(err).__name__}: {err}")

    def write_companion(self, trainer: Any, pl_module: Any, evaluator: Any, eval_seconds: float | None,
                        run_dir: str | None, own_dir: str | None) -> tuple[dict[str, Any], Path] | None:
        """When the evaluator scored the test set a second time with the honest options (its `last_companion`:
        the configured scoring is label-dependent or transductive), write that result first, as its own row."""
        companion = getattr(evaluator, "last_companion", None)
        if not companion:
            return None
        from types import SimpleNamespace

        view = SimpleNamespace(
            last_metrics=dict(companion["metrics"]), last_counts=dict(getattr(evaluator, "last_counts", {}) or {}),
            last_eval_seconds=companion["score_seconds"], last_per_query=companion["per_query"],
            last_intervals=companion.get("intervals"), last_post={}, dsl=False,
            last_audit={"result_class": companion["result_class"], "options": dict(companion["options"]),
                        "method": "tvr_bench/audit.py property checks: the options found by resetting the "
                                  "configured scoring's options to their defaults (audit.honest_options)"},
        )
        with pl_module.using_scoring_options(**companion["options"]):
            result = self.build_result(trainer, pl_module, view, eval_seconds, run_dir)
        result["hparams"].update({k: v for k, v in companion["options"].items() if k in result["hparams"]})
        result["eval"]["score_seconds"] = companion["score_seconds"]
        result["companion"] = {
            "file": result_filename(self.identity(trainer, pl_module)["method"], result["dataset"], result["backbone"],
                                    result.get("seed"), self.protocol(trainer, pl_module, evaluator)["variant"]),
            "result_class": (evaluator.last_audit or {}).get("result_class"),
            "relation": "the configured scoring of the same test features, scored first; this second scoring cost "
                        f"{companion['score_seconds']:.2f} s (the first {companion['first_score_seconds']:.2f} s)",
        }
        path = self.write_result(result)
        if own_dir is not None:
            copy = json.loads(json.dumps(result))
            source = path.parent / (copy.get("per_query") or {}).get("file", "")
            if (copy.get("per_query") or {}).get("file") and source.is_file():
                atomic_write(Path(own_dir) / "result.honest.ranks.npz", source.read_bytes())
                copy["per_query"]["file"] = "result.honest.ranks.npz"
            atomic_write(Path(own_dir) / "result.honest.json", json.dumps(copy, indent=2) + "\n")
        return result, path

    def build_result(self, trainer: Any, pl_module: Any, evaluator: Any, eval_seconds: float | None,
                     run_dir: str | None = None) -> dict[str, Any]:
        """The self-describing result dict of this run."""
        ident = self.identity(trainer, pl_module)
        protocol = self.protocol(trainer, pl_module, evaluator)
        plain = ("t2v/", "v2t/")  # post-processed (`<name>/...`) and second-scoring (`honest/...`) keys stay out
        metrics = {k: float(v) for k, v in evaluator.last_metrics.items() if k.startswith(plain)}
        dsl = {k[len("dsl/"):]: float(v) for k, v in evaluator.last_metrics.items() if k.startswith("dsl/")}
        post_blocks = {n: b for n, b in (getattr(evaluator, "last_post", None) or {}).items() if n != "dsl"}
        counts = dict(getattr(evaluator, "last_counts", {}) or {})
        n_texts = counts.get("texts")
        params = list(pl_module.parameters())
        fit = dict(self.fit_stats)
        datamodule = getattr(trainer, "datamodule", None)
        loggers = [
            {"type": type(lg).__name__, "save_dir": getattr(lg, "save_dir", None), "version": _safe_version(lg)}
            for lg in trainer.loggers
        ]
        result = {
            "schema": SCHEMA,
            **ident,
            "metrics": metrics,
            "dsl_metrics": dsl or None,
            "params": {
                "total": int(sum(p.numel() for p in params)),
                "trainable": int(sum(p.numel() for p in params if p.requires_grad)),
            },
            "train": {
                "seconds": fit.get("seconds"),
                "validation_seconds": fit.get("validation_seconds"),
                "pairs": fit.get("pairs"),
                "steps": fit.get("steps"),
                "pairs_per_s": fit.get("pairs_per_s"),
                "epochs": fit.get("epochs"),
                "from_checkpoint": bool(fit.get("from_checkpoint", False)),
            },
            "eval": {
                "seconds": eval_seconds,
                "score_seconds": float(getattr(evaluator, "last_eval_seconds", 0.0) or 0.0),
                "ms_per_query": 1000.0 * eval_seconds / n_texts if eval_seconds is not None and n_texts else None,
                "texts": n_texts,
                "videos": counts.get("videos"),
                "ckpt_path": getattr(trainer, "ckpt_path", None),
            },
            "git": git_info(),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "device": device_info(trainer),
            "run_dir": run_dir,
            "loggers": loggers,
            "hparams": _json_safe(dict(getattr(pl_module, "hparams", {}) or {})),
            "datamodule": {
                "class": None if datamodule is None else f"{type(datamodule).__module__}.{type(datamodule).__qualname__}",
                "hparams": _json_safe(dict(getattr(datamodule, "hparams", {}) or {})) if datamodule is not None else {},
            },
            "evaluator": {"dsl": bool(getattr(evaluator, "dsl", bool(dsl))),
                          "postprocess": sorted((getattr(evaluator, "last_post", None) or {}))},
            "protocol": protocol,
        }
        if post_blocks:  # each post-processing under its own key, never mixed with the plain numbers
            result["post_metrics"] = {n: {k: float(v) for k, v in b["metrics"].items()} for n, b in post_blocks.items()}
        result.update(self.intervals(evaluator))
        if getattr(evaluator, "last_search", None):
            result["search"] = evaluator.last_search  # docs/search.md: search scoring, two-stage loss vs exhaustive
        post_intervals = {n: b["intervals"] for n, b in post_blocks.items() if b.get("intervals")}
        if post_intervals and result.get("intervals"):
            result["intervals"]["post_metrics"] = post_intervals
        # by caption type (synthetic) and temporal probes (`--evaluator.probes`): tvr_bench/diagnostics.py, probes.py
        for key, attr in (("diagnostics", "last_diagnostics"), ("probes", "last_probes")):
            if getattr(evaluator, attr, None):
                result[key] = getattr(evaluator, attr)
        return _json_safe(result)

    def protocol(self, trainer: Any, pl_module: Any, evaluator: Any) -> dict[str, Any]:
        """The result's `protocol` block (docs/INTERFACES.md point 3): test vs protocol size, profile, model
        selection, T-MASS pairing, EMCL grouping and evaluation blocks, features and optimizer."""
        datamodule = getattr(trainer, "datamodule", None)
        hparams = getattr(pl_module, "hparams", {}) or {}
        test_split = getattr(datamodule, "test_split", "test")
        test_videos = (getattr(evaluator, "last_counts", {}) or {}).get("videos")
        if test_videos is None and hasattr(datamodule, "split_shards"):
            try:
                test_videos = int(datamodule.split_shards(test_split).num_samples)
            except Exception:
                test_videos = None
        protocol_size = getattr(datamodule, "protocol_size", None)
        protocol_videos = protocol_size(test_split) if callable(protocol_size) else None
        monitor = getattr(getattr(trainer, "checkpoint_callback", None), "monitor", None)
        val_split = getattr(datamodule, "val_split", None)
        if not monitor or not val_split or not getattr(trainer, "ckpt_path", None):
            selection = "last"
        else:
            selection = "test" if val_split == test_split else "val"
        hp_get = hparams.get if hasattr(hparams, "get") else (lambda *_: None)
        options = pl_module.scoring_options() if hasattr(pl_module, "scoring_options") else {}
        get = lambda k: options[k] if k in options else hp_get(k)  # noqa: E731 - the options scored with win
        features = "frozen-clip" if getattr(datamodule, "features_dir", None) else "end-to-end"
        defaults = _init_defaults(type(pl_module))
        labelled = {"profile": self.profile, "features": features}
        labelled.update({k: get(k) for k in ("pairing", "eps_mode", "grouping", "padding") if get(k) is not None and get(k) != defaults.get(k)})
        # no training step reached these weights (a test without fit or checkpoint): the backbone's zero-shot row
        trained = bool((self.fit_stats or {}).get("steps")) or bool(getattr(trainer, "ckpt_path", None))
        if not trained:
            labelled["training"] = "zero-shot"
        blocks = getattr(evaluator, "last_eval_blocks", None)  # items scored together (EMCL `grouping: reference`)
        extra = {k: v for k, v in options.items() if k not in labelled and k not in ("pairing", "eps_mode", "grouping")
                 and v != defaults.get(k)}  # other methods' scoring options, labelled the same way
        audit = getattr(evaluator, "last_audit", None) or {}
        post = {n: {k: b.get(k) for k in ("result_class", "title", "source", "directions", "note", "settings", "query_bank")
                    if b.get(k) is not None}
                for n, b in (getattr(evaluator, "last_post", None) or {}).items()}
        variant = ", ".join(x for x in (variant_label(labelled), *(f"{k}={v}" for k, v in extra.items())) if x)
        return {
            "test_split": test_split,
            "test_videos": test_videos,
            "protocol_videos": protocol_videos,
            "complete": protocol_videos is None or (test_videos is not None and test_videos >= protocol_videos),
            "test_set": test_set_label(test_videos, protocol_videos),
            "profile": self.profile,
            "selection": selection,
            "pairing": get("pairing"),
            "eps_mode": get("eps_mode"),
            "grouping": get("grouping"),
            "eval_blocks": list(blocks) if blocks else None,
            "padding": get("padding"),  # X-CLIP: 'masked' (the paper) or 'reference' (the code)
            "features": features,
            "optimizer": get("optimizer") or "adamw",
            "training": "fine-tuned" if trained else "zero-shot",
            # the row label and file-name part: non-default profile/features, and pairing/eps_mode (any scoring
            # option) when they differ from the method's defaults (a named alternative such as T-MASS `pairing: query`)
            "variant": variant,
            "scoring_options": {k: v for k, v in options.items() if isinstance(v, (str, int, float, bool))},
            # the scoring audit's verdict on this scoring (tvr_bench/audit.py): what kind of number this is
            "result_class": audit.get("result_class") or UNAUDITED,
            "audit": {k: audit[k] for k in ("method", "videos", "texts", "failed", "seconds") if k in audit},
            "postprocessing": post,
        }

    def intervals(self, evaluator: Any) -> dict[str, Any]:
        """`intervals` (95% bootstrap over test queries, resampling videos with all their captions) and
        `per_query` (the ranks file) entries of the result; empty without the evaluator's per-query ranks."""
        self._per_query = None
        per_query = getattr(evaluator, "last_per_query", None)
        if not per_query:
            return {}
        pq = per_query_ranks(per_query)
        self._per_query = pq
        out: dict[str, Any] = {"per_query": {"file": None, "t2v_queries": int(len(pq.t2v_rank)),
                                             "v2t_queries": int(len(pq.v2t_rank)), "units": "video"}}
        computed = getattr(evaluator, "last_intervals", None)
        if computed and computed.get("resamples") == self.bootstrap_resamples and computed.get("metrics"):
            out["intervals"] = dict(computed)  # the evaluator's printed table already computed them
        elif self.bootstrap_resamples > 0:
            out["intervals"] = query_intervals(per_query, self.bootstrap_resamples)
        return out

    def write_result(self, result: dict[str, Any]) -> Path:
        """Write one result JSON atomically under `runs_dir/results/` and return its path."""
        name = result_filename(result["method"], result["dataset"], result["backbone"], result.get("seed"),
                               variant_of(result))
        path = Path(self.runs_dir) / RESULTS_SUBDIR / name
        ranks = ranks_path(path)
        if self._per_query is not None and result.get("per_query"):
            buf = io.BytesIO()
            self._per_query.save(buf)
            atomic_write(ranks, buf.getvalue())
            result["per_query"]["file"] = ranks.name
        elif ranks.exists():
            ranks.unlink()  # a rerun without ranks must not leave the previous run's ranks beside its JSON
        return atomic_write(path, json.dumps(result, indent=2, sort_keys=False) + "\n")

    def write_run_copy(self, result: dict[str, Any], run_dir: str) -> Path:
        """A copy of the result and its ranks in the run's own folder (`result.json`, `result.ranks.npz`), so that
        `tvr-bench compare RUN_DIR_A RUN_DIR_B` finds them."""
        copy = json.loads(json.dumps(result))
        if self.last_path is not None and (copy.get("per_query") or {}).get("file"):
            source = self.last_path.parent / copy["per_query"]["file"]
            atomic_write(Path(run_dir) / "result.ranks.npz", source.read_bytes())
            copy["per_query"]["file"] = "result.ranks.npz"
        return atomic_write(Path(run_dir) / "result.json", json.dumps(copy, indent=2) + "\n")

    def log_to_wandb(self, trainer: Any, result: dict[str, Any], built: dict[str, Any] | None = None,
                     honest: dict[str, Any] | None = None) -> None:
        """Log the run's leaderboard row (table + run summary), its identity and protocol into the run config
        (W&B's run comparer and parallel coordinates read them), the whole rebuilt leaderboard (table
        `<key>_all`, with the significance column) and the per-query rank histograms."""
        row = flat_row(result)
        rows = [row] if honest is None else [flat_row(honest), row]  # the honest scoring of the same run first
        columns = list(dict.fromkeys(k for r in rows for k in r))
        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            logger.log_table(key=self.wandb_table_key, columns=columns, data=[[r.get(c) for c in columns] for r in rows])
            run = logger.experiment
            summary = getattr(run, "summary", None)
            if summary is not None and hasattr(summary, "update"):
                summary.update({f"result/{k}": v for k, v in row.items() if v is not None})
            config = getattr(run, "config", None)
            if config is not None and hasattr(config, "update"):
                ident = {k: result.get(k) for k in ("method", "dataset", "backbone", "frames", "words", "seed")}
                config.update({**ident, **{f"protocol/{k}": v for k, v in (result.get("protocol") or {}).items()}},
                              allow_val_change=True)
            if built is not None:
                rows = leaderboard_rows(built["aggregated"], built["expected"])
                if rows:
                    columns = list(dict.fromkeys(k for r in rows for k in r))
                    logger.log_table(key=f"{self.wandb_table_key}_all", columns=columns,
                                     data=[[r.get(c) for c in columns] for r in rows])
            if self._per_query is not None and hasattr(run, "log"):
                import wandb

                histograms = {}
                for direction in ("t2v", "v2t"):
                    ranks = getattr(self._per_query, f"{direction}_rank")
                    top = int(ranks.max())
                    counts, edges = np.histogram(ranks, bins=min(64, top), range=(0.5, top + 0.5))
                    histograms[f"test/{direction}_rank_histogram"] = wandb.Histogram(np_histogram=(counts, edges))
                run.log(histograms)

    def write_qualitative(self, trainer: Any, evaluator: Any, result: dict[str, Any], page: Path) -> Path | None:
        """The qualitative page (`<run dir>/qualitative.html`; beside the result JSON for a run without a logger,
        `<name>.qualitative.html`) and W&B table `qualitative` of sampled queries."""
        from tvr_bench.qualitative import qualitative_for_run

        per_query = getattr(evaluator, "last_per_query", None)
        datamodule = getattr(trainer, "datamodule", None)
        if not per_query or datamodule is None or not hasattr(datamodule, "split_shards"):
            return None
        wandb_runs = [lg.experiment for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        title = f"{result['method']} on {result['dataset']} ({result['backbone']}, seed {result.get('seed')})"
        self.last_qualitative = qualitative_for_run(
            per_query, datamodule, page, self.qualitative, title, wandb_runs,
            seed=int(result.get("seed") or 0),
        )
        return self.last_qualitative


def per_query_ranks(per_query: dict[str, Any]) -> PerQuery:
    """The evaluator's `last_per_query` as a keyed PerQuery (the ranks file's content)."""
    return PerQuery.from_results(per_query)


def _init_defaults(cls: type) -> dict[str, Any]:
    """Default values of a class's `__init__` arguments (empty when the signature cannot be read)."""
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return {}
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def _define_best_val_summaries(run: Any) -> None:
    """Make the W&B run summary keep the best validation value (max recall, min rank), not the last one."""
    define = getattr(run, "define_metric", None)
    if define is None:
        return
    for direction in ("t2v", "v2t"):
        for name, best in (("R@1", "max"), ("R@5", "max"), ("R@10", "max"), ("MdR", "min"), ("MnR", "min")):
            define(f"val/{direction}/{name}", summary=best, step_metric="trainer/global_step")


def _batch_pairs(batch: Any) -> int:
    """Number of (text, video) pairs in a training batch (captions, else the first tensor's length)."""
    if isinstance(batch, dict):
        if "captions" in batch:
            return len(batch["captions"])
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                return int(value.shape[0])
    if isinstance(batch, (list, tuple)) and batch:
        first = batch[0]
        return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.ndim > 0 else len(batch)
    if isinstance(batch, torch.Tensor) and batch.ndim > 0:
        return int(batch.shape[0])
    return 0


def _safe_version(logger: Any) -> Any:
    """A logger's version without creating anything (W&B: the run id)."""
    try:
        version = logger.version
    except Exception:
        return None
    return version if isinstance(version, (str, int)) or version is None else str(version)
