"""The vector stage of search, on faiss: exact inner-product search (`IndexFlatIP`, the default) and an optional
approximate inverted-file index with 8-bit codes (`IVF<nlist>,SQ8`, inner product) built from the same vectors,
whose candidates are re-scored exactly (`refine`)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

#: Batches of at least this many queries use faiss's BLAS path (one matrix product per block); fewer use its
#: SIMD scan. faiss 1.15 ships 128,000 here, which keeps a batch of 256 queries on the scan: 3x slower on this
#: machine (tvr_bench/perf/search_bench.py measures both paths).
BLAS_THRESHOLD = 20
#: Database rows per BLAS block (faiss default 1024): larger blocks, fewer top-k merges per product.
BLAS_DATABASE_BLOCK = 65_536


def faiss_module():  # noqa: ANN201 - the faiss module, configured once
    """Import faiss and set its exact-search block sizes (see BLAS_THRESHOLD)."""
    import faiss

    if getattr(faiss, "_tvr_configured", False) is False:
        faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
        faiss.cvar.distance_compute_blas_database_bs = BLAS_DATABASE_BLOCK
        faiss._tvr_configured = True
    return faiss


def default_nlist(n: int) -> int:
    """Inverted lists of the approximate index: about 4 sqrt(N), a power of two, between 1 and 65,536 (at most N)."""
    if n < 2:
        return 1
    return int(min(n, 65_536, max(1, 2 ** round(math.log2(4 * math.sqrt(n))))))


#: Codes of the approximate index: 8-bit scalar quantisation (a quarter of float32's bytes to scan); the rows it
#: finds are re-scored exactly from the float32 vectors (`REFINE` x k of them), so the scores returned are exact.
APPROX_CODES = "SQ8"
REFINE = 4
#: k-means iterations when training the inverted lists (faiss's default is 25; 10 change the lists little).
KMEANS_ITERATIONS = 10


#: Galleries of at least this many vectors are split into one exact shard per thread (`ShardedFlat`).
SHARD_MIN_ROWS = 131_072


def _flat(vectors: np.ndarray, block: int = 262_144):  # noqa: ANN202 - a faiss index
    """An `IndexFlatIP` holding `vectors` (float32 [N, D], e.g. memory-mapped), filled block by block."""
    faiss = faiss_module()
    index = faiss.IndexFlatIP(int(vectors.shape[1]))
    for start in range(0, vectors.shape[0], block):
        index.add(np.ascontiguousarray(vectors[start : start + block], dtype=np.float32))
    return index


class ShardedFlat:
    """Exact inner-product search over consecutive row ranges held by one `IndexFlatIP` each. A few queries scan the
    shards in parallel threads (faiss `IndexShards`, one OpenMP thread per shard: faiss scans a single query on one
    thread); a batch runs faiss's BLAS path on each shard in turn with every thread. Same results as one flat index
    (ties between shards aside)."""

    def __init__(self, vectors: np.ndarray, parts: int) -> None:
        faiss = faiss_module()
        n = int(vectors.shape[0])
        bounds = [n * i // parts for i in range(parts + 1)]
        self.shards = [_flat(vectors[a:b]) for a, b in zip(bounds, bounds[1:])]
        self.offsets = bounds[:-1]
        self.ntotal = n
        self.parallel = faiss.IndexShards(int(vectors.shape[1]), True, True)  # threaded, consecutive ids
        for shard in self.shards:
            self.parallel.add_shard(shard)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and rows [Q, k] of the k best rows per query (faiss's `search`)."""
        faiss = faiss_module()
        if len(queries) < BLAS_THRESHOLD:
            threads = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)
            try:
                return self.parallel.search(queries, k)
            finally:
                faiss.omp_set_num_threads(threads)
        parts = [shard.search(queries, min(k, int(shard.ntotal))) for shard in self.shards]
        scores = np.concatenate([s for s, _ in parts], axis=1)
        rows = np.concatenate([np.where(r >= 0, r + off, -1) for (_, r), off in zip(parts, self.offsets)], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def exact_index(vectors: np.ndarray, shards: int | None = None):  # noqa: ANN201 - a faiss index or ShardedFlat
    """The exact inner-product index of `vectors`: one `IndexFlatIP`, or a `ShardedFlat` of one shard per thread
    (`shards`; default: faiss's thread count when the gallery has at least SHARD_MIN_ROWS vectors)."""
    if shards is None:
        shards = faiss_module().omp_get_max_threads() if len(vectors) >= SHARD_MIN_ROWS else 1
    return _flat(vectors) if shards <= 1 else ShardedFlat(vectors, int(shards))


def build_approximate(vectors: np.ndarray, nlist: int | None = None, train_size: int | None = None, seed: int = 0,
                      block: int = 262_144):  # noqa: ANN201 - a faiss index
    """An IVF index with SQ8 codes (inner product) over `vectors`: k-means with `nlist` lists (default `default_nlist`)
    trained on `train_size` rows (default 40 x nlist, faiss's advice) drawn with `seed`, then every row added."""
    faiss = faiss_module()
    n, d = int(vectors.shape[0]), int(vectors.shape[1])
    nlist = int(nlist or default_nlist(n))
    if not 1 <= nlist <= n:
        raise ValueError(f"nlist must be in 1..{n} (the number of vectors), got {nlist}")
    index = faiss.index_factory(d, f"IVF{nlist},{APPROX_CODES}", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.seed = int(seed)
    ivf.cp.niter = KMEANS_ITERATIONS
    rows = min(n, int(train_size or 40 * nlist))
    pick = np.sort(np.random.default_rng(seed).choice(n, size=rows, replace=False))
    index.train(np.ascontiguousarray(vectors[pick], dtype=np.float32))
    for start in range(0, n, block):
        index.add(np.ascontiguousarray(vectors[start : start + block], dtype=np.float32))
    return index


def write_index(index, path: Path) -> None:  # noqa: ANN001 - a faiss index
    """Write a faiss index atomically."""
    faiss = faiss_module()
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def read_index(path: Path):  # noqa: ANN201 - a faiss index
    """Read a faiss index written by `write_index`."""
    return faiss_module().read_index(str(path))


def knn(index, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """(scores, rows) [Q, k'] of the k' = min(k, N) best rows per query, best first (inner product)."""
    k = min(int(k), int(index.ntotal))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if k <= 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    ivf = _ivf(index)
    if ivf is not None:
        if nprobe is not None:
            ivf.nprobe = max(1, min(int(nprobe), int(ivf.nlist)))
        # a few queries: split each query's lists over the threads (faiss parallelises over queries by default)
        ivf.parallel_mode = 1 if len(queries) < 2 * faiss_module().omp_get_max_threads() else 0
    scores, rows = index.search(queries, k)
    return scores, rows


def _ivf(index):  # noqa: ANN001, ANN202 - a faiss index or None
    """The IVF part of an index (None for a flat index)."""
    faiss = faiss_module()
    if isinstance(index, ShardedFlat):
        return None
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def refine(vectors: np.ndarray, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of each query with its candidate `rows` (-1 = none) read from `vectors`, best `k` first."""
    k = min(k, rows.shape[1])
    out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    out_rows = np.full((len(queries), k), -1, dtype=np.int64)
    for i, q in enumerate(np.asarray(queries, dtype=np.float32)):
        found = np.unique(rows[i][rows[i] >= 0])
        if not len(found):
            continue
        scores = np.asarray(vectors[found], dtype=np.float32) @ q
        order = np.argsort(-scores, kind="stable")[:k]
        out_scores[i, : len(order)], out_rows[i, : len(order)] = scores[order], found[order]
    return out_scores, out_rows


def approximate_knn(index, vectors: np.ndarray, queries: np.ndarray, k: int,  # noqa: ANN001 - a faiss index
                    nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The approximate search: the IVF index finds `REFINE` x k rows per query, their exact inner products with the
    float32 `vectors` pick the best k (scores exact; what can be missed is a row outside the probed lists)."""
    _, found = knn(index, queries, REFINE * k, nprobe)
    return refine(vectors, queries, found, k)

