"""Qualitative results of a test: sampled text queries with a frame strip of their correct video, the top-5
retrieved videos (frame strips and scores) and the rank of the correct one, as a self-contained HTML page
(JPEG data URIs, no external file) and as a W&B table; plus per-query rank histograms.

The frames are read back from the test split's shards (the stored JPEGs of the few videos shown), so
nothing is kept in memory during the test itself.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tvr_bench.loggers import staging_in_run
from tvr_bench.results import atomic_write

STRIP_FRAMES = 4
STRIP_HEIGHT = 64
#: frames per row of a strip: 4 frames in 2 rows keep the page's 7 image columns within 1,400 px
STRIP_PER_ROW = 2
#: the window width the page fits without horizontal scrolling (wider strips shrink to their column)
PAGE_WIDTH_PX = 1400
JPEG_QUALITY = 70
#: (frames, height, JPEG quality) of the strips, tried in order until the page fits PAGE_BUDGET
STRIP_SETTINGS = ((STRIP_FRAMES, STRIP_HEIGHT, JPEG_QUALITY), (3, 56, 55), (2, 48, 40), (1, 40, 30))
#: the page stays below this size (the issue asks < 5 MB for 50 queries)
PAGE_BUDGET = 4_500_000

__all__ = ["QueryView", "frame_strip", "read_videos", "render_html", "sample_queries", "qualitative_for_run"]


@dataclass
class QueryView:
    """One row of the page: a text query, its correct video, rank and the top retrieved videos with scores."""

    caption_key: str
    text: str
    video_key: str
    rank: int
    top: list[tuple[str, float]] = field(default_factory=list)


def sample_queries(n_text: int, n: int, seed: int = 0) -> np.ndarray:
    """`n` distinct text query indices drawn uniformly (seeded), in increasing order."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_text, size=min(n, n_text), replace=False))


def frame_strip(jpegs: list[bytes], frames: int = STRIP_FRAMES, height: int = STRIP_HEIGHT,
                per_row: int = STRIP_PER_ROW) -> Any:
    """A PIL image of `frames` evenly spaced frames, each `height` pixels high, `per_row` side by side per row
    (in time order: left to right, then top to bottom), 2 pixels of white between them."""
    from PIL import Image

    picks = np.linspace(0, len(jpegs) - 1, num=min(frames, len(jpegs))).round().astype(int)
    images = []
    for i in picks:
        with Image.open(io.BytesIO(jpegs[int(i)])) as img:
            img = img.convert("RGB")
            width = max(1, round(img.width * height / img.height))
            images.append(img.resize((width, height)))
    rows = [images[r : r + per_row] for r in range(0, len(images), max(1, per_row))]
    width = max(sum(im.width for im in row) + 2 * (len(row) - 1) for row in rows)
    strip = Image.new("RGB", (width, height * len(rows) + 2 * (len(rows) - 1)), "white")
    for r, row in enumerate(rows):
        x = 0
        for im in row:
            strip.paste(im, (x, r * (height + 2)))
            x += im.width + 2
    return strip


