"""Compute the cached frozen CLIP features of a prepared dataset (``tvr-bench features``, docs/features.md).

The frames come from the dataset's own evaluation loader (centre crop, no augmentation) and are
normalised exactly as training normalises them; frames and captions then go through the same
``CLIPBackbone`` calls the methods make (`encode_frames`, `encode_text`), in eval mode without gradients.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tvr_bench.backbones.clip import CLIPBackbone
from tvr_bench.data.datamodule import RetrievalDataModule
from tvr_bench.data.shards import write_json_atomic
from tvr_bench.features.store import (
    FORMAT_VERSION,
    STORE_FILE,
    STORE_KIND,
    SplitWriter,
    backbone_fingerprint,
    encode_feature_sample,
)


def model_ready_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """A loader batch with the float frames the model sees in training: uint8 frames (data_cards/FORMAT.md,
    INTERFACES point 5) go through ``tvr_bench.data.transforms.normalize_batch``; float frames are already
    normalised by the loader."""
    if batch["frames"].dtype == torch.uint8:
        from tvr_bench.data.transforms import normalize_batch  # the DataModule's own on_after_batch_transfer math

        return normalize_batch(batch)
    return batch


def text_length(backbone: CLIPBackbone, max_words: int) -> int:
    """Padded token length of `CLIPBackbone.tokenize(captions, max_words)`."""
    return min(int(max_words), int(backbone.clip.config.text_config.max_position_embeddings))


@torch.no_grad()
def encode_batch(
    backbone: CLIPBackbone, batch: dict[str, Any], max_words: int, tokens: bool, device: torch.device
) -> list[dict[str, Any]]:
    """Per-video features of one evaluation batch: frames [F, D], valid frames, text [C, D], token rows."""
    batch = model_ready_batch(batch)
    frames = batch["frames"].to(device)
    b, f = frames.shape[:2]
    frame_feats = backbone.encode_frames(frames.flatten(0, 1)).view(b, f, -1).float().cpu().numpy()
    ids = backbone.tokenize(list(batch["captions"]), max_words, device)
    text = backbone.encode_text(ids["input_ids"], ids["attention_mask"])
    embeds = text["embeds"].float().cpu().numpy()
    token_states = text["tokens"].float().cpu().numpy() if tokens else None
    lengths = text["token_mask"].sum(-1).cpu().tolist()
    caption_video = batch["caption_video"].tolist()
    mask = batch["frame_mask"].bool()
    out = []
    for v, key in enumerate(batch["video_key"]):
        rows = [i for i, owner in enumerate(caption_video) if owner == v]
        out.append(
            {
                "key": key,
                "captions": [batch["captions"][i] for i in rows],
                "frames": frame_feats[v],
                "valid_frames": int(mask[v].sum()),
                "text": embeds[rows],
                "token_lengths": [int(lengths[i]) for i in rows],
                # every real token plus the first padding state: DRL's CDCR can pick that one (ties at 0 go
                # to the first padded position); later padding states never enter a score
                "tokens": None if token_states is None else [token_states[i, : int(lengths[i]) + 1] for i in rows],
            }
        )
    return out


def extract_features(
    datamodule: RetrievalDataModule,
    backbone: CLIPBackbone,
    out: Path,
    splits: list[str],
    *,
    max_words: int,
    tokens: bool = True,
    device: str | torch.device = "cpu",
    shard_size: int = 500,
    seed: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Encode every video and caption of ``splits`` and write the feature store at ``out``; returns features.json."""
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists: pass --overwrite to replace it, or choose another --out")
        if (out / STORE_FILE).is_file() or not any(out.iterdir()):
            shutil.rmtree(out)
        else:
            raise FileExistsError(f"{out} exists and is not a feature store: refusing to delete it")
    if datamodule.image_size != backbone.image_size:
        raise ValueError(
            f"the loader crops {datamodule.image_size} px frames but backbone {backbone.name!r} takes {backbone.image_size} px"
        )
    device = torch.device(device)
    backbone = backbone.to(device).eval()
    first = datamodule.split_shards(splits[0]).index
    store: dict[str, Any] = {
        "kind": STORE_KIND,
        "format_version": FORMAT_VERSION,
        "dataset": datamodule.dataset,
        "backbone": backbone.name,
        "backbone_fingerprint": backbone_fingerprint(backbone.clip),
        "backbone_seed": seed,
        "embed_dim": backbone.embed_dim,
        "num_frames": datamodule.num_frames,
        "image_size": datamodule.image_size,
        "sampling": first.get("sampling"),
        "max_words": int(max_words),
        "text_length": text_length(backbone, max_words),
        "caption_mode": datamodule.caption_mode,
        "tokens": bool(tokens),
        "augment": "none",
        "source_root": str(datamodule.root),
        "splits": {},
    }
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    extra = {k: store[k] for k in ("num_frames", "sampling", "backbone", "embed_dim")} | {"features": True}
    try:
        for split in splits:
            shards = datamodule.split_shards(split)
            if shards.index.get("sampling") != store["sampling"]:
                raise ValueError(
                    f"split {split!r} of {datamodule.root} was prepared with sampling {shards.index.get('sampling')!r}, "
                    f"{splits[0]!r} with {store['sampling']!r}"
                )
            writer = SplitWriter(tmp / split, datamodule.dataset, split, shard_size, extra)
            start, done = time.perf_counter(), 0
            try:
                for batch in datamodule.eval_dataloader(split):
                    for item in encode_batch(backbone, batch, max_words, tokens, device):
                        sample = encode_feature_sample(
                            item["key"], item["key"], item["captions"], item["frames"],
                            item["valid_frames"], item["text"], item["tokens"], item["token_lengths"],
                        )  # fmt: skip
                        writer.write(sample, len(item["captions"]))
                        done += 1
                    if progress:
                        rate = done / max(time.perf_counter() - start, 1e-9)
                        print(f"\r{split}: {done}/{shards.num_samples} videos ({rate:.1f}/s)", end="", file=sys.stderr)
                index = writer.finish()
            except BaseException:
                writer.abort()
                raise
            if progress:
                print(file=sys.stderr)
            if index["num_samples"] != shards.num_samples or index["num_captions"] != datamodule.eval_size(split)[1]:
                raise RuntimeError(
                    f"split {split!r}: encoded {index['num_samples']} videos / {index['num_captions']} captions, the "
                    f"frame shards hold {shards.num_samples} / {datamodule.eval_size(split)[1]}"
                )
            store["splits"][split] = {"num_samples": index["num_samples"], "num_captions": index["num_captions"]}
        write_json_atomic(tmp / STORE_FILE, store)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return store


def split_names(root: Path) -> list[str]:
    """Splits prepared under a local shard root (directories holding index.json), train/val/test first."""
    found = [p.name for p in Path(root).iterdir() if (p / "index.json").is_file()] if Path(root).is_dir() else []
    order = {"train": 0, "val": 1, "test": 2}
    return sorted(found, key=lambda s: (order.get(s, 3), s))

