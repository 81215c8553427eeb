"""`tvr-bench index`: encode every video of a folder (files or prepared shards) with a trained method and write a
search index (tvr_bench/search/store.py), chunk by chunk, resumable; videos that fail to decode are listed."""

from __future__ import annotations

import datetime as _dt
import multiprocessing as mp
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from tvr_bench.search.model import AUTO, FrameProtocol, LoadedModel, SearchSetupError, load_model
from tvr_bench.search.sources import Chunk, DecodedClip, Failure, Source, decode_file, iter_shard_clips, open_source
from tvr_bench.search.store import APPROX_FILE, INDEX_FILE, IndexWriter, open_stored
from tvr_bench.search.vectors import APPROX_CODES, REFINE, build_approximate, default_nlist, write_index

#: Video-decoding processes of `tvr-bench index` by default: one per core, at most two.
DEFAULT_WORKERS = max(1, min(2, os.cpu_count() or 1))


@torch.no_grad()
def encode_clips(loaded: LoadedModel, frames: np.ndarray, mask: np.ndarray,
                 keys: list[str] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(search vectors [B, D] float32, stored video features) of a batch of uint8 clips [B, F, 3, S, S].

    The frames are normalised exactly as the evaluation loader's batches (`normalize_frames`), then go through the
    method's `encode_video` (with the videos' `keys` when it takes `video_keys`: per-video random draws, as TS2-Net's
    perturbed selection, then follow the video, not the batch). Two-tower methods store only the vectors; rerank
    methods also every feature tensor."""
    from tvr_bench.data.transforms import normalize_frames

    model = loaded.model
    device = next(model.parameters()).device
    frames_t = normalize_frames(torch.from_numpy(frames), torch.from_numpy(mask)).to(device)
    extra = {"video_keys": keys} if keys is not None and _takes_keys(model) else {}
    feats = model.encode_video(frames_t, torch.from_numpy(mask).to(device), **extra)
    vectors = model.search_vectors(feats, "video").float().cpu().numpy()
    stored: dict[str, np.ndarray] = {}
    if loaded.scoring == "rerank":
        for key, value in feats.items():
            value = value.detach().cpu()
            stored[key] = (value.float() if value.is_floating_point() else value).numpy()
    return vectors, stored


def _takes_keys(model: Any) -> bool:
    """Whether the method's `encode_video` accepts the videos' keys (`video_keys`)."""
    import inspect

    try:
        return "video_keys" in inspect.signature(model.encode_video).parameters
    except (TypeError, ValueError):
        return False


def _worker_init() -> None:
    """Decode workers: no intra-op threads (the parent encodes), Ctrl-C left to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def _clips(source: Source, chunk: Chunk, protocol: FrameProtocol, pool: Any) -> Iterator[DecodedClip | Failure]:
    """The decoded videos of one chunk in their listed order (files: by the worker pool when there is one)."""
    if source.kind == "shards":
        yield from iter_shard_clips(source.root, chunk, protocol, prefix_split=len(source.splits) > 1)
        return
    func = partial(decode_file, source.root, protocol=protocol)
    yield from (pool.imap(func, chunk.files, chunksize=1) if pool is not None else map(func, chunk.files))


def _encode_chunk(loaded: LoadedModel, clips: Iterator[DecodedClip | Failure], batch_size: int,
                  on_video: Callable[[], None]) -> tuple[np.ndarray, dict[str, np.ndarray], list[dict[str, Any]], list[dict[str, str]]]:
    """Encode the clips of one chunk in batches; returns (vectors, features, items, failures)."""
    vectors: list[np.ndarray] = []
    features: dict[str, list[np.ndarray]] = {}
    items: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    batch: list[DecodedClip] = []

    def flush() -> None:
        if not batch:
            return
        v, f = encode_clips(loaded, np.stack([c.frames for c in batch]), np.stack([c.mask for c in batch]),
                            [c.item.get("sample", c.key) for c in batch])
        vectors.append(v)
        for key, value in f.items():
            features.setdefault(key, []).append(value)
        items.extend(c.item for c in batch)
        batch.clear()

    for clip in clips:
        if isinstance(clip, Failure):
            failures.append({"file": clip.file, "reason": clip.reason})
        else:
            batch.append(clip)
            if len(batch) >= batch_size:
                flush()
        on_video()
    flush()
    dim = loaded.model.backbone.embed_dim
    out_vectors = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    return out_vectors, {k: np.concatenate(v) for k, v in features.items()}, items, failures


