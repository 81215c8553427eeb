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


def eval_block_sizes(method: Any) -> tuple[int, int] | None:
    """(texts, videos) per evaluation block of a method whose reference scores the items of a block together
    (its `eval_block_sizes()` hook, e.g. EMCL's test-time EM); None for pairwise scores."""
    hook = getattr(method, "eval_block_sizes", None)
    sizes = hook() if callable(hook) else None
    if sizes is None:
        return None
    bt, bv = (int(s) for s in sizes)
    if bt < 1 or bv < 1:
        raise ValueError(f"{type(method).__name__}.eval_block_sizes() must give positive sizes, got {sizes}")
    return bt, bv


def block_rows(n_text: int, block: int, rank: int = 0, world: int = 1) -> Tensor:
    """Text rows of the evaluation blocks `rank`, `rank + world`, ... (blocks of `block` consecutive rows)."""
    starts = range(rank * block, n_text, world * block)
    return torch.cat([torch.arange(s, min(s + block, n_text)) for s in starts] or [torch.empty(0, dtype=torch.long)])


@torch.no_grad()
def blocked_similarity(
    method: Any, text: Features, video: Features, budget_mb: float, rows: Tensor | None = None
) -> Tensor:
    """Score `text` (or only its `rows`) against every video in blocks under `budget_mb`.

    A method with `eval_block_sizes()` = (bt, bv) is scored as its reference evaluation loop does: texts and
    videos cut into consecutive blocks of bt and bv items in evaluation order (the last ones smaller), one
    `similarity` call per (text block, video block); the rows asked for are taken from their whole blocks, so a
    score never depends on which rows were asked. The memory budget does not split such a block.
    Scores are computed from float32 features with autocast off (safe under `precision: bf16-mixed`).
    """
    text, video = float32_features(text), float32_features(video)
    with full_precision(next(iter(video.values())).device):
        sizes = eval_block_sizes(method)
        if sizes is not None:
            return _grouped_similarity(method, text, video, sizes, rows)
        return _blocked_similarity(method, text, video, budget_mb, rows)


def _grouped_similarity(method: Any, text: Features, video: Features, sizes: tuple[int, int], rows: Tensor | None) -> Tensor:
    bt, bv = sizes
    n_text = text[next(iter(text))].shape[0]
    n_video = video[next(iter(video))].shape[0]
    rows = torch.arange(n_text) if rows is None else rows.cpu().long()
    out = torch.empty(len(rows), n_video, dtype=torch.float32)
    if len(rows) == 0 or n_video == 0:
        return out
    block_of = rows // bt
    for b in torch.unique(block_of).tolist():
        start = b * bt
        t_block = slice_features(text, start, min(start + bt, n_text))
        scores = torch.cat([method.similarity(t_block, slice_features(video, j, j + bv)).float().cpu()
                            for j in range(0, n_video, bv)], dim=1)  # fmt: skip
        wanted = (block_of == b).nonzero().squeeze(1)
        out[wanted] = scores[rows[wanted] - start]
    return out


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
                      dsl_ranks: dict[str, Tensor] | None = None) -> dict[str, Any]:
    """Per-query ranks (t2v per caption, v2t per captioned video, DSL too when given) with their keys, and the
    top-k videos (column, score) of every text: what the leaderboard saves and the qualitative page shows.
    `ranks` / `dsl_ranks`: the `query_ranks` of `sim` / `dsl_sim` when already computed."""
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
                 bootstrap_resamples: int = 10_000):
        """`save_scores`: a file path; after each test, rank 0 saves the score matrix and the key order there.
        `bootstrap_resamples`: after a test, rank 0 computes the 95% bootstrap interval over test queries of every
        metric (tvr_bench/stats.py) and prints it in the table (0: none)."""
        super().__init__()
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
        #: (texts, videos) per evaluation block of the last evaluation when the method's scores mix a block's items
        self.last_eval_blocks: tuple[int, int] | None = None
        #: after a test: per-query ranks, keys and top-k retrieved videos (see `per_query_results`)
        self.last_per_query: dict[str, Any] | None = None
        #: after a test on rank 0: the search scoring and two-stage loss (tvr_bench/search/twostage.py)
        self.last_search: dict[str, Any] | None = None
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

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Keep the features of one validation batch."""
        self._collect(outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Keep the features of one test batch."""
        self._collect(outputs)

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
        sizes = eval_block_sizes(pl_module)  # block-mixing scores: each rank takes whole reference blocks
        rows = torch.arange(rank, n_text, world) if sizes is None else block_rows(n_text, sizes[0], rank, world)
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
        prepare = getattr(pl_module, "prepare_eval_features", None)
        if callable(prepare):  # set-level features (T-MASS reference pairing), after every batch is assembled
            text, video = prepare(text, video, t2v)
        sim = self.score(pl_module, text, video)
        self.last_eval_blocks = eval_block_sizes(pl_module)
        if self.save_scores and stage == "test" and trainer.is_global_zero:
            payload = {"sim": sim, "text_to_video": t2v, "video_keys": video_keys, "caption_keys": caption_keys}
            torch.save(payload, self.save_scores)
        ranks = query_ranks(sim, t2v)  # once: the metrics and the per-query results both come from them
        metrics = metrics_from_ranks(ranks)
        dsl_sim = dual_softmax(sim) if self.dsl else None
        dsl_ranks = None if dsl_sim is None else query_ranks(dsl_sim, t2v)
        if dsl_ranks is not None:
            metrics.update({f"dsl/{k}": v for k, v in metrics_from_ranks(dsl_ranks).items()})
        self.last_per_query = (
            per_query_results(sim, t2v, video_keys, caption_keys, dsl_sim, self.top_k, ranks, dsl_ranks)
            if stage == "test" else None
        )
        self.last_intervals = None
        self.last_search = None  # the result JSON's `search` block: what search's two stages lose on this test set
        if stage == "test" and trainer.is_global_zero:
            from tvr_bench.search.twostage import search_report

            self.last_search = search_report(pl_module, text, video, sim, t2v)
        if self.last_per_query is not None and self.bootstrap_resamples > 0 and trainer.is_global_zero:
            self.last_intervals = query_intervals(self.last_per_query, self.bootstrap_resamples)
        if was_training:
            pl_module.train()
        self.last_eval_seconds = time.perf_counter() - start
        self.last_counts = {"texts": len(caption_keys), "videos": len(video_keys)}
        self.last_metrics = dict(metrics)
        for key, value in metrics.items():
            pl_module.log(f"{stage}/{key}", value, prog_bar=key == "t2v/R@1", sync_dist=False, rank_zero_only=False)
        pl_module.log(f"{stage}/eval_seconds", self.last_eval_seconds, sync_dist=False)
        return metrics

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


def _caption_order(caption_key: str) -> tuple[int, str]:
    """Sort captions of one video by their position in the sample (`key#j`)."""
    _, _, tail = caption_key.rpartition("#")
    return (int(tail), "") if tail.isdigit() else (0, caption_key)