def _jpeg_data_uri(image: Any, quality: int = JPEG_QUALITY) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def read_videos(urls: Iterable[str], keys: set[str]) -> dict[str, tuple[list[str], list[bytes]]]:
    """`{video key: (captions, frame JPEGs)}` for `keys`, read from the shards at `urls` (stops when all are found)."""
    import webdataset as wds

    from tvr_bench.data.shards import parse_sample

    found: dict[str, tuple[list[str], list[bytes]]] = {}
    for url in urls:
        dataset = wds.WebDataset(str(url), shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
        for sample in dataset:
            if sample["__key__"] in keys and sample["__key__"] not in found:
                meta, jpegs = parse_sample(sample)
                found[sample["__key__"]] = (list(meta["captions"]), jpegs)
        if len(found) == len(keys):
            break
    missing = sorted(keys - set(found))
    if missing:
        raise KeyError(f"{len(missing)} video(s) not found in the test shards, e.g. {missing[:3]}")
    return found


def rank_histogram_png(ranks: dict[str, np.ndarray]) -> bytes:
    """PNG of the per-query rank histograms (one panel per direction, log-scaled rank axis)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(ranks), 2.8), dpi=90)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(ranks), squeeze=False)[0]
    for ax, (name, r) in zip(axes, ranks.items()):
        top = int(r.max())
        bins = np.unique(np.geomspace(1, top + 1, num=min(40, top + 1)).round())
        ax.hist(r, bins=bins, color="C0")
        ax.set_xscale("log")
        ax.set_title(f"{name}: rank of the correct item ({len(r)} queries)", fontsize=9)
        ax.set_xlabel("rank (log scale)")
        ax.set_ylabel("queries")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def render_html(title: str, views: list[QueryView], strips: dict[str, str], histogram_png: bytes | None = None,
                summary: str = "", strip_frames: int = STRIP_FRAMES) -> str:
    """The self-contained page: one table row per query; `strips` maps video keys to JPEG data URIs."""
    esc = html.escape
    rows = []
    for v in views:
        cells = []
        for key, score in v.top:
            mark = " correct" if key == v.video_key else ""
            cells.append(f'<td class="cand{mark}"><img src="{strips[key]}" alt="{esc(key)}"><br>'
                         f"{esc(key)}<br>score {score:.4f}</td>")
        rank_class = "hit" if v.rank == 1 else ("near" if v.rank <= len(v.top) else "miss")
        rows.append(
            f'<tr><td class="query">{esc(v.text)}<br><small>{esc(v.caption_key)}</small></td>'
            f'<td class="rank {rank_class}">{v.rank}</td>'
            f'<td class="cand correct"><img src="{strips[v.video_key]}" alt="{esc(v.video_key)}"><br>{esc(v.video_key)}</td>'
            + "".join(cells) + "</tr>"
        )
    k = max((len(v.top) for v in views), default=5)
    head = "".join(f"<th>top {i + 1}</th>" for i in range(k))
    hist = f'<h2>Rank histograms</h2><img class="hist" src="{_png_data_uri(histogram_png)}" alt="rank histograms">' \
        if histogram_png else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
table {{ border-collapse: collapse; table-layout: fixed; width: 100%; }}
col.query {{ width: 16em; }} col.rank {{ width: 3.5em; }}
td, th {{ border: 1px solid #ccc; padding: 4px; vertical-align: top; font-size: 12px; overflow-wrap: anywhere; }}
td img, img.hist {{ max-width: 100%; height: auto; }}
td.rank {{ font-weight: bold; text-align: center; }}
td.hit {{ background: #d4f7d4; }} td.near {{ background: #fff3c4; }} td.miss {{ background: #f7d4d4; }}
td.correct img {{ outline: 3px solid #2a2; }}
</style></head><body>
<h1>{esc(title)}</h1>
<p>{esc(summary)}</p>
<p>Each row: a text query sampled from the test set, the rank of its correct video (1 = retrieved first), the
correct video (green frame), then the five best-scoring videos with their scores; a green frame marks the
correct video among them. Frame strips show {strip_frames} evenly spaced stored frame(s), left to right, then top
to bottom; in a window narrower than the table, they shrink to fit.</p>
<table><colgroup><col class="query"><col class="rank"><col span="{k + 1}"></colgroup>
<thead><tr><th>query</th><th>rank</th><th>correct video</th>{head}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
{hist}
</body></html>
"""


def qualitative_for_run(per_query: dict[str, Any], datamodule: Any, html_path: str | Path, n_queries: int = 50,
                        title: str = "qualitative results", wandb_runs: list[Any] | None = None,
                        seed: int = 0, max_bytes: int = PAGE_BUDGET) -> Path:
    """Write the page for the evaluator's `last_per_query` (frames from the datamodule's test shards) and log
    the same rows as a W&B table `qualitative` plus the rank histogram image to every run in `wandb_runs`."""
    video_keys = list(per_query["video_keys"])
    caption_keys = list(per_query["caption_keys"])
    text_to_video = np.asarray(per_query["text_to_video"])
    t2v_rank = np.asarray(per_query["t2v_rank"])
    top_index = np.asarray(per_query["top_index"])
    top_score = np.asarray(per_query["top_score"], dtype=np.float64)
    chosen = sample_queries(len(caption_keys), n_queries, seed)
    needed = {video_keys[int(text_to_video[i])] for i in chosen} | {video_keys[int(j)] for i in chosen for j in top_index[i]}
    split = getattr(datamodule, "test_split", "test")
    videos = read_videos(datamodule.split_shards(split).urls, needed)
    paragraph = getattr(datamodule, "caption_mode", "each") == "paragraph"
    views = []
    for i in chosen:
        key = caption_keys[int(i)]
        vkey = video_keys[int(text_to_video[i])]
        captions = videos[vkey][0]
        _, _, tail = key.rpartition("#")
        text = " ".join(captions) if paragraph else (captions[int(tail)] if tail.isdigit() and int(tail) < len(captions) else key)
        top = [(video_keys[int(j)], float(s)) for j, s in zip(top_index[i], top_score[i])]
        views.append(QueryView(key, text, vkey, int(t2v_rank[i]), top))
    ranks = {"t2v": t2v_rank, "v2t": np.asarray(per_query["v2t_rank"])}
    histogram = rank_histogram_png(ranks)
    summary = (f"{len(views)} of {len(caption_keys)} text queries sampled uniformly (seed {seed}); "
               f"{len(video_keys)} videos in the gallery.")
    # smaller strips until the page fits the budget (natural frames fit at the first setting)
    for frames, height, quality in STRIP_SETTINGS:
        images = {k: frame_strip(videos[k][1], frames, height) for k in needed}
        strips = {k: _jpeg_data_uri(img, quality) for k, img in images.items()}
        page = render_html(title, views, strips, histogram, summary, frames)
        if len(page.encode("utf-8")) <= max_bytes:
            break
    path = atomic_write(html_path, page)
    for run in wandb_runs or []:
        log_wandb_table(run, views, images, histogram)
    return path


def log_wandb_table(run: Any, views: list[QueryView], images: dict[str, Any], histogram_png: bytes | None) -> None:
    """Log the rows as the W&B table `qualitative` (frame strips as images) and the histogram figure."""
    import wandb
    from PIL import Image

    k = max((len(v.top) for v in views), default=5)
    columns = ["caption_key", "query", "rank", "correct_video", "correct_frames"]
    for i in range(k):
        columns += [f"top{i + 1}_video", f"top{i + 1}_frames", f"top{i + 1}_score"]
    table = wandb.Table(columns=columns)
    for v in views:
        row: list[Any] = [v.caption_key, v.text, v.rank, v.video_key, wandb.Image(images[v.video_key], caption=v.video_key)]
        for key, score in v.top:
            row += [key, wandb.Image(images[key], caption=f"{key} ({score:.4f})"), score]
        row += [None] * (len(columns) - len(row))
        table.add_data(*row)
    payload: dict[str, Any] = {"qualitative": table}
    if histogram_png:
        with Image.open(io.BytesIO(histogram_png)) as img:
            payload["test/rank_histograms"] = wandb.Image(img.copy())
    # The run's own table file holds each image as the word "Image" (wandb issue #4611); wandb also logs every
    # table as a `run_table` artifact with its image files, which `wandb sync` uploads. Those files are staged
    # inside the run folder, so the folder alone carries them.
    with staging_in_run(run):
        run.log(payload)
