"""RetrievalEvaluator: the one evaluation callback every method shares.

It collects the features each eval step returns, gathers them from every DDP rank, drops duplicates
by sample key (Lightning and WebDataset may pad or repeat), sorts by key so the order never depends
on the number of ranks or workers, scores the text x video matrix in memory-bounded blocks (each
rank scores a share of the text rows, then the rows are gathered), computes the metrics and logs them.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor

from tvr_bench.metrics import dual_softmax, metrics_from_ranks, query_ranks
from tvr_bench.probes import PROBES, check_probes, probe_frames

Features = dict[str, Tensor]


def concat_features(chunks: list[Features]) -> Features:
    """Concatenate a list of feature dicts along the batch dimension."""
    if not chunks:
        return {}
    return {k: torch.cat([c[k] for c in chunks], dim=0) for k in chunks[0]}


def select_features(feats: Features, index: Tensor) -> Features:
    """Rows `index` of every tensor of a feature dict (the index follows each tensor's device)."""
    return {k: v.index_select(0, index.to(v.device)) for k, v in feats.items()}


def slice_features(feats: Features, start: int, stop: int) -> Features:
    """Rows `start:stop` of every tensor of a feature dict (views, no copy)."""
    return {k: v[start:stop] for k, v in feats.items()}


def block_sizes(n_text: int, n_video: int, pair_bytes: int, budget_bytes: float) -> tuple[int, int]:
    """Block shape (texts, videos) whose pairs fit the budget; all videos at once when they fit."""
    pairs = max(1, int(budget_bytes // max(1, pair_bytes)))
    bv = min(n_video, pairs)
    bt = max(1, min(n_text, pairs // max(1, bv)))
    return bt, bv


def float32_features(feats: Features) -> Features:
    """The feature dict with every floating tensor in float32 (indices, masks and other integers unchanged)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in feats.items()}


def full_precision(device: torch.device | str) -> torch.autocast:
    """A context that switches autocast off on `device`'s type, so scores accumulate in float32 under bf16-mixed."""
    kind = torch.device(device).type
    return torch.autocast(device_type=kind if kind in ("cpu", "cuda", "xpu", "mps") else "cpu", enabled=False)


@torch.no_grad()
def blocked_similarity(
    method: Any, text: Features, video: Features, budget_mb: float, rows: Tensor | None = None
) -> Tensor:
    """Score `text` (or only its `rows`) against every video in blocks under `budget_mb`.

    Scores are computed from float32 features with autocast off (safe under `precision: bf16-mixed`).
    """
    text, video = float32_features(text), float32_features(video)
    with full_precision(next(iter(video.values())).device):
        return _blocked_similarity(method, text, video, budget_mb, rows)


def _blocked_similarity(method: Any, text: Features, video: Features, budget_mb: float, rows: Tensor | None) -> Tensor:
    n_text = text[next(iter(text))].shape[0]
    n_video = video[next(iter(video))].shape[0]
    all_rows = rows is None or (len(rows) == n_text and bool((rows.cpu() == torch.arange(n_text)).all()))
    n_rows = n_text if rows is None else len(rows)
    if n_rows == 0 or n_video == 0:
        return torch.empty(n_rows, n_video, dtype=torch.float32)
    mine = text if all_rows else select_features(text, rows)  # this rank's rows, gathered once
    pair_bytes = method.pair_cost_bytes(slice_features(mine, 0, 1), slice_features(video, 0, 1))
    bt, bv = block_sizes(n_rows, n_video, pair_bytes, budget_mb * 2**20)
    if bt >= n_rows and bv >= n_video:  # one block: no copy into `out`
        return method.similarity(mine, video).float().cpu()
    out = torch.empty(n_rows, n_video, dtype=torch.float32)
    for i in range(0, n_rows, bt):
        t_block = slice_features(mine, i, i + bt)
        for j in range(0, n_video, bv):
            out[i : i + bt, j : j + bv] = method.similarity(t_block, slice_features(video, j, j + bv)).float().cpu()
    return out


@torch.no_grad()
def per_query_results(sim: Tensor, text_to_video: Tensor, video_keys: list[str], caption_keys: list[str],
                      dsl_sim: Tensor | None = None, top_k: int = 5, ranks: dict[str, Tensor] | None = None,
                      dsl_ranks: dict[str, Tensor] | None = None,
                      caption_types: list[str] | None = None) -> dict[str, Any]:
    """Per-query ranks (t2v per caption, v2t per captioned video, DSL too when given) with their keys, and the
    top-k videos (column, score) of every text: what the leaderboard saves and the qualitative page shows.
    `ranks` / `dsl_ranks`: the `query_ranks` of `sim` / `dsl_sim` when already computed. `caption_types`: the kind
    of each caption (synthetic: full, first, ...) when the test set defines one (tvr_bench/diagnostics.py)."""
    ranks = query_ranks(sim, text_to_video) if ranks is None else ranks
    k = min(top_k, sim.shape[1])
    top = torch.topk(sim.float().nan_to_num(nan=float("-inf")), k, dim=1)
    out = {
        "video_keys": list(video_keys),
        "caption_keys": list(caption_keys),
        "text_to_video": text_to_video.cpu(),
        "t2v_rank": ranks["t2v"].cpu(),
        "v2t_rank": ranks["v2t"].cpu(),
        "v2t_video": ranks["v2t_video"].cpu(),
        "top_index": top.indices.cpu(),
        "top_score": top.values.cpu(),
    }
    if dsl_sim is not None:
        dsl = query_ranks(dsl_sim, text_to_video) if dsl_ranks is None else dsl_ranks
        out.update(dsl_t2v_rank=dsl["t2v"].cpu(), dsl_v2t_rank=dsl["v2t"].cpu())
    if caption_types is not None:
        out["caption_type"] = list(caption_types)
    return out


def query_intervals(per_query: dict[str, Any], resamples: int) -> dict[str, Any]:
    """95% bootstrap intervals of every metric (and DSL metric) from `per_query_results` (tvr_bench/stats.py)."""
    from tvr_bench.stats import DEFAULT_LEVEL, PerQuery, bootstrap_intervals

    pq = PerQuery.from_results(per_query)
    block: dict[str, Any] = {
        "method": "percentile bootstrap over test queries; unit: video with all its captions",
        "level": DEFAULT_LEVEL,
        "resamples": int(resamples),
        "seed": 0,
        "metrics": bootstrap_intervals([pq.directions()], resamples),
    }
    if pq.dsl_t2v_rank is not None:
        block["dsl_metrics"] = bootstrap_intervals([pq.directions(dsl=True)], resamples)
    return block


def _gather_objects(obj: Any) -> list[Any]:
    """All-gather a picklable object from every rank (a one-element list without DDP)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class RetrievalEvaluator(L.Callback):
    """Collects eval features, scores all pairs exactly once and logs R@1/5/10, MdR, MnR both ways."""

    def __init__(self, dsl: bool = False, print_table: bool = True, device: str = "auto", save_scores: str | None = None,
                 bootstrap_resamples: int = 10_000, probes: list[str] | str | None = None):
        """`save_scores`: a file path; after each test, rank 0 saves the score matrix and the key order there.
        `bootstrap_resamples`: after a test, rank 0 computes the 95% bootstrap interval over test queries of every
        metric (tvr_bench/stats.py) and prints it in the table (0: none).
        `probes`: temporal probes of the test (`reversed`, `shuffled`, `middle` or `all`; tvr_bench/probes.py): the
        test set is scored again with every video's frames reordered or frozen, each probe at the cost of one
        more encoding of the test videos; `last_probes` holds each probe's metrics and its paired drop."""
        super().__init__()
        self.probes = check_probes(probes)
        #: after a test with probes: {"probes": {name: {"metrics", "drop", ...}}, "cost": {...}} (rank 0: with intervals)
        self.last_probes: dict[str, Any] | None = None
        #: after a test on a set whose captions have types: {"caption_types": {type: {"queries", "metrics", "intervals"}}}
        self.last_diagnostics: dict[str, Any] | None = None
        self._probe_chunks: dict[str, list[dict[str, Any]]] = {}
        self._probe_encode_seconds = 0.0
        self.bootstrap_resamples = bootstrap_resamples
        #: after a test on rank 0: `{"metrics": {key: [lo, hi]}, "dsl_metrics": ..., "resamples": n, ...}` or None
        self.last_intervals: dict[str, Any] | None = None
        self.dsl = dsl
        self.print_table = print_table
        self.device = device
        self.save_scores = save_scores
        self._chunks: list[dict[str, Any]] = []
        self.last_metrics: dict[str, float] = {}
        self.last_eval_seconds: float = 0.0
        self.last_counts: dict[str, int] = {}
        #: after a test: per-query ranks, keys and top-k retrieved videos (see `per_query_results`)
        self.last_per_query: dict[str, Any] | None = None
        self.top_k = 5

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Silence Lightning's `sync_dist=True` advice for our metrics: every rank computes the same
        values from the gathered matrix, so averaging them over ranks would change nothing."""
        warnings.filterwarnings(
            "ignore", message=r"It is recommended to use `self\.log\('(val|test)/", category=PossibleUserWarning
        )

    # ------------------------------------------------------------------ collection
    def _reset(self) -> None:
        self._chunks = []

    def _collect(self, outputs: dict[str, Any]) -> None:
        to_cpu = lambda f: {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu() for k, v in f.items()}  # noqa: E731
        self._chunks.append(
            {
                "text": to_cpu(outputs["text"]),
                "video": to_cpu(outputs["video"]),
                "video_key": list(outputs["video_key"]),
                "caption_key": list(outputs["caption_key"]),
                "caption_video": outputs["caption_video"].detach().cpu(),
            }
        )

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start a fresh collection."""
        self._reset()

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start a fresh collection."""
        self._reset()
        self._probe_chunks, self._probe_encode_seconds = {}, 0.0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Keep the features of one validation batch."""
        self._collect(outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Keep the features of one test batch (and, with `probes`, of its videos under each probe)."""
        self._collect(outputs)
        if self.probes:
            self._collect_probes(pl_module, batch)

    @torch.no_grad()
    def _collect_probes(self, pl_module: Any, batch: dict[str, Any]) -> None:
        """Encode the batch's videos once more per probe (frames reordered or frozen, tvr_bench/probes.py)."""
        start = time.perf_counter()
        keys = list(batch["video_key"])
        for name in self.probes:
            frames = probe_frames(batch["frames"], batch["frame_mask"], name, keys)
            feats = pl_module.encode_video(frames, batch["frame_mask"])
            cpu = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu() for k, v in feats.items()}
            self._probe_chunks.setdefault(name, []).append({"video": cpu, "video_key": keys})
        self._probe_encode_seconds += time.perf_counter() - start

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Score and log `val/...` metrics (skipped during the sanity check)."""
        if trainer.sanity_checking:
            self._reset()
            return
        self._evaluate(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Score and log `test/...` metrics and print the table."""
        metrics = self._evaluate(trainer, pl_module, "test")
        if self.print_table:
            self._print(pl_module, metrics)
            self._print_diagnostics()

    # ------------------------------------------------------------------ evaluation
    def assemble(self) -> tuple[Features, Features, list[str], list[str], Tensor]:
        """Merge every rank's chunks, drop duplicate keys and sort videos and captions by key."""
        local = self._chunks
        gathered = [c for rank_chunks in _gather_objects(local) for c in rank_chunks]
        videos: dict[str, int] = {}
        captions: dict[str, tuple[int, str]] = {}
        v_offset = t_offset = 0
        for chunk in gathered:
            for vi, key in enumerate(chunk["video_key"]):
                videos.setdefault(key, v_offset + vi)
            for ti, key in enumerate(chunk["caption_key"]):
                vkey = chunk["video_key"][int(chunk["caption_video"][ti])]
                captions.setdefault(key, (t_offset + ti, vkey))
            v_offset += len(chunk["video_key"])
            t_offset += len(chunk["caption_key"])
        video_keys = sorted(videos)
        caption_keys = sorted(captions, key=lambda k: (captions[k][1], _caption_order(k)))
        all_video = concat_features([c["video"] for c in gathered])
        all_text = concat_features([c["text"] for c in gathered])
        video_feats = select_features(all_video, torch.tensor([videos[k] for k in video_keys], dtype=torch.long))
        text_feats = select_features(all_text, torch.tensor([captions[k][0] for k in caption_keys], dtype=torch.long))
        col = {k: i for i, k in enumerate(video_keys)}
        text_to_video = torch.tensor([col[captions[k][1]] for k in caption_keys], dtype=torch.long)
        return text_feats, video_feats, video_keys, caption_keys, text_to_video

    def score(self, pl_module: Any, text: Features, video: Features) -> Tensor:
        """Full similarity matrix: this rank scores its share of rows, then rows are gathered."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        n_text = text[next(iter(text))].shape[0]
        rows = torch.arange(rank, n_text, world)
        device = pl_module.device
        text_d = {k: v.to(device) for k, v in text.items()}
        video_d = {k: v.to(device) for k, v in video.items()}
        part = blocked_similarity(pl_module, text_d, video_d, pl_module.hparams.eval_memory_mb, rows)
        parts = _gather_objects((rows, part))
        sim = torch.empty(n_text, part.shape[1], dtype=torch.float32)
        for r, p in parts:
            sim[r] = p
        return sim

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, float]:
        start = time.perf_counter()
        was_training = pl_module.training
        pl_module.eval()
        text, video, video_keys, caption_keys, t2v = self.assemble()
        self._reset()
        if not video_keys:
            raise RuntimeError(f"the {stage} set yielded no videos: check the shards and the split name")
        for feats, n in ((text, len(caption_keys)), (video, len(video_keys))):
            feats["index"] = torch.arange(n)
        raw_text = text
        prepare = getattr(pl_module, "prepare_eval_features", None)
        if callable(prepare):  # set-level features (T-MASS reference pairing), after every batch is assembled
            text, video = prepare(text, video, t2v)
        sim = self.score(pl_module, text, video)
        if self.save_scores and stage == "test" and trainer.is_global_zero:
            payload = {"sim": sim, "text_to_video": t2v, "video_keys": video_keys, "caption_keys": caption_keys}
            torch.save(payload, self.save_scores)
        ranks = query_ranks(sim, t2v)  # once: the metrics and the per-query results both come from them
        metrics = metrics_from_ranks(ranks)
        dsl_sim = dual_softmax(sim) if self.dsl else None
        dsl_ranks = None if dsl_sim is None else query_ranks(dsl_sim, t2v)
        if dsl_ranks is not None:
            metrics.update({f"dsl/{k}": v for k, v in metrics_from_ranks(dsl_ranks).items()})
        caption_types = self._caption_types(trainer, caption_keys) if stage == "test" else None
        self.last_per_query = (
            per_query_results(sim, t2v, video_keys, caption_keys, dsl_sim, self.top_k, ranks, dsl_ranks, caption_types)
            if stage == "test" else None
        )
        self.last_intervals = None
        if self.last_per_query is not None and self.bootstrap_resamples > 0 and trainer.is_global_zero:
            self.last_intervals = query_intervals(self.last_per_query, self.bootstrap_resamples)
        self.last_diagnostics = self.last_probes = None
        extra_logs: dict[str, float] = {}
        if self.last_per_query is not None:  # diagnostics by caption type and temporal probes (logged, not in metrics)
            extra_logs = self._diagnose(trainer, pl_module, raw_text, t2v, video_keys, caption_keys, ranks)
        if was_training:
            pl_module.train()
        self.last_eval_seconds = time.perf_counter() - start
        self.last_counts = {"texts": len(caption_keys), "videos": len(video_keys)}
        self.last_metrics = dict(metrics)
        for key, value in metrics.items():
            pl_module.log(f"{stage}/{key}", value, prog_bar=key == "t2v/R@1", sync_dist=False, rank_zero_only=False)
        for key, value in extra_logs.items():
            pl_module.log(f"{stage}/{key}", value, sync_dist=False, rank_zero_only=False)
        pl_module.log(f"{stage}/eval_seconds", self.last_eval_seconds, sync_dist=False)
        return metrics

    # ------------------------------------------------------------------ diagnostics and probes (test only)
    @staticmethod
    def _caption_types(trainer: Any, caption_keys: list[str]) -> list[str] | None:
        """The kind of every caption when the datamodule defines one (`caption_types(split)`: key -> type)."""
        datamodule = getattr(trainer, "datamodule", None)
        lookup = getattr(datamodule, "caption_types", None)
        if not callable(lookup):
            return None
        mapping = lookup(getattr(datamodule, "test_split", "test"))
        if not mapping:
            return None
        types = [mapping.get(key) for key in caption_keys]
        return None if any(t is None for t in types) else [str(t) for t in types]

    def _diagnose(self, trainer: Any, pl_module: Any, raw_text: Features, t2v: Tensor, video_keys: list[str],
                  caption_keys: list[str], ranks: dict[str, Tensor]) -> dict[str, float]:
        """Metrics by caption type and the temporal probes of a test; returns the scalars to log
        (`types/<type>/t2v/R@k`, `probe/<name>/...`) and sets `last_diagnostics` / `last_probes`."""
        from tvr_bench.diagnostics import group_metrics
        from tvr_bench.stats import PerQuery

        logs: dict[str, float] = {}
        resamples = self.bootstrap_resamples if trainer.is_global_zero else 0
        plain = PerQuery.from_results(self.last_per_query)
        if plain.t2v_group is not None:
            by_type = group_metrics([plain], resamples)
            self.last_diagnostics = {"caption_types": by_type}
            logs.update({f"types/{g}/{k}": v for g, e in by_type.items() for k, v in e["metrics"].items()})
        if not self.probes:
            return logs
        start = time.perf_counter()
        gathered = {name: [c for rank in _gather_objects(self._probe_chunks.get(name, [])) for c in rank]
                    for name in self.probes}
        self._probe_chunks = {}
        encode_seconds = sum(_gather_objects(self._probe_encode_seconds))
        prepare = getattr(pl_module, "prepare_eval_features", None)
        base = metrics_from_ranks(ranks)
        out: dict[str, Any] = {}
        for name in self.probes:
            video = _select_by_key(gathered[name], video_keys)
            video["index"] = torch.arange(len(video_keys))
            text = raw_text
            if callable(prepare):
                text, video = prepare(raw_text, video, t2v)
            sim = self.score(pl_module, text, video)
            probe_ranks = query_ranks(sim, t2v)
            probe_metrics = metrics_from_ranks(probe_ranks)
            entry: dict[str, Any] = {"what": PROBES[name], "metrics": probe_metrics,
                                     "drop": {k: {"value": base[k] - probe_metrics[k]} for k in probe_metrics}}
            logs.update({f"probe/{name}/{k}": v for k, v in probe_metrics.items() if k.endswith("R@1")})
            logs.update({f"probe/{name}/drop/{k}": v["value"] for k, v in entry["drop"].items() if k.endswith("R@1")})
            probe = PerQuery.from_results(per_query_results(
                sim, t2v, video_keys, caption_keys, ranks=probe_ranks, caption_types=self.last_per_query.get("caption_type")))
            entry.update(_probe_statistics(plain, probe, resamples))
            out[name] = entry
        self.last_probes = {
            "probes": out,
            "cost": {"video_encodings_per_probe": 1, "encode_seconds": encode_seconds,
                     "score_and_statistics_seconds": time.perf_counter() - start},
        }
        return logs

    @rank_zero_only
    def _print_diagnostics(self) -> None:
        """Tables of t2v recall by caption type and of the temporal probes, when the test computed them."""
        from rich.console import Console
        from rich.table import Table

        def cell(value: float, bounds: list[float] | None = None) -> str:
            return f"{value:.1f}" + (f" [{bounds[0]:.1f}, {bounds[1]:.1f}]" if bounds else "")

        console = Console() if Console().width >= 120 else Console(width=120)
        by_type = (self.last_diagnostics or {}).get("caption_types") or {}
        if by_type:
            table = Table(title="t2v by caption type (95% bootstrap intervals)")
            for col in ("caption type", "queries", "R@1", "R@5"):
                table.add_column(col, justify="left" if col == "caption type" else "right")
            for group, e in by_type.items():
                iv = e.get("intervals") or {}
                table.add_row(group, str(e["queries"]), cell(e["metrics"]["t2v/R@1"], iv.get("t2v/R@1")),
                              cell(e["metrics"]["t2v/R@5"], iv.get("t2v/R@5")))
            console.print(table)
        probes = (self.last_probes or {}).get("probes") or {}
        if probes:
            table = Table(title="temporal probes: t2v R@1 and its drop from the plain test (95% paired interval, p)")
            for col in ("probe", "t2v R@1", "drop", "p", "v2t R@1"):
                table.add_column(col, justify="left" if col == "probe" else "right")
            for name, e in probes.items():
                drop = e["drop"]["t2v/R@1"]
                table.add_row(name, f"{e['metrics']['t2v/R@1']:.1f}", cell(drop["value"], drop.get("ci")),
                              f"{drop['p']:.4f}" if "p" in drop else "–", f"{e['metrics']['v2t/R@1']:.1f}")
            console.print(table)

    @rank_zero_only
    def _print(self, pl_module: Any, metrics: dict[str, float]) -> None:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        name = getattr(pl_module, "method_name", type(pl_module).__name__)
        table = Table(title=f"{name}: {self.last_counts.get('texts')} texts x {self.last_counts.get('videos')} videos")
        table.add_column("direction")
        for col in ("R@1", "R@5", "R@10", "MdR", "MnR"):
            table.add_column(col, justify="right")
        prefixes = ["t2v", "v2t"] + (["dsl/t2v", "dsl/v2t"] if self.dsl else [])
        intervals = self.last_intervals or {}
        for prefix in prefixes:
            block = intervals.get("dsl_metrics" if prefix.startswith("dsl/") else "metrics") or {}
            cells = []
            for c in ("R@1", "R@5", "R@10", "MdR", "MnR"):
                key = f"{prefix}/{c}"
                bounds = block.get(key.removeprefix("dsl/"))
                cells.append(f"{metrics[key]:.1f}" + (f" [{bounds[0]:.1f}, {bounds[1]:.1f}]" if bounds else ""))
            table.add_row(prefix, *cells)
        if intervals:
            table.caption = escape(f"[lo, hi]: 95% bootstrap interval over test queries ({intervals['resamples']:,} "
                                   "resamples of the videos with all their captions)")
        console = Console()
        if intervals and console.width < 120:  # piped or a narrow terminal: keep each interval on one line
            console = Console(width=120)
        console.print(table)


def _select_by_key(chunks: list[dict[str, Any]], video_keys: list[str]) -> Features:
    """The features of `video_keys`, in that order, from gathered chunks (duplicates dropped: first kept)."""
    rows: dict[str, int] = {}
    offset = 0
    for chunk in chunks:
        for i, key in enumerate(chunk["video_key"]):
            rows.setdefault(key, offset + i)
        offset += len(chunk["video_key"])
    missing = [k for k in video_keys if k not in rows]
    if missing:
        raise RuntimeError(f"temporal probe: no probe features for {len(missing)} test video(s), e.g. {missing[0]!r}")
    feats = concat_features([c["video"] for c in chunks])
    return select_features(feats, torch.tensor([rows[k] for k in video_keys], dtype=torch.long))


def _probe_statistics(plain: Any, probe: Any, resamples: int) -> dict[str, Any]:
    """The probe's metrics by caption type and, with `resamples`, its own 95% intervals and the paired comparison
    with the plain test (drop = plain - probe, its 95% paired-bootstrap interval and permutation p-value,
    tvr_bench/stats.py), overall and by caption type. `plain` and `probe` are PerQuery rank sets."""
    from tvr_bench.diagnostics import group_metrics, paired_group_comparison
    from tvr_bench.stats import bootstrap_intervals, paired_comparison

    out: dict[str, Any] = {}
    if probe.t2v_group is not None:
        out["caption_types"] = group_metrics([probe], resamples)
    if resamples <= 0:
        return out
    paired = paired_comparison(plain, probe, n_boot=resamples, names=("plain", "probe"))
    out["intervals"] = bootstrap_intervals([probe.directions()], resamples)
    out["drop"] = {k: {"value": v["diff"], "ci": v["ci"], "p": v["p"]} for k, v in paired.items()}
    if probe.t2v_group is not None:
        out["drop_by_caption_type"] = {
            g: {k: {"value": v["diff"], "ci": v["ci"], "p": v["p"]} for k, v in metrics.items()}
            for g, metrics in paired_group_comparison(plain, probe, resamples, names=("plain", "probe")).items()
        }
    return out


def _caption_order(caption_key: str) -> tuple[int, str]:
    """Sort captions of one video by their position in the sample (`key#j`)."""
    _, _, tail = caption_key.rpartition("#")
    return (int(tail), "") if tail.isdigit() else (0, caption_key)
