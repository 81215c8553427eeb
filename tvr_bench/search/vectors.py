"""The vector stage of search, on faiss: exact inner-product search (`IndexFlatIP`, the default) and an optional
approximate inverted-file index (`IndexIVFFlat`, inner product) built from the same vectors."""

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
    """Inverted lists of the approximate index: about sqrt(N), a power of two, between 1 and 65,536."""
    if n < 2:
        return 1
    return int(min(65_536, max(1, 2 ** round(math.log2(math.sqrt(n))))))


def exact_index(vectors: np.ndarray, block: int = 262_144):  # noqa: ANN201 - a faiss index
    """An `IndexFlatIP` holding `vectors` (float32 [N, D], e.g. memory-mapped), filled block by block."""
    faiss = faiss_module()
    index = faiss.IndexFlatIP(int(vectors.shape[1]))
    for start in range(0, vectors.shape[0], block):
        index.add(np.ascontiguousarray(vectors[start : start + block], dtype=np.float32))
    return index


def build_approximate(vectors: np.ndarray, nlist: int | None = None, train_size: int | None = None, seed: int = 0,
                      block: int = 262_144):  # noqa: ANN201 - a faiss index
    """An `IndexIVFFlat` (inner product) over `vectors`: k-means with `nlist` lists (default `default_nlist`) trained
    on `train_size` rows (default 40 x nlist, faiss's advice) drawn with `seed`, then every row added."""
    faiss = faiss_module()
    n, d = int(vectors.shape[0]), int(vectors.shape[1])
    nlist = int(nlist or default_nlist(n))
    if not 1 <= nlist <= n:
        raise ValueError(f"nlist must be in 1..{n} (the number of vectors), got {nlist}")
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = int(seed)
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
    if nprobe is not None and hasattr(index, "nprobe"):
        index.nprobe = int(nprobe)
    scores, rows = index.search(queries, k)
    return scores, rows
