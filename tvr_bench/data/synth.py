"""Procedural synthetic benchmark: real mp4 files (PyAV) plus an annotation file, deterministic from a seed.

Each video shows two events on one background: a coloured shape performs a motion, then a second
coloured shape performs another. Each video gets five compositional captions (both events, the first
only, the second only, the temporal order, the objects only), so some captions describe only part of
the video. See data_cards/synthetic.md.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from fractions import Fraction
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import av
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tvr_bench.data.prepare import VideoRecord

GENERATOR_VERSION = 2  # bump whenever the videos or captions for a given seed change
ANNOTATION_FILE = "annotations.json"
FPS = 2
FRAME_SIZE = 64
EVENT_FRAMES = (12, 16)
NOISE_STD = 4.0
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"train": 48, "val": 16, "test": 16},
    "default": {"train": 1000, "val": 100, "test": 200},
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 210),
    "cyan": (40, 210, 215),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
MOTIONS: dict[str, tuple[str, ...]] = {
    "left": ("moves left", "slides to the left", "goes left"),
    "right": ("moves right", "slides to the right", "goes right"),
    "up": ("moves up", "rises", "goes up"),
    "down": ("moves down", "falls", "goes down"),
    "grow": ("grows", "gets bigger", "expands"),
    "shrink": ("shrinks", "gets smaller", "contracts"),
}
BACKGROUNDS: dict[str, tuple[str, ...]] = {
    "black": ("on a black background", "against a dark backdrop"),
    "gray": ("on a gray background", "against a grey backdrop"),
    "striped": ("on a striped background", "over horizontal stripes"),
    "checkered": ("on a checkered background", "over a checkerboard"),
}
CAPTION_TYPES: tuple[str, ...] = ("full", "first", "second", "order", "objects")


@dataclass
class Event:
    """One object doing one motion over ``num_frames`` frames starting at ``start_frame``."""

    colour: str
    shape: str
    motion: str
    start_frame: int
    num_frames: int
    path: list[float]  # x0, y0, r0, x1, y1, r1 in pixels


@dataclass
class VideoSpec:
    """Everything needed to render one video and describe it."""

    video_id: str
    split: str
    background: str
    events: list[Event]
    noise_seed: int
    captions: list[str] = field(default_factory=list)
    caption_info: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        """Total number of frames."""
        return sum(e.num_frames for e in self.events)


def _motion_path(motion: str, rng: np.random.Generator) -> list[float]:
    """Start and end (x, y, radius) of a motion, jittered."""
    lo, hi = 14.0, 50.0
    j = lambda: float(rng.uniform(-3, 3))  # noqa: E731 - tiny local helper
    r = float(rng.uniform(9, 11))
    if motion in ("left", "right"):
        y = float(rng.uniform(18, 46))
        x0, x1 = (hi + j(), lo + j()) if motion == "left" else (lo + j(), hi + j())
        return [x0, y, r, x1, y, r]
    if motion in ("up", "down"):
        x = float(rng.uniform(18, 46))
        y0, y1 = (hi + j(), lo + j()) if motion == "up" else (lo + j(), hi + j())
        return [x, y0, r, x, y1, r]
    x, y = float(rng.uniform(26, 38)), float(rng.uniform(26, 38))
    small, big = float(rng.uniform(4, 6)), float(rng.uniform(14, 16))
    return [x, y, small, x, y, big] if motion == "grow" else [x, y, big, x, y, small]


def _object(colour: str, shape: str) -> str:
    """'a red circle' / 'an orange square'."""
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


def _event_phrase(event: Event, rng: np.random.Generator) -> str:
    """'a red circle moves left' with a random motion synonym."""
    return f"{_object(event.colour, event.shape)} {rng.choice(MOTIONS[event.motion])}"


def _pattern(event: Event, motion: bool = True) -> list[str | None]:
    """Constraint on one event: [colour, shape, motion or None]."""
    return [event.colour, event.shape, event.motion if motion else None]


def _captions(spec: VideoSpec, rng: np.random.Generator) -> tuple[list[str], list[dict[str, Any]]]:
    """Five captions (types in CAPTION_TYPES order) and the constraint each one expresses."""
    e1, e2 = spec.events
    bg = str(rng.choice(BACKGROUNDS[spec.background]))
    p1, p2 = _event_phrase(e1, rng), _event_phrase(e2, rng)
    caps: list[str] = []
    info: list[dict[str, Any]] = []
    # full: both events in order plus the background
    if rng.random() < 0.5:
        caps.append(f"{p1} {bg}, then {p2}")
    else:
        caps.append(f"first {p1}, then {p2}, {bg}")
    info.append({"type": "full", "background": spec.background, "first": _pattern(e1), "second": _pattern(e2), "any": []})
    # first event only (sometimes anchored in time, sometimes with the background)
    variant = int(rng.integers(3))
    caps.append([p1, f"at the start {p1}", f"{p1} {bg}"][variant])
    info.append(
        {
            "type": "first",
            "background": spec.background if variant == 2 else None,
            "first": _pattern(e1) if variant == 1 else None,
            "second": None,
            "any": [] if variant == 1 else [_pattern(e1)],
        }
    )
    # second event only
    variant = int(rng.integers(3))
    caps.append([p2, f"at the end {p2}", f"then {p2}"][variant])
    info.append(
        {
            "type": "second",
            "background": None,
            "first": None,
            "second": _pattern(e2) if variant else None,
            "any": [] if variant else [_pattern(e2)],
        }
    )
    # temporal order without the background
    caps.append(f"{p2} after {p1}" if rng.random() < 0.5 else f"{p1} before {p2}")
    info.append({"type": "order", "background": None, "first": _pattern(e1), "second": _pattern(e2), "any": []})
    # objects only, no motion, no order
    caps.append(f"{_object(e1.colour, e1.shape)} and {_object(e2.colour, e2.shape)} {bg}")
    info.append(
        {"type": "objects", "background": spec.background, "first": None, "second": None,
         "any": [_pattern(e1, motion=False), _pattern(e2, motion=False)]}
    )
    return caps, info


def make_specs(size: str = "tiny", seed: int = 0) -> list[VideoSpec]:
    """Draw every video of every split (train, val, test) from ``seed``."""
    if size not in SIZES:
        raise ValueError(f"unknown synthetic size {size!r}; choose one of {', '.join(SIZES)}")
    rng = np.random.default_rng(seed)
    specs = []
    colours, motions, backgrounds = list(COLOURS), list(MOTIONS), list(BACKGROUNDS)
    for split, count in SIZES[size].items():
        for i in range(count):
            events: list[Event] = []
            start = 0
            while len(events) < 2:
                event = Event(
                    colour=str(rng.choice(colours)),
                    shape=str(rng.choice(SHAPES)),
                    motion=str(rng.choice(motions)),
                    start_frame=start,
                    num_frames=int(rng.integers(EVENT_FRAMES[0], EVENT_FRAMES[1] + 1)),
                    path=[],
                )
                if events and _pattern(events[0]) == _pattern(event):
                    continue
                event.path = _motion_path(event.motion, rng)
                events.append(event)
                start += event.num_frames
            spec = VideoSpec(
                video_id=f"{split}-{i:05d}",
                split=split,
                background=str(rng.choice(backgrounds)),
                events=events,
                noise_seed=int(rng.integers(2**31)),
            )
            spec.captions, spec.caption_info = _captions(spec, rng)
            specs.append(spec)
    return specs


_GRID_Y, _GRID_X = np.mgrid[0:FRAME_SIZE, 0:FRAME_SIZE]


def _background(name: str) -> np.ndarray:
    """The 64x64x3 float32 background image."""
    yy, xx = _GRID_Y, _GRID_X
    if name == "black":
        level = np.full((FRAME_SIZE, FRAME_SIZE), 18.0)
    elif name == "gray":
        level = np.full((FRAME_SIZE, FRAME_SIZE), 118.0)
    elif name == "striped":
        level = np.where((yy // 4) % 2 == 0, 35.0, 95.0)
    elif name == "checkered":
        level = np.where(((yy // 8) + (xx // 8)) % 2 == 0, 35.0, 95.0)
    else:
        raise ValueError(f"unknown background {name!r}")
    return np.repeat(level[..., None], 3, axis=2).astype(np.float32)


def _shape_mask(shape: str, x: float, y: float, r: float) -> np.ndarray:
    """Boolean mask of a shape centred at (x, y) with radius r (pixel centres at +0.5)."""
    dx, dy = _GRID_X + 0.5 - x, _GRID_Y + 0.5 - y
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.82 * r
    if shape == "triangle":
        top, bottom = -r, 0.8 * r
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= (dy - top) / (bottom - top) * r)
    if shape == "cross":
        arm = 0.34 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def render(spec: VideoSpec) -> np.ndarray:
    """Render a video as uint8 ``[T, 64, 64, 3]`` (deterministic from the spec)."""
    rng = np.random.default_rng(spec.noise_seed)
    frames = np.empty((spec.num_frames, FRAME_SIZE, FRAME_SIZE, 3), dtype=np.float32)
    frames[:] = _background(spec.background)
    t_all = 0
    for event in spec.events:
        x0, y0, r0, x1, y1, r1 = event.path
        colour = np.array(COLOURS[event.colour], dtype=np.float32)
        for t in range(event.num_frames):
            p = t / max(event.num_frames - 1, 1)
            mask = _shape_mask(event.shape, x0 + p * (x1 - x0), y0 + p * (y1 - y0), r0 + p * (r1 - r0))
            frames[t_all][mask] = colour
            t_all += 1
    frames += NOISE_STD * rng.standard_normal((*frames.shape[:3], 1), dtype=np.float32)
    return np.clip(frames, 0, 255).astype(np.uint8)


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """BT.601 limited-range RGB -> planar yuv420p laid out as PyAV expects (``[H * 3 / 2, W]`` uint8)."""
    rgb = frame.astype(np.float32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0
    u = 128.0 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0
    v = 128.0 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0
    h, w = y.shape

    def sub(plane: np.ndarray) -> np.ndarray:
        """2x2 average (chroma subsampling)."""
        return plane.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    planes = [y.reshape(-1), sub(u).reshape(-1), sub(v).reshape(-1)]
    return np.clip(np.rint(np.concatenate(planes)), 0, 255).astype(np.uint8).reshape(h * 3 // 2, w)


def write_mp4(path: Path, frames: np.ndarray, fps: int = FPS) -> None:
    """Encode uint8 ``[T, H, W, 3]`` frames to an H.264 mp4 with PyAV, reproducibly.

    The colour conversion (BT.601, limited range) is done here in numpy so the encoder input is
    exactly defined; the encoder runs single-threaded at a constant QP.
    """
    tmp = path.with_name(path.name + ".part")
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # Constant QP: with CRF, x264's rate control (SIMD lookahead) gave different bitstreams from
        # run to run for some videos; fixed-QP encodes were bit-identical.
        stream.options = {"qp": "18", "preset": "veryfast"}
        stream.codec_context.thread_count = 1
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(array), format="yuv420p")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)


def _render_and_write(job: tuple[VideoSpec, str]) -> str:
    """Worker: render one spec and write its mp4."""
    spec, directory = job
    write_mp4(Path(directory) / f"{spec.video_id}.mp4", render(spec))
    return spec.video_id


def _matches(pattern: list[str | None], event: dict[str, Any]) -> bool:
    """Whether an event satisfies a [colour, shape, motion] pattern (None = any)."""
    return all(p is None or p == event[k] for p, k in zip(pattern, ("colour", "shape", "motion")))


def consistent(info: dict[str, Any], video: dict[str, Any]) -> bool:
    """Whether a caption's constraints hold for a video (used for the oracle ceiling)."""
    events = video["events"]
    if info["background"] is not None and info["background"] != video["background"]:
        return False
    if info["first"] is not None and not _matches(info["first"], events[0]):
        return False
    if info["second"] is not None and not _matches(info["second"], events[1]):
        return False
    patterns = info["any"]
    if len(patterns) == 1:
        return any(_matches(patterns[0], e) for e in events)
    if len(patterns) == 2:
        a, b = patterns
        return (_matches(a, events[0]) and _matches(b, events[1])) or (_matches(a, events[1]) and _matches(b, events[0]))
    return True


