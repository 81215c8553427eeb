"""`tvr-bench index` and `tvr-bench search`: search your own videos with a trained method (docs/search.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_CONFIG = 2
EXIT_DATA = 3


def index_parser() -> argparse.ArgumentParser:
    """Arguments of `tvr-bench index`."""
    p = argparse.ArgumentParser(
        prog="tvr-bench index",
        description="Encode every video of a folder (video files of any container PyAV opens, or prepared shards) "
        "with a trained method and write a search index (docs/search.md). Videos that cannot be decoded are listed "
        "in INDEX/failures.json; an interrupted build continues with --resume.",
    )
    p.add_argument("source", type=Path, help="folder of video files (searched recursively) or of prepared shards")
    p.add_argument("--ckpt", required=True, help="a run directory (its best checkpoint) or a .ckpt file")
    p.add_argument("--out", required=True, type=Path, help="the index folder to write")
    p.add_argument("--split", action="append", default=None, help="prepared shards: index only this split (repeatable)")
    p.add_argument("--sampling", default=None, help="frame sampling (default: the one the checkpoint was evaluated with)")
    p.add_argument("--frames", type=int, default=None, help="frames per video (default: the checkpoint's)")
    p.add_argument("--jpeg-quality", default="auto", help="JPEG round trip of the sampled frames as `prepare` stores them "
                   "(default auto: the quality and short side of the checkpoint's benchmark, else 95)")
    p.add_argument("--no-jpeg", action="store_true", help="feed the decoded frames without the JPEG round trip")
    p.add_argument("--batch-size", type=int, default=16, help="videos per encoding batch")
    p.add_argument("--chunk-size", type=int, default=256, help="video files per resumable chunk")
    p.add_argument("--workers", type=int, default=None, help="video-decoding processes (0: decode in this process; "
                   "default: one per core, at most 2)")
    p.add_argument("--approximate", action="store_true", help="also build an approximate IVF index (search --approximate)")
    p.add_argument("--nlist", type=int, default=None, help="inverted lists of the approximate index (default ~sqrt(N))")
    p.add_argument("--resume", action="store_true", help="continue an interrupted build of --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index (or interrupted build) at --out")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    return p


def index_main(argv: list[str]) -> int:
    """Index a folder of your own videos (files or prepared shards) with a trained method for `tvr-bench search`."""
    args = index_parser().parse_args(argv)
    from tvr_bench.data.shards import ShardError
    from tvr_bench.search.indexer import DEFAULT_WORKERS, build_index
    from tvr_bench.search.model import SearchSetupError

    quality = args.jpeg_quality
    if args.no_jpeg:
        quality = None
    elif quality != "auto":
        if not str(quality).isdigit():
            print(f"error: --jpeg-quality must be 'auto' or a number from 1 to 100, got {quality!r}", file=sys.stderr)
            return EXIT_CONFIG
        quality = int(quality)
    workers = DEFAULT_WORKERS if args.workers is None else args.workers
    try:
        index = build_index(
            args.source, args.ckpt, args.out, sampling=args.sampling, num_frames=args.frames, jpeg_quality=quality,
            splits=args.split, batch_size=args.batch_size, chunk_size=args.chunk_size, workers=workers,
            approximate=args.approximate, nlist=args.nlist, resume=args.resume, overwrite=args.overwrite,
            device=args.device, progress=not args.no_progress,
        )  # fmt: skip
    except (FileNotFoundError, ShardError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return EXIT_DATA
    except (SearchSetupError, FileExistsError, ValueError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return EXIT_CONFIG
    failures = json.loads((args.out / "failures.json").read_text(encoding="utf-8"))
    for failure in failures[:20]:
        print(f"skipped {failure['file']}: {failure['reason']}", file=sys.stderr)
    if len(failures) > 20:
        print(f"... and {len(failures) - 20} more (all in {args.out / 'failures.json'})", file=sys.stderr)
    seconds = index["build_seconds"]
    print(f"indexed {index['num_videos']:,} videos with {index['method']} ({index['scoring']}) into {args.out}; "
          f"{index['num_failures']} could not be decoded (listed in {args.out / 'failures.json'}); {seconds:.1f} s")
    return 0


def search_parser() -> argparse.ArgumentParser:
    """Arguments of `tvr-bench search`."""
    p = argparse.ArgumentParser(
        prog="tvr-bench search",
        description="The top-k videos of an index for a text query, with scores and timings (docs/search.md).",
    )
    p.add_argument("query", nargs="+", help="one or more text queries")
    p.add_argument("--index", required=True, type=Path, help="an index folder made by `tvr-bench index`")
    p.add_argument("--k", type=int, default=10, help="videos to return per query (default 10)")
    p.add_argument("--rerank", type=int, default=200, help="text-conditioned methods: candidates re-ranked (default 200)")
    p.add_argument("--approximate", action="store_true", help="use the index's approximate IVF vector search")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists probed per query (default: faiss's, 1)")
    p.add_argument("--exhaustive", action="store_true", help="score every video with the method (slow; the reference)")
    p.add_argument("--ckpt", default=None, help="the checkpoint, when it moved since indexing (must be the same model)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--html", type=Path, default=None, help="also write an HTML page with frame strips")
    return p


def _print_table(results: list, index_path: Path) -> None:
    """One rich table per query."""
    from rich.console import Console
    from rich.table import Table

    console = Console() if sys.stdout.isatty() else Console(width=160)
    for result in results:
        times = ", ".join(f"{k} {v:.1f} ms" for k, v in result.timings_ms.items())
        table = Table(title=f"{result.query!r}: top {len(result.hits)} of {result.gallery:,} videos in {index_path}",
                      caption=f"{result.mode}; {times}")
        for col, justify in (("rank", "right"), ("video", "left"), ("score", "right"), ("first stage", "right"),
                             ("duration", "right")):
            table.add_column(col, justify=justify)
        for hit in result.hits:
            first = "" if hit.first_stage_score is None else f"{hit.first_stage_score:.4f}"
            dur = "" if not hit.duration else f"{hit.duration:.1f} s"
            table.add_row(str(hit.rank), hit.key, f"{hit.score:.4f}", first, dur)
        console.print(table)


def search_main(argv: list[str]) -> int:
    """Search an index made by `tvr-bench index` for text queries (table, --json, --html)."""
    args = search_parser().parse_args(argv)
    from tvr_bench.search.engine import SearchIndex
    from tvr_bench.search.model import SearchSetupError

    try:
        index = SearchIndex.open(args.index, args.ckpt)
        results = index.search_many(args.query, args.k, rerank=args.rerank, approximate=args.approximate,
                                    nprobe=args.nprobe, exhaustive=args.exhaustive)
        page = None
        if args.html is not None:
            from tvr_bench.search.page import write_page

            page = write_page(results, index.stored, args.html, title=f"tvr-bench search: {index.loaded.method}")
    except FileNotFoundError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return EXIT_DATA
    except (SearchSetupError, ValueError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return EXIT_CONFIG
    if args.json:
        payload = {"index": str(args.index), "method": index.loaded.method, "scoring": index.scoring,
                   "fingerprint": index.loaded.fingerprint, "results": [r.as_dict() for r in results]}
        print(json.dumps(payload, indent=1))
    else:
        _print_table(results, args.index)
    if page is not None:
        print(f"wrote {page}", file=sys.stderr)
    return 0
