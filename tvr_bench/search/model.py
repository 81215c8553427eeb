"""A trained method for search: the checkpoint a run wrote, the model rebuilt from it, its fingerprint and the
frame protocol its videos were evaluated with (frames per video, sampling, input size)."""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tvr_bench.methods.base import RetrievalModule

SCORINGS = ("two_tower", "rerank")


class SearchSetupError(ValueError):
    """A checkpoint, index or source that cannot be used for search; the message names it and the fix."""


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint file of `path`: a `.ckpt` file itself, or the single best (else last) checkpoint under a
    run directory (`<run>/checkpoints/` or the logger's `<run>/<project>/<id>/checkpoints/`)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise SearchSetupError(f"no checkpoint at {path}: give a .ckpt file or a run directory holding checkpoints/")
    found = sorted(p for p in path.rglob("*.ckpt") if p.is_file())
    if not found:
        raise SearchSetupError(f"{path} holds no .ckpt file: train with `tvr-bench fit` (or `make bench`) first")
    for pick in ([p for p in found if p.name.startswith("best")], [p for p in found if p.name == "last.ckpt"], found):
        if len(pick) == 1:
            return pick[0]
        if len(pick) > 1:
            names = ", ".join(str(p.relative_to(path)) for p in pick[:6])
            raise SearchSetupError(f"{path} holds several checkpoints ({names}): give the .ckpt file itself")
    raise AssertionError("unreachable")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint read with ``weights_only=True`` (tensors and plain values only)."""
    path = resolve_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exn:  # noqa: BLE001 - a pickle that is more than tensors, a truncated file
        first = (str(exn).strip().splitlines() or [type(exn).__name__])[0]
        raise SearchSetupError(f"{path}: not a readable tvr-bench checkpoint (loaded with weights_only=True): {first}") from exn
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise SearchSetupError(f"{path}: not a Lightning checkpoint of a tvr-bench run (no state_dict / hyper_parameters)")
    if not str((ckpt["hyper_parameters"] or {}).get("_class_path", "")):
        raise SearchSetupError(f"{path}: its hyper_parameters name no model class (_class_path); was it written by `tvr-bench fit`?")
    ckpt["_path"] = str(path.resolve())
    return ckpt


def init_args(hparams: dict[str, Any]) -> dict[str, Any]:
    """The model's constructor arguments from checkpoint hyper-parameters (Lightning's `_` entries dropped)."""
    return {k: v for k, v in hparams.items() if not str(k).startswith("_")}


def build_model(ckpt: dict[str, Any]) -> RetrievalModule:
    """The method of a checkpoint rebuilt from its class path and init args, weights loaded, in eval mode."""
    hp = dict(ckpt["hyper_parameters"])
    module_name, _, cls_name = str(hp["_class_path"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as exn:
        raise SearchSetupError(f"{ckpt.get('_path')}: model class {hp['_class_path']!r} cannot be imported ({exn})") from exn
    if not (isinstance(cls, type) and issubclass(cls, RetrievalModule)):
        raise SearchSetupError(f"{ckpt.get('_path')}: {hp['_class_path']} is not a tvr-bench RetrievalModule")
    model = cls(**init_args(hp))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def fingerprint(model: RetrievalModule) -> str:
    """sha256 of what decides a model's scores: its class, its init args and every tensor of its state dict."""
    digest = hashlib.sha256()
    digest.update(f"{type(model).__module__}.{type(model).__qualname__};".encode())
    args = {k: v for k, v in dict(model.hparams).items() if not str(k).startswith("_")}
    digest.update(json.dumps(args, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update((t.float() if t.dtype == torch.bfloat16 else t).numpy().tobytes())
    return digest.hexdigest()


def scoring_of(model: RetrievalModule) -> str:
    """The method's declared search scoring (`SEARCH_SCORING`), checked."""
    scoring = getattr(model, "SEARCH_SCORING", "rerank")
    if scoring not in SCORINGS:
        raise SearchSetupError(f"{type(model).__name__}.SEARCH_SCORING is {scoring!r}; must be one of {SCORINGS}")
    return scoring


#: `jpeg_quality` value that takes the quality (and stored short side) of the checkpoint's benchmark.
AUTO = "auto"


@dataclass(frozen=True)
class FrameProtocol:
    """How a video becomes the model's input: frames per video, native-frame sampling, input size, and the
    prepare-time storage it reproduces (frames resized to `short_side`, JPEG at `jpeg_quality`; None: no JPEG)."""

    num_frames: int
    sampling: str
    image_size: int
    jpeg_quality: int | None = 95
    short_side: int | None = None
    sampling_source: str = ""

    def as_dict(self) -> dict[str, Any]:
        """Plain form for index.json."""
        return {"num_frames": self.num_frames, "sampling": self.sampling, "image_size": self.image_size,
                "jpeg_quality": self.jpeg_quality, "short_side": self.short_side or self.image_size,
                "sampling_source": self.sampling_source}


def _dataset_of(dm_hparams: dict[str, Any]) -> str | None:
    """The benchmark a run's data config names: its `dataset`, or the `NAME` of its DataModule class."""
    class_path = str(dm_hparams.get("_class_path", ""))
    if class_path.endswith("SyntheticDataModule"):
        return "synthetic"
    if dm_hparams.get("dataset"):
        return str(dm_hparams["dataset"])
    module_name, _, cls_name = class_path.rpartition(".")
    try:
        name = getattr(getattr(importlib.import_module(module_name), cls_name), "NAME", None)
    except (ImportError, AttributeError, ValueError):
        return None
    return str(name) if name else None


def _reader_storage(dm_hparams: dict[str, Any]) -> tuple[int, int] | None:
    """(JPEG quality, short side) `tvr-bench prepare` stores the run's benchmark with (None when unknown)."""
    name = _dataset_of(dm_hparams)
    if not name:
        return None
    from tvr_bench.data.readers import READERS

    reader = READERS.get(name)
    return None if reader is None else (int(reader.jpeg_quality), int(reader.short_side))


def _prepared_sampling(dm_hparams: dict[str, Any]) -> str | None:
    """The sampling recorded in the index.json of the split the run tested on, when that folder is still there."""
    root, split = dm_hparams.get("root"), dm_hparams.get("test_split") or "test"
    if not root or "://" in str(root) or str(root).startswith("pipe:"):
        return None
    try:
        index = json.loads((Path(str(root)) / str(split) / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = index.get("sampling") if isinstance(index, dict) else None
    return str(value) if value else None


def frame_protocol(ckpt: dict[str, Any], model: RetrievalModule, sampling: str | None = None,
                   num_frames: int | None = None, jpeg_quality: int | str | None = AUTO) -> FrameProtocol:
    """The frames a checkpoint's model was evaluated with. Sampling, first found: the explicit `sampling`; the
    run's data config (`sampling`, as the CLI filled it from the method's DATA_PROTOCOL); the index.json of the
    shards it tested on; the synthetic benchmark's fixed sampling; the method's own `DATA_PROTOCOL`.
    `jpeg_quality` ``auto``: the JPEG quality and short side `prepare` stores the run's benchmark with (else 95 and
    the input size, prepare's defaults), so a video file gets the frames its prepared shard would hold."""
    dm = dict(ckpt.get("datamodule_hyper_parameters") or {})
    source, value = "--sampling", sampling
    if value is None and dm.get("sampling"):
        source, value = "the run's data config", str(dm["sampling"])
    if value is None:
        prepared = _prepared_sampling(dm)
        if prepared:
            source, value = f"the index.json of the shards it was tested on ({dm.get('root')})", prepared
    if value is None and str(dm.get("_class_path", "")).endswith("SyntheticDataModule"):
        from tvr_bench.data.readers import get_reader

        source, value = "the synthetic benchmark's sampling", get_reader("synthetic").sampling
    if value is None:
        source, value = f"{type(model).__name__}.DATA_PROTOCOL", str(model.DATA_PROTOCOL["sampling"])
    from tvr_bench.data.frames import POLICIES

    if value not in POLICIES:
        raise SearchSetupError(f"unknown sampling {value!r} (from {source}); choose one of {', '.join(POLICIES)}")
    frames = int(num_frames or dm.get("num_frames") or 12)
    size = int(model.backbone.image_size)
    if dm.get("image_size") and int(dm["image_size"]) != size:
        raise SearchSetupError(f"the run fed {dm['image_size']} px frames to a backbone that takes {size} px")
    short_side = size
    if jpeg_quality == AUTO:
        storage = _reader_storage(dm)
        jpeg_quality, short_side = storage if storage is not None else (95, size)
    if jpeg_quality is not None and not 1 <= int(jpeg_quality) <= 100:
        raise SearchSetupError(f"jpeg_quality must be in 1..100 (or None: no JPEG round trip), got {jpeg_quality}")
    return FrameProtocol(frames, value, size, None if jpeg_quality is None else int(jpeg_quality), short_side, source)


@dataclass
class LoadedModel:
    """A checkpoint's method ready to encode: the model, its fingerprint, where it came from and its protocol."""

    model: RetrievalModule
    fingerprint: str
    checkpoint: str
    class_path: str
    method: str
    scoring: str
    hparams: dict[str, Any]
    datamodule: dict[str, Any]

    def protocol(self, sampling: str | None = None, num_frames: int | None = None,
                 jpeg_quality: int | str | None = AUTO) -> FrameProtocol:
        """The frame protocol of this checkpoint (see :func:`frame_protocol`)."""
        return frame_protocol({"datamodule_hyper_parameters": self.datamodule}, self.model, sampling, num_frames, jpeg_quality)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a run's (or a checkpoint file's) method for search, refusing one whose scores cannot be served per query."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt)
    refusal = model.search_refusal()
    if refusal:
        raise SearchSetupError(f"{ckpt['_path']}: {refusal}")
    loaded = LoadedModel(
        model=model.to(device),
        fingerprint=fingerprint(model),
        checkpoint=ckpt["_path"],
        class_path=str(ckpt["hyper_parameters"]["_class_path"]),
        method=str(model.method_name),
        scoring=scoring_of(model),
        hparams=init_args(dict(ckpt["hyper_parameters"])),
        datamodule=dict(ckpt.get("datamodule_hyper_parameters") or {}),
    )
    return loaded
