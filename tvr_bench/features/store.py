"""The cached frozen-feature format (docs/features.md): WebDataset shards of float32 ``.npy`` arrays.

One sample per video, as the frame shards (data_cards/FORMAT.md), with the members

- ``{key}.json``: ``video_id``, ``key``, ``captions``, ``valid_frames`` (the first ``valid_frames`` of the
  stored frames are real, the rest padding) and ``token_lengths`` (real tokens per caption);
- ``{key}.frames.npy``: float32 ``[F, D]`` projected class token of every frame the loader yields (padded
  frames included, encoded exactly as the end-to-end path encodes them);
- ``{key}.text.npy``: float32 ``[C, D]`` projected end-token embedding per caption;
- ``{key}.tokens.npy`` (when tokens are stored): float32 ``[sum(stored rows), D]``, per caption the
  projected states of its ``token_lengths[c]`` real tokens plus the first padding position (when the
  caption is shorter than the padded length), caption after caption. DRL's CDCR can select that padding
  state (a tie at cosine 0 goes to the first padded position); later padding states never enter a
  score and are zero when read back.

Nothing is pickled: arrays are read with ``numpy.load(allow_pickle=False)``; any other member is refused.
Per split ``{root}/{split}/index.json`` has the fields of the frame index (so
:func:`tvr_bench.data.shards.read_index` reads it); ``{root}/features.json`` records what the features
were computed from (:data:`STORE_FILE`).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from tvr_bench.data.shards import ShardError, ShardFile, ShardInfo, iter_shard, read_index, read_tagged_json, write_json_atomic

FORMAT_VERSION = 1
STORE_FILE = "features.json"
STORE_KIND = "tvr-bench-frozen-clip-features"
ARRAY_MEMBERS = ("frames.npy", "text.npy", "tokens.npy")
_SAMPLE_FIELDS = frozenset({"__key__", "__url__", "__local_path__"})


class FeatureStoreError(ValueError):
    """A features directory is missing, unreadable, or does not match the run; the message says which."""


# ----------------------------------------------------------------------------- backbone identity
def backbone_fingerprint(clip: torch.nn.Module) -> str:
    """sha256 of the CLIP weights that produce features (every tensor but the trainable ``logit_scale``)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(clip.state_dict().items()):
        if name.endswith("logit_scale"):
            continue
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- samples
def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def encode_feature_sample(
    key: str,
    video_id: str,
    captions: list[str],
    frames: np.ndarray,
    valid_frames: int,
    text: np.ndarray,
    tokens: list[np.ndarray] | None,
    token_lengths: list[int] | None = None,
) -> dict[str, Any]:
    """The tar members of one video (bytes values for :class:`webdataset.TarWriter` without encoder)."""
    if frames.ndim != 2 or text.ndim != 2 or text.shape[0] != len(captions) or text.shape[1] != frames.shape[1]:
        raise ValueError(f"{key}: frames {frames.shape} / text {text.shape} do not fit {len(captions)} captions")
    meta = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "video_id": video_id,
        "captions": list(captions),
        "valid_frames": int(valid_frames),
        "token_lengths": None if tokens is None else [int(n) for n in (token_lengths or [t.shape[0] for t in tokens])],
        "token_rows": None if tokens is None else [int(t.shape[0]) for t in tokens],
    }
    sample = {
        "__key__": key,
        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
        "frames.npy": _npy_bytes(frames),
        "text.npy": _npy_bytes(text),
    }
    if tokens is not None:
        sample["tokens.npy"] = _npy_bytes(np.concatenate(tokens, axis=0))
    return sample


def _load_npy(data: bytes, where: str, member: str) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exn:  # object arrays need pickle: refused
        raise ShardError(f"{where}: member {member} is not a plain numeric .npy array ({exn})") from exn
    if array.dtype != np.float32 or array.ndim != 2:
        raise ShardError(f"{where}: member {member} must be a 2-D float32 array, got {array.dtype} {array.shape}")
    return array


@dataclass
class FeatureSample:
    """One video's cached features, as read back from a shard."""

    key: str
    video_id: str
    captions: list[str]
    frames: np.ndarray  # [F, D]
    valid_frames: int
    text: np.ndarray  # [C, D]
    tokens: np.ndarray | None  # [sum(token_rows), D]
    token_lengths: list[int] | None  # real tokens per caption
    token_rows: list[int] | None  # stored rows per caption (real tokens + at most one padding state)


