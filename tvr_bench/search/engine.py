"""Answer text queries from a search index with the method that built it.

Two-tower methods: the query's vector against the stored video vectors through faiss (exact by default, the
IVF index with ``approximate=True``). Text-conditioned methods (``rerank``): the same vector stage over the
first-stage vectors picks ``rerank`` candidates, then the method's own `similarity` scores the query against
the candidates' stored features (read from the memory-mapped arrays, only those rows), and the candidates are
ordered by that score. ``exhaustive=True`` scores every stored video with `similarity` instead (the reference
the two stages are measured against).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvr_bench.search.model import LoadedModel, SearchSetupError, load_model
from tvr_bench.search.store import APPROX_FILE, StoredIndex, open_stored
from tvr_bench.search.vectors import approximate_knn, exact_index, knn, read_index

#: Candidates the method re-ranks per query by default (the issue's K).
DEFAULT_RERANK = 200
#: Bytes of stored video features read per block by exhaustive scoring.
EXHAUSTIVE_BLOCK_BYTES = 64 * 2**20

Features = dict[str, torch.Tensor]


class FingerprintMismatch(SearchSetupError):
    """The model offered for a query is not the one the index was built with."""


@dataclass
class Hit:
    """One retrieved video: its rank, key, source, the method's score and the vector-stage score."""

    rank: int
    key: str
    source: str
    score: float
    row: int
    first_stage_score: float | None = None
    duration: float | None = None


