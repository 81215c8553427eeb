"""RetrievalEvaluator: the one evaluation callback every method shares.

It collects the features each eval step returns, gathers them from every DDP rank, drops duplicates
by sample key (Lightning and WebDataset may pad or repeat), sorts by key so the order never depends
on the number of ranks or workers, scores the text x video matrix in memory-bounded blocks (each
rank scores a share of the text rows, then the rows are gathered), computes the metrics and logs them.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor

from tvr_bench.metrics import metrics_from_ranks, query_ranks
from tvr_bench.probes import PROBES, check_probes, probe_frames

Features = dict[str, Tensor]

#: The test features a run saves with `save_features: true` (in its run directory), for `tvr-bench audit --run`.
FEATURES_FILE = "test_features.pt"


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


def index_features(feats: Features, n: int) -> Features:
    """The feature dict with an `index` entry 0..n-1 unless it has one (a subset keeps its items' global indices,
    so a method's per-item random draws follow the items: T-MASS's evaluation samples)."""
    return feats if "index" in feats else {**feats, "index": torch.arange(n)}


def prepare_scoring(method: Any, text: Features, video: Features, text_to_video: Tensor) -> tuple[Features, Features]:
    """The set-level step of the evaluator's scoring: global `index` entries, then the method's optional
    `prepare_eval_features(text, video, text_to_video)` hook (after every batch is assembled).
    `text_to_video` gives each text's video column (-1: its video is not in this gallery)."""
    n_text, n_video = len(next(iter(text.values()))), len(next(iter(video.values())))
    text, video = index_features(text, n_text), index_features(video, n_video)
    prepare = getattr(method, "prepare_eval_features", None)
    if callable(prepare):  # set-level features (T-MASS reference pairing)
        text, video = prepare(text, video, text_to_video)
    return text, video