def parse_feature_sample(sample: dict[str, Any], with_tokens: bool) -> FeatureSample:
    """Validate one raw WebDataset sample of a feature shard (errors name the shard, key and problem)."""
    key = sample.get("__key__", "?")
    where = f"{sample.get('__url__', '?')}: sample {key!r}"
    foreign = sorted(n for n in sample if n not in _SAMPLE_FIELDS and n != "json" and n not in ARRAY_MEMBERS)
    if foreign:
        raise ShardError(f"{where}: unexpected member(s) {', '.join(foreign)}: feature shards hold only json and .npy arrays")
    for member in ("json", "frames.npy", "text.npy"):
        if member not in sample:
            raise ShardError(f"{where}: member {member} missing")
    try:
        meta = json.loads(sample["json"])
        captions = [str(c) for c in meta["captions"]]
        valid = int(meta["valid_frames"])
        lengths = meta.get("token_lengths")
        stored = meta.get("token_rows")
    except (ValueError, KeyError, TypeError) as exn:
        raise ShardError(f"{where}: unreadable json member ({type(exn).__name__}: {exn})") from exn
    frames = _load_npy(sample["frames.npy"], where, "frames.npy")
    text = _load_npy(sample["text.npy"], where, "text.npy")
    if text.shape != (len(captions), frames.shape[1]) or not 0 < valid <= frames.shape[0]:
        raise ShardError(
            f"{where}: text {text.shape} / frames {frames.shape} / valid_frames {valid} disagree with "
            f"{len(captions)} captions"
        )
    tokens = None
    if with_tokens:
        if "tokens.npy" not in sample or lengths is None:
            raise ShardError(f"{where}: no tokens.npy member although the store says tokens were stored")
        tokens = _load_npy(sample["tokens.npy"], where, "tokens.npy")
        if (
            stored is None
            or not len(lengths) == len(stored) == len(captions)
            or sum(stored) != tokens.shape[0]
            or any(not 1 <= n <= r <= n + 1 for n, r in zip(lengths, stored))
        ):
            raise ShardError(f"{where}: token_lengths {lengths} / token_rows {stored} disagree with tokens {tokens.shape}")
    return FeatureSample(key, str(meta.get("video_id", key)), captions, frames, valid, text, tokens, lengths, stored)


