"""Command functions behind ``tvr-bench synth``, ``prepare`` and ``verify`` (argparse; return exit codes)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tvr_bench.data import synth
from tvr_bench.data.frames import POLICIES
from tvr_bench.data.prepare import PrepareConfig, prepare
from tvr_bench.data.readers import READERS, get_reader
from tvr_bench.data.shards import INDEX_FILE, MissingShardsError, ShardError, verify_split


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
    """``tvr-bench synth --size tiny --out DIR --seed 0``: write videos/ and annotations.json."""
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
        "(*.tar, mp4+txt+json per sample; unpacked to <out>/video2dataset_videos first)",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="keep finished shards of an interrupted run")
    group.add_argument("--overwrite", action="store_true", help="delete existing shards and rebuild")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def prepare_main(argv: list[str]) -> int:
    """``tvr-bench prepare <dataset> --videos DIR --annotations DIR --out DIR [...]``."""
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
    videos = args.videos
    try:
        if args.source == "video2dataset":
            from tvr_bench.data.benchmarks.video2dataset import extract_videos

            videos = extract_videos(args.videos, args.out / "video2dataset_videos", progress=not args.no_progress)
        report = prepare(
            reader.read(videos, args.annotations),
            args.out,
            config,
            source_root=videos,
            workers=args.workers,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 1
    for split, counts in report.splits.items():
        print(
            f"{split}: {counts['num_samples']} videos, {counts['num_captions']} captions, "
            f"{counts['num_shards']} shards, {counts['num_failed']} failed"
        )
    if report.failures:
        print(f"{len(report.failures)} videos missing or undecodable: see {Path(args.out) / 'manifest.json'}")
    print(f"done in {report.seconds:.1f} s ({report.converted} converted, {report.reused} kept from earlier runs)")
    return 0


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
    """``tvr-bench verify data/msrvtt [--splits test]``: report corrupt, truncated or missing shards."""
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
