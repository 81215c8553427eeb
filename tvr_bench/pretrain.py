"""`tvr-bench pretrain`: the pretrained synthetic backbone, CLIP's image-text pretraining in miniature.

Published methods fine-tune a CLIP that already knows objects from single images but nothing of motion,
order or which part of a video a caption describes. This stage gives the synthetic benchmark the same
starting point: the `tiny` CLIP is trained contrastively on **single frames** of the synthetic *training*
videos, each with a frame-level caption that says only what one frame shows (the object's colour and shape,
the background; never a motion, an order or a second object). The result is saved with
`CLIPModel.save_pretrained`, so the synthetic recipes load it through the CLIP wrapper's local-directory path
like any other weights (`recipes/data/synthetic.yaml`). Deterministic for a given machine and settings, and
cached: a finished directory whose record matches the settings and the training shards is kept.
See data_cards/synthetic.md ("Pretrained backbone").
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvr_bench.backbones.clip import load_clip
from tvr_bench.data import synth
from tvr_bench.data.shards import ShardError, iter_shard, parse_sample, read_index, write_json_atomic
from tvr_bench.data.transforms import decode_clip_into, normalize_frames
from tvr_bench.functional.losses import MAX_LOGIT_SCALE
from tvr_bench.functional.pretrain import multi_positive_infonce
from tvr_bench.optim import schedule_lambda

#: The record written beside the weights: settings, data fingerprint, cost and loss curve.
RECORD_FILE = "pretrain.json"
#: Bump when the stage's output for the same settings and data changes (captions, loss, loop).
STAGE_VERSION = 1
#: Attribute order of a frame label and of a caption's constraint (None in a constraint: any value).
ATTRIBUTES = ("colour", "shape", "background")
#: Caption templates and how often each is drawn: (name, attributes it states, weight).
TEMPLATES: tuple[tuple[str, tuple[str, ...], float], ...] = (
    ("object_background", ("colour", "shape", "background"), 0.4),
    ("object", ("colour", "shape"), 0.3),
    ("shape_background", ("shape", "background"), 0.15),
    ("colour_background", ("colour", "background"), 0.15),
)

FrameLabel = tuple[str, str, str]
Constraint = tuple[str | None, str | None, str | None]


@dataclass(frozen=True)
class PretrainConfig:
    """Every setting of the stage (recorded in `pretrain.json`; a change rebuilds the weights)."""

    preset: str = "tiny"
    steps: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.2
    warmup_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    max_words: int = 16
    seed: int = 0
    image_size: int = 64


# ---------------------------------------------------------------------------------------------- labels
def frame_labels(meta: dict[str, Any]) -> list[FrameLabel]:
    """(colour, shape, background) shown by every stored frame of a synthetic shard sample.

    A stored frame's native index (`frame_indices`) falls in one event's frames; each frame shows that
    event's object alone on the video's background (tvr_bench/data/synth.py `render`)."""
    extra = meta.get("extra") or {}
    events, background = extra.get("events"), extra.get("background")
    indices = meta.get("frame_indices")
    if not events or background is None or not indices:
        raise ValueError(f"sample {meta.get('key', '?')!r} has no synthetic events/background/frame_indices: "
                         "not a synthetic shard (tvr-bench pretrain reads data/synthetic-<size>)")
    labels = []
    for index in indices:
        event = next((e for e in events if e["start_frame"] <= index < e["start_frame"] + e["num_frames"]), None)
        if event is None:
            raise ValueError(f"sample {meta.get('key', '?')!r}: stored frame {index} lies outside every event")
        labels.append((event["colour"], event["shape"], background))
    return labels


def frame_caption(label: FrameLabel, template: str, rng: random.Random) -> tuple[str, Constraint]:
    """A caption of one frame in the synthetic vocabulary and the constraint it states (None: not said)."""
    colour, shape, background = label
    bg = rng.choice(synth.BACKGROUNDS[background])
    if template == "object_background":
        return f"{synth._object(colour, shape)} {bg}", (colour, shape, background)
    if template == "object":
        return synth._object(colour, shape), (colour, shape, None)
    if template == "shape_background":
        return f"a {shape} {bg}", (None, shape, background)
    if template == "colour_background":
        return f"{synth._object(colour, 'shape')} {bg}", (colour, None, background)
    raise ValueError(f"unknown caption template {template!r}")


def positives_matrix(labels: list[FrameLabel], constraints: list[Constraint]) -> torch.Tensor:
    """bool `[images, texts]`: whether text j's constraint holds for image i."""
    out = torch.ones(len(labels), len(constraints), dtype=torch.bool)
    for k in range(len(ATTRIBUTES)):
        values = sorted({lab[k] for lab in labels} | {c[k] for c in constraints if c[k] is not None})
        code = {v: i for i, v in enumerate(values)}
        have = torch.tensor([code[lab[k]] for lab in labels])
        want = torch.tensor([code[c[k]] if c[k] is not None else -1 for c in constraints])
        out &= (want[None, :] == -1) | (have[:, None] == want[None, :])
    return out


