"""Search your own videos with a trained method (docs/search.md).

    from tvr_bench.search import build_index, search, open_index
    build_index("my_videos/", "runs/default/tvr-bench/<id>", "my_index")   # = tvr-bench index
    for hit in search("a dog catches a ball", "my_index", k=5).hits:        # = tvr-bench search
        print(hit.rank, hit.key, hit.score)

The names are imported lazily, so `tvr_bench.search.twostage` (used by the evaluator) does not load faiss.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SearchIndex", "SearchResult", "Hit", "build_index", "open_index", "search"]

_WHERE = {
    "SearchIndex": "tvr_bench.search.engine",
    "SearchResult": "tvr_bench.search.engine",
    "Hit": "tvr_bench.search.engine",
    "open_index": "tvr_bench.search.engine",
    "search": "tvr_bench.search.engine",
    "build_index": "tvr_bench.search.indexer",
}


def __getattr__(name: str) -> Any:
    """Import the public names on first use."""
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'tvr_bench.search' has no attribute {name!r}")