def split_stats(videos: list[dict[str, Any]], oracle: bool = True) -> dict[str, float]:
    """Counts, chance level and (with ``oracle``) the text-to-video R@1 ceiling of a model that knows
    every caption's meaning exactly: 1 / (videos consistent with the caption), averaged."""
    n = len(videos)
    stats: dict[str, float] = {
        "videos": n,
        "captions": sum(len(v["captions"]) for v in videos),
        "chance_t2v_R@1": 100.0 / n,
    }
    if oracle:
        recip = [1.0 / sum(consistent(info, other) for other in videos) for v in videos for info in v["caption_info"]]
        stats["oracle_t2v_R@1"] = 100.0 * float(np.mean(recip))
    return stats


def generate(
    out: str | Path,
    size: str = "tiny",
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """Write ``{out}/videos/*.mp4`` and ``{out}/annotations.json`` (written last); returns the annotation path."""
    out = Path(out)
    videos_dir = out / "videos"
    videos_dir.mkdir(parents=True, exist_ok=True)
    specs = make_specs(size, seed)
    jobs = [(spec, str(videos_dir)) for spec in specs]
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    pool = None
    if workers > 1:  # forked before the progress bar starts its refresh thread
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        pool = mp.get_context(method).Pool(workers)
    try:
        with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
            task = bar.add_task(f"synthetic-{size} videos", total=len(jobs))
            done = pool.imap_unordered(_render_and_write, jobs, chunksize=8) if pool else map(_render_and_write, jobs)
            for _ in done:
                bar.advance(task)
        if pool is not None:
            pool.close()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    videos = []
    for spec in specs:
        entry = asdict(spec)
        entry["file"] = f"{spec.video_id}.mp4"
        entry["num_frames"] = spec.num_frames
        del entry["noise_seed"]
        videos.append(entry)
    annotation = {
        "dataset": "synthetic",
        "generator_version": GENERATOR_VERSION,
        "size": size,
        "seed": seed,
        "fps": FPS,
        "frame_size": FRAME_SIZE,
        "vocabulary": {
            "colours": list(COLOURS),
            "shapes": list(SHAPES),
            "motions": {k: list(v) for k, v in MOTIONS.items()},
            "backgrounds": {k: list(v) for k, v in BACKGROUNDS.items()},
            "caption_types": list(CAPTION_TYPES),
        },
        "stats": {
            split: split_stats([v for v in videos if v["split"] == split], oracle=split != "train") for split in SIZES[size]
        },
        "videos": videos,
    }
    path = out / ANNOTATION_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(annotation, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def annotation_path(annotations: str | Path) -> Path:
    """Accept the annotation file itself or the directory holding ``annotations.json``."""
    path = Path(annotations)
    return path / ANNOTATION_FILE if path.is_dir() else path


def generator_version(annotations: str | Path) -> int | None:
    """The generator version recorded in an annotation file (None when there is none)."""
    path = annotation_path(annotations)
    if not path.is_file():
        return None
    return int(json.loads(path.read_text(encoding="utf-8")).get("generator_version", 0))


def read_records(videos: str | Path, annotations: str | Path) -> Iterator[VideoRecord]:
    """Prepare reader for the synthetic benchmark: one record per video of the annotation file."""
    path = annotation_path(annotations)
    if not path.is_file():
        raise FileNotFoundError(f"no synthetic annotation file at {path}: run `tvr-bench synth` first (data_cards/synthetic.md)")
    data = json.loads(path.read_text(encoding="utf-8"))
    for video in data["videos"]:
        yield VideoRecord(
            video_id=video["video_id"],
            path=Path(videos) / video["file"],
            captions=list(video["captions"]),
            split=video["split"],
            meta={
                "background": video["background"],
                "events": [{k: e[k] for k in ("colour", "shape", "motion", "start_frame", "num_frames")} for e in video["events"]],
                "caption_types": [info["type"] for info in video["caption_info"]],
            },
        )