# ----------------------------------------------------------------------------- writing
class SplitWriter:
    """Writes one split: ``shard-NNNNN.tar`` of ``shard_size`` videos each, then ``index.json``."""

    def __init__(self, directory: Path, dataset: str, split: str, shard_size: int, extra: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dataset, self.split, self.shard_size, self.extra = dataset, split, shard_size, extra
        self.infos: list[ShardInfo] = []
        self._shard: ShardFile | None = None

    def write(self, sample: dict[str, Any], num_captions: int) -> None:
        """Append one encoded video sample, starting a new shard when the current one is full."""
        if self._shard is None:
            self._shard = ShardFile(self.directory / f"shard-{len(self.infos):05d}.tar")
        self._shard.write(sample, num_captions)
        if self._shard.num_samples >= self.shard_size:
            self.infos.append(self._shard.finish())
            self._shard = None

    def finish(self) -> dict[str, Any]:
        """Close the last shard and write ``index.json``; returns the index."""
        if self._shard is not None:
            self.infos.append(self._shard.finish())
            self._shard = None
        index = {
            "format_version": FORMAT_VERSION,
            "dataset": self.dataset,
            "split": self.split,
            "num_samples": sum(i.num_samples for i in self.infos),
            "num_captions": sum(i.num_captions for i in self.infos),
            "num_shards": len(self.infos),
            "shards": [i.as_dict() for i in self.infos],
            **self.extra,
        }
        write_json_atomic(self.directory / "index.json", index)
        return index

    def abort(self) -> None:
        """Drop a half-written shard."""
        if self._shard is not None:
            self._shard.abort()
            self._shard = None


# ----------------------------------------------------------------------------- reading
def read_store(root: str | Path) -> dict[str, Any]:
    """``{root}/features.json``; a :class:`FeatureStoreError` naming the path when absent or not a feature store."""
    path = Path(root) / STORE_FILE
    if not path.is_file():
        raise FeatureStoreError(
            f"no cached features at {Path(root)} ({STORE_FILE} missing): run `tvr-bench features <dataset> "
            f"--backbone <name> --out {root}` first (docs/features.md)"
        )
    return read_tagged_json(path, STORE_KIND, FORMAT_VERSION, FeatureStoreError, "tvr-bench feature store")


@dataclass
class SplitFeatures:
    """Every video of one split in memory, sorted by key: the arrays the loaders index."""

    keys: list[str]
    captions: list[list[str]]
    frames: np.ndarray  # [V, F, D]
    frame_mask: np.ndarray  # [V, F] bool
    text: np.ndarray  # [C, D], videos' captions in order
    caption_offsets: np.ndarray  # [V + 1]: captions of video v are rows offsets[v]:offsets[v+1]
    tokens: np.ndarray | None  # [T, D]
    token_offsets: np.ndarray | None  # [C + 1]: stored rows of caption c are tokens[offsets[c]:offsets[c+1]]
    token_lengths: np.ndarray | None  # [C]: real tokens of caption c

    @property
    def num_videos(self) -> int:
        """Number of videos."""
        return len(self.keys)

    @property
    def num_captions(self) -> int:
        """Number of captions."""
        return int(self.caption_offsets[-1])


def load_split_features(root: str | Path, split: str, store: dict[str, Any]) -> SplitFeatures:
    """Read every shard of ``{root}/{split}`` (checked against index.json counts) into one :class:`SplitFeatures`."""
    directory = Path(root) / split
    index = read_index(directory, str(store.get("dataset", "<dataset>")))
    with_tokens = bool(store.get("tokens"))
    samples: list[FeatureSample] = []
    for entry in index["shards"]:
        path = directory / entry["file"]
        try:
            shard = [parse_feature_sample(s, with_tokens) for s in iter_shard(path)]
        except ShardError:
            raise
        except Exception as exn:  # noqa: BLE001 - re-raised with the shard named
            raise ShardError(f"{path}: corrupt or truncated feature shard: {type(exn).__name__}: {exn}") from exn
        if len(shard) != int(entry["num_samples"]):
            raise ShardError(f"{path}: read {len(shard)} samples, index.json says {entry['num_samples']}")
        samples.extend(shard)
    if not samples:
        raise FeatureStoreError(f"{directory} holds no videos")
    samples.sort(key=lambda s: s.key)
    shapes = {s.frames.shape for s in samples}
    if len(shapes) != 1:
        raise ShardError(f"{directory}: videos have different frame feature shapes {sorted(shapes)}")
    counts = np.array([len(s.captions) for s in samples])
    frames = np.stack([s.frames for s in samples])
    mask = np.arange(frames.shape[1])[None, :] < np.array([s.valid_frames for s in samples])[:, None]
    tokens = token_offsets = token_lengths = None
    if with_tokens:
        tokens = np.concatenate([s.tokens for s in samples], axis=0)
        rows = np.concatenate([np.asarray(s.token_rows, dtype=np.int64) for s in samples])
        token_offsets = np.concatenate([[0], np.cumsum(rows)])
        token_lengths = np.concatenate([np.asarray(s.token_lengths, dtype=np.int64) for s in samples])
    return SplitFeatures(
        keys=[s.key for s in samples],
        captions=[s.captions for s in samples],
        frames=frames,
        frame_mask=mask,
        text=np.concatenate([s.text for s in samples], axis=0),
        caption_offsets=np.concatenate([[0], np.cumsum(counts)]),
        tokens=tokens,
        token_offsets=token_offsets,
        token_lengths=token_lengths,
    )


def pad_tokens(split: SplitFeatures, caption_rows: Iterable[int], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Token states [N, length, D] (stored rows, then zeros) and the real-token mask [N, length]."""
    assert split.tokens is not None and split.token_offsets is not None and split.token_lengths is not None
    rows = list(caption_rows)
    out = np.zeros((len(rows), length, split.tokens.shape[1]), dtype=np.float32)
    mask = np.zeros((len(rows), length), dtype=bool)
    for i, c in enumerate(rows):
        lo, hi = int(split.token_offsets[c]), int(split.token_offsets[c + 1])
        n = hi - lo
        if n > length:
            raise FeatureStoreError(f"caption row {c} has {n} stored tokens, more than max length {length}")
        out[i, :n] = split.tokens[lo:hi]
        mask[i, : int(split.token_lengths[c])] = True
    return out, mask
