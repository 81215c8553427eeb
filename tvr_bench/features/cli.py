"""``tvr-bench features <dataset> --backbone NAME``: extract the cached frozen CLIP features of prepared shards."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tvr_bench.data.frames import POLICIES
from tvr_bench.data.shards import MissingShardsError, ShardError


def features_parser() -> argparse.ArgumentParser:
    """Arguments of ``tvr-bench features``."""
    parser = argparse.ArgumentParser(
        prog="tvr-bench features",
        description="Encode every frame and caption of a prepared dataset once with a frozen CLIP and store the "
        "embeddings as WebDataset shards of .npy arrays; train heads on them with FeaturesDataModule "
        "(docs/features.md). One store per (dataset, backbone, frames, sampling, max words).",
    )
    parser.add_argument("dataset", help="dataset name (synthetic, msrvtt, ...): the name in the shards' index.json")
    parser.add_argument("--backbone", default="tiny", help="CLIP preset, local directory or hub name (as model.backbone)")
    parser.add_argument("--root", default=None, help="prepared frame shards (default: the dataset's default root)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default data/features/<dataset>-<backbone>-f<F>-<sampling>-w<words>)")
    parser.add_argument("--frames", type=int, default=12, help="frames per video, as data.num_frames (default 12)")
    parser.add_argument("--sampling", choices=POLICIES, default=None, help="frame sampling of the shards (picks the default root; checked)")
    parser.add_argument("--max-words", type=int, default=32, help="tokens per caption, as model.max_words (default 32; X-Pool/T-MASS: 77)")
    parser.add_argument("--caption-mode", choices=("each", "paragraph"), default="each", help="as data.caption_mode")
    parser.add_argument("--splits", default=None, help="comma-separated splits (default: every prepared split)")
    parser.add_argument("--no-tokens", action="store_true", help="store only sentence embeddings (no per-token states: DRL needs them)")
    parser.add_argument("--seed", type=int, default=0, help="seed before building the backbone, as seed_everything (random presets)")
    parser.add_argument("--synthetic-size", choices=("tiny", "default"), default="default", help="synthetic set to build when its root is missing")
    parser.add_argument("--batch-size", type=int, default=32, help="videos per encoding batch")
    parser.add_argument("--workers", type=int, default=0, help="frame-decoding workers")
    parser.add_argument("--shard-size", type=int, default=500, help="videos per feature shard")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing feature store at --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress line")
    return parser


def default_frame_root(dataset: str, sampling: str | None, synthetic_size: str, num_frames: int | None = None) -> str:
    """The frame shard root a recipe reads by default for this dataset and sampling."""
    if dataset == "synthetic":
        from tvr_bench.data.benchmarks.synthetic import default_root

        return default_root(synthetic_size)
    from tvr_bench.data.benchmarks.catalog import datamodules

    cls = datamodules().get(dataset)
    if cls is None:
        raise ValueError(f"unknown dataset {dataset!r} and no --root given (known: synthetic, {', '.join(sorted(datamodules()))})")
    return cls.default_root(sampling, num_frames)


def features_main(argv: list[str]) -> int:
    """Encode a prepared dataset once with a frozen CLIP into cached feature shards (docs/features.md).

    Exit codes: 3 for missing or damaged frame shards, 2 for a bad setting, CLIP weights that cannot be had or an
    existing output."""
    args = features_parser().parse_args(argv)
    from tvr_bench.backbones.clip import CLIPBackbone, WeightsUnavailableError, weights_problem
    from tvr_bench.data.datamodule import RetrievalDataModule
    from tvr_bench.features.datamodule import default_features_dir
    from tvr_bench.features.extract import extract_features, split_names

    missing = weights_problem(args.backbone)  # before any data work (a synthetic set may be built below)
    if missing is not None:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    try:
        root = args.root or default_frame_root(args.dataset, args.sampling, args.synthetic_size, args.frames)
        if args.dataset == "synthetic" and not Path(root).is_dir() and args.root is None:
            from tvr_bench.data.benchmarks.synthetic import build_synthetic

            build_synthetic(root, size=args.synthetic_size, progress=not args.no_progress)
        splits = args.splits.split(",") if args.splits else split_names(Path(root))
        if not splits:
            raise MissingShardsError(f"no prepared split under {root}: run `tvr-bench prepare {args.dataset}` (data_cards/{args.dataset}.md)")
        torch.manual_seed(args.seed)
        backbone = CLIPBackbone(args.backbone, freeze="all")
        datamodule = RetrievalDataModule(
            root=root,
            dataset=args.dataset,
            num_frames=args.frames,
            image_size=backbone.image_size,
            eval_batch_size=args.batch_size,
            num_workers=args.workers,
            caption_mode=args.caption_mode,
        )
        sampling = datamodule.split_shards(splits[0]).index.get("sampling")
        if args.sampling is not None and sampling != args.sampling:
            raise ValueError(f"{root} was prepared with sampling {sampling!r}, --sampling asks for {args.sampling!r}")
        out = args.out or default_features_dir(args.dataset, args.backbone, args.frames, sampling, args.max_words)
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        store = extract_features(
            datamodule, backbone, out, splits, max_words=args.max_words, tokens=not args.no_tokens, device=device,
            shard_size=args.shard_size, seed=args.seed, overwrite=args.overwrite, progress=not args.no_progress,
        )  # fmt: skip
    except WeightsUnavailableError as exn:  # an OSError: before the FileNotFoundError branch
        print(f"error: {exn}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ShardError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 3
    except (ValueError, FileExistsError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{s}: {v['num_samples']} videos / {v['num_captions']} captions" for s, v in store["splits"].items())
    print(f"wrote {out} ({sizes})")
    print(f"train a head on them: --model.init_args.freeze all --data tvr_bench.features.FeaturesDataModule --data.features_dir {out}")
    return 0