def build_index(
    source: str | Path,
    ckpt: str | Path,
    out: str | Path,
    *,
    sampling: str | None = None,
    num_frames: int | None = None,
    jpeg_quality: int | str | None = AUTO,
    splits: list[str] | None = None,
    batch_size: int = 16,
    chunk_size: int = 256,
    workers: int = 0,
    approximate: bool = False,
    nlist: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = True,
    loaded: LoadedModel | None = None,
) -> dict[str, Any]:
    """Index every video of `source` with the checkpoint `ckpt` into the folder `out`; returns its index.json.

    Files are sampled with the frame protocol of the checkpoint (`tvr_bench.search.model.frame_protocol`:
    `sampling` / `num_frames` override it); `jpeg_quality` None skips the prepare-time JPEG round trip. `workers`
    decode processes (0: in this process). `approximate` also builds an IVF index (`nlist` lists)."""
    started = time.perf_counter()
    loaded = loaded or load_model(ckpt, device)
    src = open_source(source, chunk_size, splits)
    protocol = loaded.protocol(sampling, num_frames, jpeg_quality)
    if src.kind == "shards":
        if sampling is None and src.sampling and src.sampling != protocol.sampling:
            raise SearchSetupError(
                f"{src.root} was prepared with {src.sampling} sampling but the checkpoint's videos were sampled "
                f"{protocol.sampling} ({protocol.sampling_source}): index the video files, or pass --sampling "
                f"{src.sampling} to accept the shards' frames"
            )
        protocol = FrameProtocol(protocol.num_frames, src.sampling or protocol.sampling, protocol.image_size, None,
                                 None, "the prepared shards")
    config = {
        "fingerprint": loaded.fingerprint,
        "source": {"kind": src.kind, "root": str(Path(src.root).resolve()), "splits": src.splits},
        "protocol": protocol.as_dict(),
        "chunk_size": chunk_size,
        "batch_size": batch_size,
    }
    writer = IndexWriter(out, config, resume=resume, overwrite=overwrite)
    total = sum(len(c.files) for c in src.chunks) if src.kind == "files" else None
    done_videos = sum(writer.state["chunks"][c.name]["videos"] + len(writer.state["chunks"][c.name]["failures"])
                      for c in src.chunks if writer.done(c.name))
    seen = {"n": done_videos, "t0": time.perf_counter(), "start": done_videos}

    def tick() -> None:
        seen["n"] += 1
        if progress:
            rate = (seen["n"] - seen["start"]) / max(time.perf_counter() - seen["t0"], 1e-9)
            of = f"/{total}" if total else ""
            print(f"\rindexed {seen['n']}{of} videos ({rate:.1f}/s)", end="", file=sys.stderr, flush=True)

    pool = None
    if workers > 0 and src.kind == "files" and any(not writer.done(c.name) for c in src.chunks):
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        pool = mp.get_context(method).Pool(workers, initializer=_worker_init)
    try:
        for chunk in src.chunks:
            if writer.done(chunk.name):
                continue
            vectors, features, items, failures = _encode_chunk(loaded, _clips(src, chunk, protocol, pool), batch_size, tick)
            writer.write_chunk(chunk.name, vectors, features, items, failures)
        if pool is not None:
            pool.close()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    if progress:
        print(file=sys.stderr)
    meta = {
        "method": loaded.method,
        "class_path": loaded.class_path,
        "checkpoint": loaded.checkpoint,
        "fingerprint": loaded.fingerprint,
        "scoring": loaded.scoring,
        "backbone": loaded.hparams.get("backbone"),
        "max_words": loaded.hparams.get("max_words"),
        "protocol": protocol.as_dict(),
        "source": src.describe(),
        "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "approximate": None,
    }
    index = writer.finish([c.name for c in src.chunks], meta)
    if approximate:
        index = add_approximate(out, nlist)
    return {**index, "build_seconds": round(time.perf_counter() - started, 3)}


def add_approximate(path: str | Path, nlist: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Build (or rebuild) the optional IVF index of a finished index from its vectors; returns the new index.json."""
    from tvr_bench.data.shards import write_json_atomic

    stored = open_stored(path)
    nlist = int(nlist or default_nlist(stored.num_videos))
    t0 = time.perf_counter()
    index = build_approximate(stored.vectors, nlist, seed=seed)
    write_index(index, stored.path / APPROX_FILE)
    meta = dict(stored.meta)
    meta["approximate"] = {"type": f"IVF{nlist},{APPROX_CODES}", "metric": "inner_product", "nlist": nlist, "seed": seed,
                           "train_rows": min(stored.num_videos, 40 * nlist), "refine": REFINE,
                           "seconds": round(time.perf_counter() - t0, 3)}
    write_json_atomic(stored.path / INDEX_FILE, meta)
    return meta