# ---------------------------------------------------------------------------------------------- frames
def load_frames(root: str | Path, split: str = "train", image_size: int = 64) -> tuple[torch.Tensor, list[FrameLabel], dict[str, Any]]:
    """Every stored frame of a prepared synthetic split as uint8 `[N, 3, S, S]` with its label, and the split's
    fingerprint (the shards' sha256, from index.json)."""
    split_dir = Path(root) / split
    index = read_index(split_dir, "synthetic")
    frames: list[np.ndarray] = []
    labels: list[FrameLabel] = []
    for shard in index["shards"]:
        for sample in iter_shard(split_dir / shard["file"]):
            meta, jpegs = parse_sample(sample)
            clip = np.zeros((len(jpegs), 3, image_size, image_size), dtype=np.uint8)
            decode_clip_into(clip, jpegs, list(range(len(jpegs))), image_size)
            frames.append(clip)
            labels.extend(frame_labels(meta))
    fingerprint = {"split": split, "videos": index["num_samples"], "shards": [s["sha256"] for s in index["shards"]]}
    return torch.from_numpy(np.concatenate(frames)), labels, fingerprint


# ---------------------------------------------------------------------------------------------- training
def _batches(n: int, batch_size: int, steps: int, rng: torch.Generator) -> list[torch.Tensor]:
    """`steps` batches of frame indices: successive passes over a fresh random permutation of the frames."""
    out: list[torch.Tensor] = []
    order = torch.empty(0, dtype=torch.long)
    while len(out) < steps:
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=rng)])
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases, norms, embeddings' position tables and the temperature (as CLIP)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.ndim < 2 or "norm" in name or name.endswith("logit_scale") or "position_embedding" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def pretrain_clip(frames: torch.Tensor, labels: list[FrameLabel], config: PretrainConfig,
                  log_every: int = 25, progress: bool = True) -> tuple[Any, Any, list[dict[str, float]]]:
    """Train the `config.preset` CLIP on the frames (uint8 `[N, 3, S, S]`) with frame captions drawn per step.

    Returns (model, tokenizer, loss curve). Deterministic: the weights, the batches and the captions all
    follow `config.seed`."""
    torch.manual_seed(config.seed)
    model, tokenizer = load_clip(config.preset)
    model.train()
    rng = torch.Generator().manual_seed(config.seed)
    caption_rng = random.Random(config.seed)
    names = [t[0] for t in TEMPLATES]
    weights = [t[2] for t in TEMPLATES]
    # fused: one kernel over all tensors (the 6.3 M-entry token table dominated the step: 50 ms -> 6 ms on one core)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas,
                                  eps=config.eps, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_lambda("cosine", config.steps, config.warmup_ratio))
    curve: list[dict[str, float]] = []
    start = time.perf_counter()
    for step, idx in enumerate(_batches(len(labels), config.batch_size, config.steps, rng)):
        batch_labels = [labels[i] for i in idx.tolist()]
        drawn = [frame_caption(lab, caption_rng.choices(names, weights)[0], caption_rng) for lab in batch_labels]
        texts = list(dict.fromkeys(text for text, _ in drawn))  # one column per distinct caption
        constraint = dict(drawn)
        tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=config.max_words, return_tensors="pt")
        pixels = normalize_frames(frames[idx])
        image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text = model.text_projection(model.text_model(input_ids=tokens["input_ids"],
                                                      attention_mask=tokens["attention_mask"]).pooler_output)
        positives = positives_matrix(batch_labels, [constraint[t] for t in texts])
        loss = multi_positive_infonce(image, text, positives, model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=MAX_LOGIT_SCALE)
        if step % log_every == 0 or step == config.steps - 1:
            curve.append({"step": step, "loss": float(loss.detach()), "seconds": time.perf_counter() - start})
            if progress:
                print(f"pretrain step {step + 1}/{config.steps}: loss {float(loss.detach()):.3f} "
                      f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    model.eval()
    return model, tokenizer, curve


# ---------------------------------------------------------------------------------------------- the stage
def _record_key(config: PretrainConfig, fingerprint: dict[str, Any]) -> dict[str, Any]:
    return {"stage_version": STAGE_VERSION, "config": asdict(config), "data": fingerprint}


def is_current(out: str | Path, root: str | Path, config: PretrainConfig) -> bool:
    """Whether `out` holds finished weights made with these settings from these training shards."""
    record_path = Path(out) / RECORD_FILE
    if not record_path.is_file() or not (Path(out) / "config.json").is_file():
        return False
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        index = read_index(Path(root) / "train", "synthetic")
    except (OSError, ValueError):
        return False
    fingerprint = {"split": "train", "videos": index["num_samples"], "shards": [s["sha256"] for s in index["shards"]]}
    return all(record.get(k) == v for k, v in json.loads(json.dumps(_record_key(config, fingerprint))).items())


def build_pretrained(root: str | Path, out: str | Path, config: PretrainConfig = PretrainConfig(),
                     size: str | None = None, synth_seed: int = 0, force: bool = False,
                     progress: bool = True) -> Path:
    """Build (or keep, when current) the pretrained backbone of a synthetic set in `out`.

    With `size`, the synthetic set at `root` is generated and prepared first when missing. The weights are
    written to a temporary folder and renamed, so an interrupted run leaves no half-written backbone."""
    root, out = Path(root), Path(out)
    if size is not None:
        from tvr_bench.data.benchmarks.synthetic import build_synthetic

        build_synthetic(root, size=size, synth_seed=synth_seed, progress=progress)
    if not force and is_current(out, root, config):
        if progress:
            print(f"{out}: pretrained backbone is current (delete it or pass --force to rebuild)", file=sys.stderr)
        return out
    start = time.perf_counter()
    frames, labels, fingerprint = load_frames(root, "train", config.image_size)
    load_seconds = time.perf_counter() - start
    model, tokenizer, curve = pretrain_clip(frames, labels, config, progress=progress)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    record = {
        **_record_key(config, fingerprint),
        "frames": int(frames.shape[0]),
        "distinct_frame_labels": len(set(labels)),
        "templates": [{"name": n, "states": list(a), "weight": w} for n, a, w in TEMPLATES],
        "loss_curve": curve,
        "seconds": {"load_frames": load_seconds, "total": time.perf_counter() - start},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    write_json_atomic(tmp / RECORD_FILE, record)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    if progress:
        print(f"wrote {out} ({frames.shape[0]:,} frames, {config.steps} steps, "
              f"{record['seconds']['total']:.0f} s; final loss {curve[-1]['loss']:.3f})", file=sys.stderr)
    return out


def pretrain_main(argv: list[str] | None = None) -> int:
    """Pretrain the tiny CLIP on single frames of the synthetic training videos (the synthetic backbone)."""
    defaults = PretrainConfig()
    parser = argparse.ArgumentParser(prog="tvr-bench pretrain", description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="default", choices=sorted(synth.SIZES), help="synthetic size (default: default)")
    parser.add_argument("--synth-seed", type=int, default=0, help="seed of the generated synthetic set (default 0)")
    parser.add_argument("--root", default=None, help="a prepared synthetic set (default: data/synthetic-<size>, generated and "
                        "prepared when missing)")
    parser.add_argument("--out", default=None, help="output folder (default: <root>/tiny-pretrained)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help=f"optimiser steps (default {defaults.steps})")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"frames per step (default {defaults.batch_size})")
    parser.add_argument("--lr", type=float, default=defaults.lr, help=f"peak learning rate (default {defaults.lr})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the weights, batches and captions")
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder is current")
    parser.add_argument("--no-progress", action="store_true", help="print nothing but errors")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 2 or args.lr <= 0:
        print("error: --steps must be >= 1, --batch-size >= 2 and --lr > 0", file=sys.stderr)
        return 2
    from tvr_bench.data.benchmarks.synthetic import default_root

    root = args.root or default_root(args.size, args.synth_seed)
    config = PretrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    out = args.out or f"{root}/{config.preset}-pretrained"
    try:
        build_pretrained(root, out, config, size=None if args.root else args.size, synth_seed=args.synth_seed,
                         force=args.force, progress=not args.no_progress)
    except (FileNotFoundError, ValueError, ShardError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(pretrain_main())
