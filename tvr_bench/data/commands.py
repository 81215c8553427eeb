"""Command functions behind ``tvr-bench synth``, ``prepare`` and ``verify`` (argparse; return exit codes).

Data knows no method: the lines ``prepare`` prints about the shards other methods read come from a hook that
the command line's face passes in (:mod:`tvr_bench.prepare_cli`, which reads the methods' data protocols).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from tvr_bench.data import synth
from tvr_bench.data.frames import POLICIES
from tvr_bench.data.prepare import PrepareConfig, prepare
from tvr_bench.data.readers import READERS, get_reader
from tvr_bench.data.shards import INDEX_FILE, MANIFEST_FILE, MissingShardsError, ShardError, verify_split, write_json_atomic


def _default_workers() -> int:
    """Worker processes when none are given: the machine's cores, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def synth_parser() -> argparse.ArgumentParser:
    """Arguments of ``tvr-bench synth``."""
    parser = argparse.ArgumentParser(
        prog="tvr-bench synth",
        description="Generate the procedural synthetic benchmark: mp4 videos plus annotations.json "
        "(see data_cards/synthetic.md). Convert it with `tvr-bench prepare synthetic`.",
    )
    parser.add_argument("--size", choices=sorted(synth.SIZES), default="tiny", help="tiny (tests) or default (benchmark)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default data/synthetic-<size>/raw)")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (same seed, same videos and captions)")
    parser.add_argument("--workers", type=int, default=_default_workers(), help="encoding processes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def synth_main(argv: list[str]) -> int:
    """Generate the synthetic benchmark's videos and annotations.json (``tvr-bench synth --size tiny --out DIR``)."""
    args = synth_parser().parse_args(argv)
    out = args.out or Path(f"data/synthetic-{args.size}/raw")
    path = synth.generate(out, size=args.size, seed=args.seed, workers=args.workers, progress=not args.no_progress)
    print(f"wrote {path} and {out / 'videos'}")
    print(
        f"next: tvr-bench prepare synthetic --videos {out / 'videos'} --annotations {out} "
        f"--out data/synthetic-{args.size}"
    )
    return 0


def prepare_parser() -> argparse.ArgumentParser:
    """Arguments of ``tvr-bench prepare``."""
    parser = argparse.ArgumentParser(
        prog="tvr-bench prepare",
        description="Convert a raw benchmark release (videos + annotations) into WebDataset shards of "
        "pre-sampled JPEG frames (data_cards/FORMAT.md). Unset options take the dataset's defaults.",
    )
    parser.add_argument("dataset", choices=sorted(READERS), help="benchmark whose annotation format to read")
    parser.add_argument("--videos", type=Path, required=True, help="directory holding the video files")
    parser.add_argument("--annotations", type=Path, required=True, help="annotation directory (or file)")
    parser.add_argument("--out", type=Path, required=True, help="output root: <out>/<split>/shard-*.tar")
    parser.add_argument("--frames", type=int, default=None, help="frames stored per video (e.g. 12 or 64)")
    parser.add_argument("--sampling", choices=POLICIES, default=None, help="frame sampling policy")
    parser.add_argument("--short-side", type=int, default=None, help="resize frames so the short side is this")
    parser.add_argument("--quality", type=int, default=None, help="JPEG quality")
    parser.add_argument("--shard-size", type=int, default=None, help="videos per shard")
    parser.add_argument("--workers", type=int, default=_default_workers(), help="decoding processes")
    parser.add_argument(
        "--source",
        choices=("files", "video2dataset"),
        default="files",
        help="what --videos holds: video files (default) or video2dataset output shards "
        "(*.tar, mp4+txt+json per sample; videos are decoded inside the tars, never copied out)",
    )
    parser.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="exit 0 even when the test split has fewer videos than the official protocol "
        "(results are then marked with their test size, e.g. 987/1,000 videos)",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="keep finished shards of an interrupted run")
    group.add_argument("--overwrite", action="store_true", help="delete existing shards and rebuild")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def protocol_table(dataset: str, splits: dict[str, dict[str, int]]) -> dict[str, dict[str, object]]:
    """Per split: prepared videos, the official protocol's videos (None when it fixes none), complete."""
    from tvr_bench.data.benchmarks.catalog import datamodules

    cls = datamodules().get(dataset)
    names = list(splits)
    if cls is not None:
        names += [s for s in cls.PROTOCOL_SIZES if s not in splits]
    table: dict[str, dict[str, object]] = {}
    for split in names:
        prepared = int(splits.get(split, {}).get("num_samples", 0))
        size = cls.protocol_size(split) if cls is not None else None
        table[split] = {"prepared": prepared, "protocol": size, "complete": size is None or prepared >= size}
    return table


def report_split_of(dataset: str) -> str:
    """The split a benchmark reports its results on (its DataModule's TEST_SPLIT; ``test`` otherwise)."""
    from tvr_bench.data.benchmarks.catalog import datamodules

    cls = datamodules().get(dataset)
    return cls.TEST_SPLIT if cls is not None else "test"


#: ``(arguments, sampling, frames) -> lines``: the prepare commands for the shards other readers need.
OtherCommands = Callable[[argparse.Namespace, str, int], list[str]]