@dataclass
class SearchResult:
    """The top-k of one query, how it was computed and how long each stage took (ms)."""

    query: str
    hits: list[Hit]
    mode: str
    gallery: int
    candidates: int | None
    timings_ms: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON form."""
        return asdict(self)


class SearchIndex:
    """A finished index with its model loaded: call :meth:`search` as often as needed."""

    def __init__(self, stored: StoredIndex, loaded: LoadedModel) -> None:
        self.stored = stored
        self.loaded = loaded
        self._exact = None
        self._approx = None
        #: seconds spent building the exact vector index when the index was opened
        self.load_seconds = 0.0

    @classmethod
    def open(cls, path: str | Path, ckpt: str | Path | None = None, device: str = "cpu") -> "SearchIndex":
        """Open `path` and load its model (the checkpoint it records, or `ckpt`); refuse a model whose fingerprint
        differs from the one the index was built with."""
        stored = open_stored(path)
        source = ckpt if ckpt is not None else stored.meta.get("checkpoint")
        if ckpt is None and not Path(str(source)).exists():
            raise SearchSetupError(f"{path} was built with {source}, which no longer exists: pass --ckpt with the "
                                   f"same checkpoint (fingerprint {stored.meta['fingerprint'][:12]})")
        loaded = load_model(source, device)
        check_fingerprint(stored, loaded)
        opened = cls(stored, loaded)
        t0 = time.perf_counter()
        opened.vector_index()  # the exact flat index is built from vectors.npy once, here, not in a query's time
        opened.load_seconds = time.perf_counter() - t0
        return opened

    # ------------------------------------------------------------------------------------------ parts
    @property
    def scoring(self) -> str:
        """``two_tower`` or ``rerank`` (the method's declaration, recorded in the index)."""
        return str(self.stored.meta["scoring"])

    def vector_index(self, approximate: bool = False):  # noqa: ANN201 - a faiss index
        """The exact flat index (built from vectors.npy on first use), or the stored approximate one."""
        if approximate:
            if self._approx is None:
                path = self.stored.path / APPROX_FILE
                if not path.is_file():
                    raise SearchSetupError(f"{self.stored.path} has no approximate index: build it with "
                                           f"`tvr-bench index ... --approximate` (or drop --approximate)")
                self._approx = read_index(path)
            return self._approx
        if self._exact is None:
            self._exact = exact_index(self.stored.vectors)
        return self._exact

    @torch.no_grad()
    def encode(self, queries: list[str]) -> Features:
        """The method's text features of the queries (each query's `index` is 0, so a query's score never
        depends on the other queries it is batched with)."""
        model = self.loaded.model
        feats = model.encode_text(**model.tokenize(list(queries)))
        device = next(iter(feats.values())).device
        return {**feats, "index": torch.zeros(len(queries), dtype=torch.long, device=device)}

    def gallery_features(self, rows: np.ndarray) -> Features:
        """Stored video features of `rows` (ascending), read from the memory-mapped arrays, with their `index`."""
        device = next(self.loaded.model.parameters()).device
        feats = {k: torch.from_numpy(np.ascontiguousarray(a[rows])).to(device) for k, a in self.stored.features.items()}
        feats["index"] = torch.from_numpy(rows.astype(np.int64)).to(device)
        return feats

    @torch.no_grad()
    def method_scores(self, text: Features, rows: np.ndarray) -> np.ndarray:
        """The method's `similarity` of the queries against the stored videos `rows` ([Q, len(rows)] float32)."""
        from tvr_bench.callbacks.evaluator import blocked_similarity

        model = self.loaded.model
        budget = float(getattr(model.hparams, "eval_memory_mb", 1024.0) or 1024.0)
        if self.scoring == "two_tower":
            vectors = torch.from_numpy(np.ascontiguousarray(self.stored.vectors[rows]))
            return (model.search_vectors(text, "text").float().cpu() @ vectors.T).numpy()
        return blocked_similarity(model, text, self.gallery_features(rows), budget).numpy()

    def exhaustive_scores(self, text: Features) -> np.ndarray:
        """The method's score of the queries against every stored video, in blocks of stored features."""
        n = self.stored.num_videos
        per_row = sum(a[:1].nbytes for a in self.stored.features.values()) or self.stored.vectors[:1].nbytes
        block = max(1, EXHAUSTIVE_BLOCK_BYTES // max(1, per_row))
        parts = [self.method_scores(text, np.arange(s, min(n, s + block))) for s in range(0, n, block)]
        return np.concatenate(parts, axis=1)

    # ------------------------------------------------------------------------------------------ search
    def search(self, query: str, k: int = 10, *, rerank: int = DEFAULT_RERANK, approximate: bool = False,
               nprobe: int | None = None, exhaustive: bool = False) -> SearchResult:
        """The top `k` videos for one text query (see the module docstring for the modes)."""
        return self.search_many([query], k, rerank=rerank, approximate=approximate, nprobe=nprobe, exhaustive=exhaustive)[0]

    def search_many(self, queries: list[str], k: int = 10, *, rerank: int = DEFAULT_RERANK, approximate: bool = False,
                    nprobe: int | None = None, exhaustive: bool = False) -> list[SearchResult]:
        """The top `k` videos of each query; the vector stage runs on all queries at once."""
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        if rerank < 1:
            raise ValueError(f"rerank must be positive, got {rerank}")
        if not exhaustive:
            self.vector_index(approximate)  # loaded outside the timed stages
        t0 = time.perf_counter()
        text = self.encode(queries)
        t1 = time.perf_counter()
        encode_ms = 1000 * (t1 - t0) / len(queries)  # timings are per query (the batch's time shared out)
        if exhaustive:
            scores = self.exhaustive_scores(text)
            order = _top(scores, k)
            ms = 1000 * (time.perf_counter() - t1) / len(queries)
            return [self._result(q, order[i], scores[i, order[i]], None, f"exhaustive ({self.loaded.method} similarity)",
                                 None, {"encode": encode_ms, "score": ms, "total": encode_ms + ms})
                    for i, q in enumerate(queries)]
        vectors = self.loaded.model.search_vectors(text, "text").float().cpu().numpy()
        kind = "approximate (IVF)" if approximate else "exact"
        first_k = k if self.scoring == "two_tower" else max(k, rerank)
        if approximate:  # the IVF's 8-bit codes find the rows, their scores come from the float32 vectors
            first_scores, first_rows = approximate_knn(self.vector_index(True), self.stored.vectors, vectors, first_k, nprobe)
        else:
            first_scores, first_rows = knn(self.vector_index(), vectors, first_k)
        t2 = time.perf_counter()
        vector_ms = 1000 * (t2 - t1) / len(queries)
        out = []
        for i, q in enumerate(queries):
            keep = first_rows[i] >= 0  # an IVF search can find fewer than k rows in the lists it probes
            rows, fs = first_rows[i][keep], first_scores[i][keep]
            if self.scoring == "two_tower":
                timings = {"encode": encode_ms, "vector": vector_ms, "total": encode_ms + vector_ms}
                out.append(self._result(q, np.arange(len(rows)), fs, rows, f"two-tower, {kind} vector search", None, timings, fs))
                continue
            t3 = time.perf_counter()
            ascending = np.sort(rows)
            method = self.method_scores({key: v[i : i + 1] for key, v in text.items()}, ascending)[0]
            score_of_row = dict(zip(ascending.tolist(), method.tolist()))
            scores = np.array([score_of_row[r] for r in rows.tolist()], dtype=np.float32)
            order = _top(scores[None], k)[0]
            rerank_ms = 1000 * (time.perf_counter() - t3)
            timings = {"encode": encode_ms, "vector": vector_ms, "rerank": rerank_ms, "total": encode_ms + vector_ms + rerank_ms}
            mode = f"two-stage: {kind} vector search over mean-pooled vectors, {self.loaded.method} re-ranks {len(rows)}"
            out.append(self._result(q, order, scores[order], rows, mode, len(rows), timings, fs))
        return out

    def _result(self, query: str, order: np.ndarray, scores: np.ndarray, rows: np.ndarray | None, mode: str,
                candidates: int | None, timings: dict[str, float], first: np.ndarray | None = None) -> SearchResult:
        """A SearchResult from positions `order` into `rows` (or gallery rows when `rows` is None)."""
        hits = []
        for rank, pos in enumerate(order.tolist(), start=1):
            row = int(pos if rows is None else rows[pos])
            item = self.stored.items[row]
            hits.append(Hit(rank=rank, key=str(item["key"]), source=str(item.get("source", item["key"])),
                            score=float(scores[rank - 1]), row=row,
                            first_stage_score=None if first is None else float(first[pos]),
                            duration=item.get("duration")))
        return SearchResult(query, hits, mode, self.stored.num_videos, candidates, {k: round(v, 3) for k, v in timings.items()})


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row, the positions of the k highest scores, best first; ties in position order; NaN last."""
    safe = np.where(np.isnan(scores), -np.inf, scores)
    k = min(k, scores.shape[1])
    return np.argsort(-safe, axis=1, kind="stable")[:, :k]


def check_fingerprint(stored: StoredIndex, loaded: LoadedModel) -> None:
    """Refuse to answer queries with a model other than the one that built the index."""
    want = str(stored.meta.get("fingerprint"))
    if loaded.fingerprint != want:
        raise FingerprintMismatch(
            f"{stored.path} was built by another model: checkpoint {stored.meta.get('checkpoint')} "
            f"({stored.meta.get('method')}, fingerprint {want[:12]}), but {loaded.checkpoint} ({loaded.method}) has "
            f"fingerprint {loaded.fingerprint[:12]}; its scores would not match the stored features. Search with the "
            f"index's checkpoint, or rebuild the index: `tvr-bench index SOURCE --ckpt {loaded.checkpoint} --out ...`"
        )


def search(query: str | list[str], index: str | Path | SearchIndex, k: int = 10, *, ckpt: str | Path | None = None,
           rerank: int = DEFAULT_RERANK, approximate: bool = False, nprobe: int | None = None,
           exhaustive: bool = False) -> SearchResult | list[SearchResult]:
    """Search an index (a path, or an opened :class:`SearchIndex` to reuse across calls) for one query or a list."""
    opened = index if isinstance(index, SearchIndex) else SearchIndex.open(index, ckpt)
    many = [query] if isinstance(query, str) else list(query)
    results = opened.search_many(many, k, rerank=rerank, approximate=approximate, nprobe=nprobe, exhaustive=exhaustive)
    return results[0] if isinstance(query, str) else results


def open_index(path: str | Path, ckpt: str | Path | None = None, device: str = "cpu") -> SearchIndex:
    """Open an index and its model once, for many queries (:meth:`SearchIndex.search`)."""
    return SearchIndex.open(path, ckpt, device)