@torch.no_grad()
def eval_scores(method: Any, text: Features, video: Features, text_to_video: Tensor, budget_mb: float | None = None,
                rows: Tensor | None = None) -> Tensor:
    """The evaluator's test-time score matrix of an assembled set, without a Trainer: `prepare_scoring`, then
    `blocked_similarity` under `budget_mb` (default: the method's `eval_memory_mb`), honouring the method's
    `eval_block_sizes()` hook. What `RetrievalEvaluator` scores and what the scoring audit (tvr_bench/audit.py)
    audits is this function. `rows`: score only these text rows (this rank's share)."""
    device = getattr(method, "device", None) or torch.device("cpu")
    text = {k: v.to(device) for k, v in text.items()}
    video = {k: v.to(device) for k, v in video.items()}
    text, video = prepare_scoring(method, text, video, text_to_video.to(device))
    if budget_mb is None:
        hparams = getattr(method, "hparams", None) or {}
        budget_mb = float(hparams.get("eval_memory_mb", 1024.0)) if hasattr(hparams, "get") else 1024.0
    return blocked_similarity(method, text, video, budget_mb, rows)


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
                 bootstrap_resamples: int = 10_000, postprocess: list[str] | None = None, query_bank: int = 5000,
                 qbnorm_beta: float = 20.0, qbnorm_k: int = 1, sinkhorn_iters: int = 4,
                 sinkhorn_temperature: float = 0.01, audit: bool = True, both_scorings: bool = True,
                 save_features: bool | str = False, probes: list[str] | str | None = None):
        """`save_scores`: a file path; after each test, rank 0 saves the score matrix and the key order there.
        `bootstrap_resamples`: after a test, rank 0 computes the 95% bootstrap interval over test queries of every
        metric (tvr_bench/stats.py) and prints it in the table (0: none).

        Post-processing (tvr_bench/postprocessing.py), each reported under its own keys `<name>/t2v/...`, never mixed
        with the plain numbers: `dsl` (also at validation), and at test `postprocess` from `qbnorm`, `sknorm`,
        `sinkhorn` (and `dsl`). `query_bank`: training captions sampled for QB-Norm / SK-norm (0: all of them);
        `qbnorm_beta`/`qbnorm_k`, `sinkhorn_iters`/`sinkhorn_temperature`: their settings.
        `audit`: after a test, run the scoring audit's property checks (tvr_bench/audit.py) on a subset of the test
        features; its verdict is the result's `result_class`, and a label-dependent or transductive scoring gets a
        warning line at the start of the run and under the table. `both_scorings`: when the configured scoring is
        label-dependent or transductive, score the same test features a second time with the method's default
        value of the options that make it so (T-MASS `pairing: query`) and report that honest number first.
        `save_features`: keep the assembled test features for `tvr-bench audit --run` (true: `<run dir>/{FEATURES_FILE}`,
        or a file path).
        `probes`: temporal probes of the test (`reversed`, `shuffled`, `middle` or `all`; tvr_bench/probes.py): the
        test set is scored again with every video's frames reordered or frozen, each probe at the cost of one
        more encoding of the test videos; `last_probes` holds each probe's metrics and its paired drop."""
        super().__init__()
        from tvr_bench.postprocessing import postprocessing

        self.postprocess = [p for p in dict.fromkeys(postprocess or []) if p]
        for name in self.postprocess:
            postprocessing(name)  # ValueError naming the choices
        if query_bank < 0:
            raise ValueError(f"evaluator query_bank must be >= 0 (0: every training caption), got {query_bank}")
        self.query_bank = query_bank
        self.settings = {"qbnorm_beta": qbnorm_beta, "qbnorm_k": qbnorm_k, "sinkhorn_iters": sinkhorn_iters,
                         "sinkhorn_temperature": sinkhorn_temperature}
        self.audit = audit
        self.both_scorings = both_scorings
        self.save_features = save_features
        #: after a test: the scoring audit's verdict (`tvr_bench.audit.evaluation_audit`), or None
        self.last_audit: dict[str, Any] | None = None
        #: after a test whose scoring is not rankable: the honest second scoring (options, metrics, ranks, ...)
        self.last_companion: dict[str, Any] | None = None
        #: after a test: `{name: {"metrics", "intervals", "result_class", "settings", "directions"}}` per post-processing
        self.last_post: dict[str, dict[str, Any]] = {}
        self.last_score_seconds: float = 0.0
        self._start_checked = False
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

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """One warning line when the configured scoring is label-dependent or transductive (the audit on noise inputs)."""
        self._warn_at_start(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """As `on_fit_start` (once per process)."""
        self._warn_at_start(trainer, pl_module)

    def _warn_at_start(self, trainer: Any, pl_module: Any) -> None:
        if self._start_checked or not self.audit or not getattr(trainer, "is_global_zero", True):
            return
        self._start_checked = True
        if not hasattr(pl_module, "using_scoring_options") or not hasattr(pl_module, "backbone"):
            return
        from tvr_bench.audit import Scoring, classify, is_ranked, property_checks, property_set

        was_training = pl_module.training
        pl_module.eval()
        try:
            verdict = classify(property_checks(Scoring(pl_module, pl_module.scoring_options()),
                                               property_set(pl_module, n_video=8)))
        except Exception as exn:  # noqa: BLE001 - the probe must never stop a run; the test-time audit still runs
            warnings.warn(f"scoring audit at start skipped: {type(exn).__name__}: {exn}")
            return
        finally:
            if was_training:
                pl_module.train()
        if not is_ranked(verdict):
            tail = ("; the test scores the same features a second time with the method's default for the options "
                    "that make it so, and reports that number first") if self.both_scorings else ""
            print(f"warning: {scoring_warning(pl_module, verdict)}{tail}", flush=True)

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
        if self.print_table and getattr(trainer, "is_global_zero", True):
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

    def score(self, pl_module: Any, text: Features, video: Features, text_to_video: Tensor) -> Tensor:
        """Full similarity matrix through `eval_scores`: this rank scores its share of rows, then rows are gathered."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        n_text = text[next(iter(text))].shape[0]
        sizes = eval_block_sizes(pl_module)  # block-mixing scores: each rank takes whole reference blocks
        rows = torch.arange(rank, n_text, world) if sizes is None else block_rows(n_text, sizes[0], rank, world)
        part = eval_scores(pl_module, text, video, text_to_video, pl_module.hparams.eval_memory_mb, rows)
        parts = _gather_objects((rows, part))
        sim = torch.empty(n_text, part.shape[1], dtype=torch.float32)
        for r, p in parts:
            sim[r] = p
        return sim

    def postprocess_names(self, stage: str) -> list[str]:
        """The post-processing of this stage: DSL at every evaluation, the others after a test only."""
        names = ["dsl"] if self.dsl else []
        return list(dict.fromkeys(names + (self.postprocess if stage == "test" else [])))

    @torch.no_grad()
    def query_bank_features(self, trainer: Any, pl_module: Any) -> Features:
        """Text features of the query bank: `query_bank` training captions (the datamodule's `query_bank`), encoded
        by the module in batches."""
        datamodule = getattr(trainer, "datamodule", None)
        source = getattr(datamodule, "query_bank", None)
        if not callable(source):
            raise ValueError(f"QB-Norm / SK-norm need training captions, and {type(datamodule).__name__} offers no "
                             "`query_bank(limit, seed)`")
        batch = source(self.query_bank, seed=0)
        captions = list(batch["captions"])
        chunks = []
        for i in range(0, len(captions), 256):
            feats = pl_module.encode_batch_text({"captions": captions[i : i + 256]})
            chunks.append({k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu() for k, v in feats.items()})
        return concat_features(chunks)

    def _post_scores(self, trainer: Any, pl_module: Any, sim: Tensor, video: Features, names: list[str],
                     bank: Features | None) -> dict[str, Tensor]:
        from tvr_bench.postprocessing import postprocessing

        out = {}
        bank_sim: Tensor | None = None
        bank_error = None
        for name in names:
            option = postprocessing(name)
            if option.needs_bank and bank_sim is None and bank_error is None:
                n_bank = len(next(iter(bank.values())))
                try:  # a query bank has no test labels: a scoring that reads them cannot score it
                    bank_sim = self.score(pl_module, bank, video, torch.full((n_bank,), -1, dtype=torch.long))
                except ValueError as exn:
                    bank_error = str(exn)
            if option.needs_bank and bank_sim is None:
                if getattr(trainer, "is_global_zero", True):
                    warnings.warn(f"{name} skipped: the query bank cannot be scored with this scoring ({bank_error})")
                continue
            out[name] = option.apply(sim, bank_sim if option.needs_bank else None, self.settings).float()
        return out

    def _save_test_features(self, trainer: Any, pl_module: Any, text: Features, video: Features, t2v: Tensor,
                            video_keys: list[str], caption_keys: list[str]) -> Path | None:
        from tvr_bench.loggers import run_directory

        path = Path(self.save_features) if isinstance(self.save_features, str) else Path(run_directory(trainer)) / FEATURES_FILE
        if not trainer.is_global_zero:
            return None
        cls = type(pl_module)
        options = pl_module.scoring_options() if hasattr(pl_module, "scoring_options") else {}
        ckpt = getattr(trainer, "ckpt_path", None)
        payload = {"text": text, "video": video, "text_to_video": t2v, "video_keys": list(video_keys),
                   "caption_keys": list(caption_keys), "class_path": f"{cls.__module__}.{cls.__name__}",
                   "ckpt_path": None if ckpt is None else os.fspath(ckpt),
                   "scoring_options": {k: v for k, v in options.items() if isinstance(v, (str, int, float, bool))}}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, path)
        return path

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, float]:
        start = time.perf_counter()
        was_training = pl_module.training
        pl_module.eval()
        text, video, video_keys, caption_keys, t2v = self.assemble()
        self._reset()
        if not video_keys:
            raise RuntimeError(f"the {stage} set yielded no videos: check the shards and the split name")
        if self.save_features and stage == "test":
            self._save_test_features(trainer, pl_module, text, video, t2v, video_keys, caption_keys)
        score_start = time.perf_counter()
        sim = self.score(pl_module, text, video, t2v)
        self.last_score_seconds = time.perf_counter() - score_start
        self.last_eval_blocks = eval_block_sizes(pl_module)
        if self.save_scores and stage == "test" and trainer.is_global_zero:
            payload = {"sim": sim, "text_to_video": t2v, "video_keys": video_keys, "caption_keys": caption_keys}
            torch.save(payload, self.save_scores)
        ranks = query_ranks(sim, t2v)  # once: the metrics and the per-query results both come from them
        metrics = metrics_from_ranks(ranks)
        names = self.postprocess_names(stage)
        bank = None
        if any(_needs_bank(n) for n in names):
            bank = self.query_bank_features(trainer, pl_module)
        post_sims = self._post_scores(trainer, pl_module, sim, video, names, bank)
        names = [n for n in names if n in post_sims]
        dsl_sim = post_sims.get("dsl")
        dsl_ranks = None if dsl_sim is None else query_ranks(dsl_sim, t2v)
        if dsl_ranks is not None:
            metrics.update({f"dsl/{k}": v for k, v in metrics_from_ranks(dsl_ranks).items()})
        post_ranks = {n: (dsl_ranks if n == "dsl" else query_ranks(p, t2v)) for n, p in post_sims.items()}
        for name, r in post_ranks.items():
            if name != "dsl":
                metrics.update({f"{name}/{k}": v for k, v in _directions(metrics_from_ranks(r), name).items()})
        caption_types = self._caption_types(trainer, caption_keys) if stage == "test" else None
        self.last_per_query = (
            per_query_results(sim, t2v, video_keys, caption_keys, dsl_sim, self.top_k, ranks, dsl_ranks, caption_types)
            if stage == "test" else None
        )
        self.last_intervals = None
        is_zero = getattr(trainer, "is_global_zero", True)
        self.last_search = None  # the result JSON's `search` block: what search's two stages lose on this test set
        if stage == "test" and is_zero:
            from tvr_bench.search.twostage import search_report

            self.last_search = search_report(pl_module, text, video, sim, t2v)
        if self.last_per_query is not None and self.bootstrap_resamples > 0 and is_zero:
            self.last_intervals = query_intervals(self.last_per_query, self.bootstrap_resamples)
        self.last_audit = self.last_companion = None
        self.last_post = {}
        if stage == "test":
            self._test_extras(trainer, pl_module, text, video, t2v, video_keys, caption_keys, names, bank, post_ranks,
                              metrics)
        self.last_diagnostics = self.last_probes = None
        extra_logs: dict[str, float] = {}
        if self.last_per_query is not None:  # diagnostics by caption type and temporal probes (logged, not in metrics)
            extra_logs = self._diagnose(trainer, pl_module, text, t2v, video_keys, caption_keys, ranks)
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

    def _test_extras(self, trainer: Any, pl_module: Any, text: Features, video: Features, t2v: Tensor,
                     video_keys: list[str], caption_keys: list[str], names: list[str], bank: Features | None,
                     post_ranks: dict[str, dict[str, Tensor]], metrics: dict[str, float]) -> None:
        """After a test: the audit verdict, the post-processing blocks and the honest second scoring."""
        from tvr_bench.postprocessing import postprocessing

        is_zero = getattr(trainer, "is_global_zero", True)
        if self.audit and hasattr(pl_module, "scoring_options"):
            from tvr_bench.audit import EvalSet, evaluation_audit

            verdict = evaluation_audit(pl_module, EvalSet(text, video, t2v), names, self.settings, bank)
            self.last_audit = _gather_objects(verdict)[0]  # rank 0's verdict everywhere: the ranks act alike below
        for name in names:
            option = postprocessing(name)
            block: dict[str, Any] = {
                "metrics": {k[len(name) + 1 :]: v for k, v in metrics.items() if k.startswith(f"{name}/")},
                "title": option.title, "source": option.source, "directions": list(option.directions),
                "note": option.note,
                "settings": option.used_settings(self.settings),
                "result_class": ((self.last_audit or {}).get("post", {}).get(name) or {}).get("result_class"),
            }
            if option.needs_bank:
                block["query_bank"] = {"texts": len(next(iter(bank.values()))) if bank else 0,
                                       "source": "training captions (datamodule.query_bank)", "asked": self.query_bank}
            if is_zero and self.bootstrap_resamples > 0 and self.last_per_query is not None:
                if name == "dsl" and self.last_intervals is not None:
                    block["intervals"] = self.last_intervals.get("dsl_metrics")
                elif name != "dsl":
                    r = post_ranks[name]
                    ranked = {**self.last_per_query, "t2v_rank": r["t2v"].cpu(), "v2t_rank": r["v2t"].cpu(),
                              "v2t_video": r["v2t_video"].cpu()}
                    ranked.pop("dsl_t2v_rank", None), ranked.pop("dsl_v2t_rank", None)
                    block["intervals"] = _directions(query_intervals(ranked, self.bootstrap_resamples)["metrics"], name)
            self.last_post[name] = block
        verdict = (self.last_audit or {}).get("result_class")
        if not (self.both_scorings and verdict and verdict not in ("pairwise", "gallery-normalised")):
            return
        from tvr_bench.audit import EvalSet, honest_options, test_subset

        found = _gather_objects(honest_options(pl_module, test_subset(EvalSet(text, video, t2v)), verdict))[0]
        if found is None:
            return
        options, honest_class = found
        t0 = time.perf_counter()
        with pl_module.using_scoring_options(**options):
            sim = self.score(pl_module, text, video, t2v)
            method = str(getattr(pl_module, "method_name", type(pl_module).__name__.lower()))
        seconds = time.perf_counter() - t0
        ranks = query_ranks(sim, t2v)
        honest = metrics_from_ranks(ranks)
        per_query = per_query_results(sim, t2v, video_keys, caption_keys, None, self.top_k, ranks)
        intervals = query_intervals(per_query, self.bootstrap_resamples) if is_zero and self.bootstrap_resamples > 0 else None
        changed = {k: v for k, v in options.items() if pl_module.scoring_options().get(k) != v}
        self.last_companion = {"method": method, "options": options, "changed": changed, "result_class": honest_class,
                               "metrics": honest, "per_query": per_query, "intervals": intervals,
                               "score_seconds": seconds, "first_score_seconds": self.last_score_seconds}
        metrics.update({f"honest/{k}": v for k, v in honest.items()})
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
        base = metrics_from_ranks(ranks)
        out: dict[str, Any] = {}
        for name in self.probes:
            video = _select_by_key(gathered[name], video_keys)
            sim = self.score(pl_module, raw_text, video, t2v)
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

        name = getattr(pl_module, "method_name", type(pl_module).__name__.lower())
        table = Table(title=f"{name}: {self.last_counts.get('texts')} texts x {self.last_counts.get('videos')} videos")
        table.add_column("direction", no_wrap=True)
        for col in ("R@1", "R@5", "R@10", "MdR", "MnR"):
            table.add_column(col, justify="right")
        verdict = (self.last_audit or {}).get("result_class")
        intervals = self.last_intervals or {}
        companion = self.last_companion
        rows: list[tuple[str, dict[str, float], dict[str, Any]]] = []
        if companion is not None:  # the honest number first
            label = ", ".join(f"{k}={v}" for k, v in companion["changed"].items())
            spans = (companion.get("intervals") or {}).get("metrics") or {}
            for d in ("t2v", "v2t"):
                rows.append((f"{d} · {companion['result_class']} ({label})",
                             {k[4:]: v for k, v in companion["metrics"].items() if k.startswith(f"{d}/")},
                             {k[4:]: v for k, v in spans.items() if k.startswith(f"{d}/")}))
        tag = f" · {verdict}" if verdict else ""
        if companion is not None:
            tag += " (" + ", ".join(f"{k}={v}" for k, v in pl_module.scoring_options().items()
                                    if k in companion["changed"]) + ")"
        for d in ("t2v", "v2t"):
            rows.append((f"{d}{tag}", {k[4:]: v for k, v in metrics.items() if k.startswith(f"{d}/")},
                         {k[4:]: v for k, v in (intervals.get("metrics") or {}).items() if k.startswith(f"{d}/")}))
        for post in self.postprocess_names("test" if self.last_post else "val"):
            block = self.last_post.get(post) or {}
            cls = f" · {block['result_class']}" if block.get("result_class") else ""
            spans = (block.get("intervals") if post != "dsl" else intervals.get("dsl_metrics")) or {}
            for d in (block.get("directions") or ("t2v", "v2t")):
                values = {k[len(post) + 5 :]: v for k, v in metrics.items() if k.startswith(f"{post}/{d}/")}
                if values:
                    rows.append((f"{post}/{d}{cls}", values,
                                 {k[4:]: v for k, v in spans.items() if k.startswith(f"{d}/")}))
        for label, values, bounds_of in rows:
            cells = []
            for c in ("R@1", "R@5", "R@10", "MdR", "MnR"):
                bounds = bounds_of.get(c)
                value = values.get(c)
                cells.append("–" if value is None else
                             f"{value:.1f}" + (f" [{bounds[0]:.1f}, {bounds[1]:.1f}]" if bounds else ""))
            table.add_row(escape(label), *cells)
        if intervals:
            table.caption = escape(f"[lo, hi]: 95% bootstrap interval over test queries ({intervals['resamples']:,} "
                                   "resamples of the videos with all their captions)")
        console = Console()
        wide = 120 + max(0, max(len(r[0]) for r in rows) - 12)
        if intervals and console.width < wide:  # piped or a narrow terminal: keep each interval on one line
            console = Console(width=wide)
        console.print(table)
        if companion is not None:
            print(f"scored the same test features twice: the {companion['result_class']} scoring took "
                  f"{companion['score_seconds']:.2f} s, the configured one {companion['first_score_seconds']:.2f} s "
                  f"(the second scoring added {companion['score_seconds'] / max(companion['first_score_seconds'], 1e-9):.0%}"
                  " to the scoring time)")
        if verdict and verdict not in ("pairwise", "gallery-normalised"):
            print(f"warning: {scoring_warning(pl_module, verdict, companion)}", flush=True)


def _needs_bank(name: str) -> bool:
    from tvr_bench.postprocessing import postprocessing

    return postprocessing(name).needs_bank


def _directions(values: dict[str, Any], name: str) -> dict[str, Any]:
    """The entries of `values` (keys `t2v/...`, `v2t/...`) in the directions post-processing `name` reports."""
    from tvr_bench.postprocessing import postprocessing

    keep = postprocessing(name).directions
    return {k: v for k, v in values.items() if k.split("/", 1)[0] in keep}


def scoring_warning(method: Any, verdict: str, companion: dict[str, Any] | None = None) -> str:
    """One line saying that a method's scoring is label-dependent or transductive, and what that means."""
    name = getattr(method, "method_name", type(method).__name__.lower())
    options = method.scoring_options() if hasattr(method, "scoring_options") else {}
    declared = getattr(type(method), "SCORING_OPTIONS", {}) or {}
    changed = ", ".join(f"{k}={v}" for k, v in options.items() if declared.get(k) and v != declared[k][0])
    what = {"label-dependent": "it reads the test labels (fails label invariance), so its numbers are not a valid "
                               "retrieval result",
            "transductive": "a text's scores depend on the other test queries, so its numbers are not comparable with "
                            "retrieval that scores each query alone"}.get(verdict, verdict)
    tail = ""
    if companion is not None:
        tail = "; the honest scoring (" + ", ".join(f"{k}={v}" for k, v in companion["changed"].items()) + \
               f", {companion['result_class']}) is reported first"
    return (f"{name}'s scoring{f' ({changed})' if changed else ''} is {verdict}: {what}; it is never ranked beside "
            f"plain retrieval (docs/leaderboard.md, 'What counts as a retrieval result'){tail}")


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