def prepare_main(argv: list[str], other_commands: OtherCommands | None = None) -> int:
    """Convert a raw release into frame shards, checked against the protocol's split sizes (``tvr-bench prepare <dataset> ...``).

    ``other_commands`` names the prepare commands for the shards that other readers (the methods) need; each
    line is printed after ``for other methods:``. Exit codes: 0 done; 1 bad input or output directory; 2 wrong
    arguments; 3 the test split has fewer videos than the official protocol (unless ``--allow-incomplete``).
    """
    args = prepare_parser().parse_args(argv)
    reader = get_reader(args.dataset)
    config = PrepareConfig(
        dataset=args.dataset,
        num_frames=args.frames or reader.num_frames,
        sampling=args.sampling or reader.sampling,
        short_side=args.short_side or reader.short_side,
        jpeg_quality=args.quality or reader.jpeg_quality,
        shard_size=args.shard_size or reader.shard_size,
    )
    if not args.videos.is_dir():
        print(f"error: --videos {args.videos} is not a directory (see data_cards/{args.dataset}.md)", file=sys.stderr)
        return 2
    registered = False
    try:
        if args.source == "video2dataset":
            from tvr_bench.data.benchmarks.common import VideoIndex
            from tvr_bench.data.benchmarks.video2dataset import index_videos, write_index

            v2d = index_videos(args.videos, progress=not args.no_progress)
            write_index(v2d, args.out)
            VideoIndex.use_members(args.videos, v2d.members)
            registered = True
            print(f"video2dataset: {len(v2d.members)} videos found in the tars, {len(v2d.skipped)} samples skipped")
        report = prepare(
            reader.read(args.videos, args.annotations),
            args.out,
            config,
            source_root=args.videos,
            workers=args.workers,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 1
    finally:
        if registered:
            from tvr_bench.data.benchmarks.common import VideoIndex

            VideoIndex.use_members(args.videos, None)
    table = protocol_table(args.dataset, report.splits)
    _record_protocol(Path(args.out), table, args.allow_incomplete)
    if reader.finish is not None:
        reader.finish(Path(args.out), args.annotations, report.splits)
    for split, row in table.items():
        counts = report.splits.get(split, {"num_captions": 0, "num_shards": 0, "num_failed": 0})
        size = row["protocol"]
        if size is None:
            versus = "protocol: no size"
        else:
            state = "complete" if row["complete"] else f"INCOMPLETE ({row['prepared']:,}/{size:,})"
            versus = f"protocol: {size:,} videos, {state}"
        print(
            f"{split}: {row['prepared']} videos, {counts['num_captions']} captions, {counts['num_shards']} shards, "
            f"{counts['num_failed']} failed; {versus}"
        )
    if report.failures:
        print(f"{len(report.failures)} videos missing or undecodable: see {Path(args.out) / 'manifest.json'}")
    print(f"done in {report.seconds:.1f} s ({report.converted} converted, {report.reused} kept from earlier runs)")
    for line in other_commands(args, config.sampling, config.num_frames) if other_commands is not None else []:
        print(f"for other methods: {line}")
    test = report_split_of(args.dataset)
    row = table.get(test)
    if row is not None and not row["complete"] and not args.allow_incomplete:
        listed = report.splits.get(test, {})
        failed = int(listed.get("num_failed", 0))
        print(
            f"error: the {test} split is incomplete: {row['prepared']:,} of the protocol's {row['protocol']:,} videos "
            f"prepared ({row['prepared'] + failed:,} listed in the annotations, {failed:,} of them missing or "
            f"undecodable: see {Path(args.out) / 'manifest.json'}). A smaller gallery makes retrieval easier "
            f"(R@1 rises), so results on it cannot be compared with published ones. Add the missing videos and run "
            f"again with --overwrite, or accept it with --resume --allow-incomplete (results then record "
            f"{row['prepared']:,}/{row['protocol']:,} videos).",
            file=sys.stderr,
        )
        return 3
    return 0


def _record_protocol(out: Path, table: dict[str, dict[str, object]], allowed: bool) -> None:
    """Add the prepared-vs-protocol sizes to ``<out>/manifest.json`` (``protocol`` block)."""
    path = out / MANIFEST_FILE
    if not path.is_file():
        return
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["protocol"] = {"splits": table, "allow_incomplete": allowed}
    write_json_atomic(path, manifest)


def verify_parser() -> argparse.ArgumentParser:
    """Arguments of ``tvr-bench verify``."""
    parser = argparse.ArgumentParser(
        prog="tvr-bench verify",
        description="Re-hash and re-read every shard of a prepared dataset against its index.json "
        "(sha256, sample counts, every sample's members). Exit code 0 when all is well, 3 otherwise.",
    )
    parser.add_argument("root", type=Path, help="prepared dataset root (holds <split>/index.json)")
    parser.add_argument("--splits", nargs="+", default=None, help="splits to check (default: every prepared split)")
    return parser


def verify_main(argv: list[str]) -> int:
    """Re-hash and re-read prepared shards; report corrupt, truncated or missing ones (``tvr-bench verify ROOT``)."""
    args = verify_parser().parse_args(argv)
    root: Path = args.root
    splits = args.splits or sorted(d.name for d in root.glob("*") if (d / INDEX_FILE).is_file())
    if not splits:
        print(f"error: no prepared split (<split>/{INDEX_FILE}) under {root}: run `tvr-bench prepare` first", file=sys.stderr)
        return 3
    bad = 0
    for split in splits:
        try:
            problems = verify_split(root / split)
        except (MissingShardsError, ShardError) as exn:
            problems = [str(exn)]
        bad += len(problems)
        print(f"{split}: " + ("ok" if not problems else f"{len(problems)} problem(s)"))
        for problem in problems:
            print(f"  {problem}")
    if bad:
        print(f"error: {bad} problem(s); re-run `tvr-bench prepare ... --overwrite` for this dataset", file=sys.stderr)
        return 3
    return 0
