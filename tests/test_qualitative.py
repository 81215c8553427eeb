"""The qualitative page: self-contained HTML whose every image decodes, under 5 MB for 50 queries, and (when a
Debian chromium is installed) rendered by a real headless browser with every image loaded."""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from tvr_bench.callbacks.evaluator import per_query_results
from tvr_bench.data.shards import encode_sample
from tvr_bench.qualitative import PAGE_BUDGET, PAGE_WIDTH_PX, qualitative_for_run, sample_queries

#: Debian's chromium (CI installs it); TVR_CHROMIUM names another headless-capable chromium binary or wrapper
CHROMIUM = Path(os.environ.get("TVR_CHROMIUM", "/usr/bin/chromium"))


class _Images(HTMLParser):
    """Collects every <img src> and counts table rows."""

    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.rows = 0
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.srcs.append(attrs.get("src") or "")
        if tag == "tr":
            self.rows += 1
        for name in ("href", "src"):
            if attrs.get(name) and not attrs[name].startswith("data:"):
                self.external.append(attrs[name])


@dataclass
class _Split:
    urls: list[str]


class _ShardsOnly:
    """The part of a datamodule the page needs: the test split's shard URLs and the caption mode."""

    test_split = "test"
    caption_mode = "each"

    def __init__(self, urls: list[str]) -> None:
        self._urls = urls

    def split_shards(self, split: str) -> _Split:
        return _Split(self._urls)


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _shards(tmp: Path, n_videos: int, noise: bool, captions: int = 2, frames: int = 8, width: int = 224) -> list[str]:
    """A shard of `n_videos` videos of 224 px high frames (`width` wide): random noise (worst case for JPEG) or
    smooth gradients."""
    rng = np.random.default_rng(0)
    path = tmp / "test-000000.tar"
    with wds.TarWriter(str(path)) as sink:
        for v in range(n_videos):
            jpegs = []
            for f in range(frames):
                if noise:
                    array = rng.integers(0, 256, size=(224, width, 3), dtype=np.uint8)
                else:
                    y, x = np.mgrid[0:224, 0:width]
                    array = np.stack([(x + 7 * v) % 256, (y + 13 * f) % 256, (x + y + v) % 256], axis=-1).astype(np.uint8)
                jpegs.append(_jpeg(array))
            meta = {"captions": [f"video {v} caption {j} <b>&</b>" for j in range(captions)], "num_frames": frames}
            sink.write(encode_sample(f"vid{v:04d}", jpegs, meta))
    return [str(path)]


def _per_query(n_videos: int, captions: int = 2, seed: int = 0) -> dict:
    t2v = torch.arange(n_videos).repeat_interleave(captions)
    sim = torch.randn(len(t2v), n_videos, generator=torch.Generator().manual_seed(seed))
    sim[torch.arange(len(t2v)), t2v] += 2.0
    video_keys = [f"vid{v:04d}" for v in range(n_videos)]
    caption_keys = [f"vid{v:04d}#{j % captions}" for j, v in enumerate(t2v.tolist())]
    return per_query_results(sim, t2v, video_keys, caption_keys)


def _check_page(path: Path, n_queries: int) -> _Images:
    text = path.read_text()
    parser = _Images()
    parser.feed(text)
    assert parser.rows == n_queries + 1  # header + one row per query
    assert not parser.external, f"the page must be self-contained, found {parser.external[:3]}"
    assert len(parser.srcs) >= n_queries * 6 + 1  # correct video + top 5 per row, the histogram
    for src in set(parser.srcs):
        match = re.fullmatch(r"data:image/(jpeg|png);base64,([A-Za-z0-9+/=]+)", src)
        assert match, src[:80]
        with Image.open(io.BytesIO(base64.b64decode(match.group(2)))) as img:
            img.verify()  # every image decodes
    return parser


def test_sample_queries_is_seeded_and_distinct():
    a = sample_queries(1000, 50, seed=3)
    assert len(set(a.tolist())) == 50 and (np.diff(a) > 0).all()
    assert (a == sample_queries(1000, 50, seed=3)).all() and len(sample_queries(10, 50)) == 10


def test_page_for_50_queries_is_self_contained_and_small(tmp_path):
    n_videos = 200
    per_query = _per_query(n_videos)
    path = qualitative_for_run(per_query, _ShardsOnly(_shards(tmp_path, n_videos, noise=False, frames=4)),
                               tmp_path / "run" / "qualitative.html", 50, "toy <run>", seed=1)
    assert path.stat().st_size < 5 * 2**20
    _check_page(path, 50)
    text = path.read_text()
    assert "toy &lt;run&gt;" in text and "caption 1 &lt;b&gt;&amp;&lt;/b&gt;" in text  # escaped text
    chosen = sample_queries(2 * n_videos, 50, 1)
    first = per_query["caption_keys"][chosen[0]]
    assert first in text and f">{int(per_query['t2v_rank'][chosen[0]])}</td>" in text  # rank shown


def test_page_stays_under_the_budget_with_incompressible_frames(tmp_path):
    """Noise frames (far worse than real video for JPEG): the strips shrink until the page fits."""
    n_videos = 300
    shards = _ShardsOnly(_shards(tmp_path, n_videos, noise=True, frames=4))
    path = qualitative_for_run(_per_query(n_videos, captions=1, seed=2), shards, tmp_path / "q.html", 50, "noise")
    assert path.stat().st_size <= PAGE_BUDGET < 5 * 2**20
    _check_page(path, 50)
    small = qualitative_for_run(_per_query(n_videos, captions=1, seed=2), shards, tmp_path / "small.html", 50,
                                "noise", max_bytes=path.stat().st_size // 2)
    assert small.stat().st_size <= path.stat().st_size // 2  # a smaller budget: fewer, smaller frames
    assert "Frame strips show 4 " not in small.read_text()
    _check_page(small, 50)


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no {CHROMIUM} here (Debian package `chromium`; CI installs it)")
@pytest.mark.parametrize("frame_width", [224, 398])  # square frames, and 16:9 ones (the widest strips)
def test_page_renders_in_headless_chromium_and_fits_1400_px(tmp_path, frame_width):
    """Every image decodes in a real browser, and at 1,400 px the page needs no horizontal scrolling (the top-5
    columns shrink their strips instead of running off the right edge)."""
    n_videos = 60
    shards = _ShardsOnly(_shards(tmp_path, n_videos, noise=False, width=frame_width))
    path = qualitative_for_run(_per_query(n_videos), shards, tmp_path / "q.html", 50, "browser")
    probe = tmp_path / "probe.html"  # the page plus a script reporting, after load, images decoded and widths
    script = ("<script>window.addEventListener('load', () => { const imgs = [...document.images];"
              "const root = document.documentElement;"
              "const strips = imgs.filter(i => i.closest('td.cand')).map(i => i.getBoundingClientRect().width / i.naturalWidth);"
              "document.title = 'IMAGES ' + imgs.filter(i => i.complete && i.naturalWidth > 0).length + '/' + imgs.length"
              " + ' SCROLL ' + root.scrollWidth + ' VIEW ' + root.clientWidth + ' STRIP ' + Math.min(...strips).toFixed(3);"
              "});</script>")
    probe.write_text(path.read_text().replace("</body>", script + "</body>"))
    out = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
         f"--window-size={PAGE_WIDTH_PX},1000", "--virtual-time-budget=20000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    match = re.search(r"<title>IMAGES (\d+)/(\d+) SCROLL (\d+) VIEW (\d+) STRIP ([\d.]+)</title>", out.stdout)
    assert match, f"chromium gave no result: rc={out.returncode} {out.stderr[-500:]}"
    loaded, total, scroll, view = map(int, match.groups()[:4])
    assert total >= 50 * 6 + 1 and loaded == total
    assert view == PAGE_WIDTH_PX and scroll <= view, f"the page is {scroll} px wide in a {view} px window"
    assert float(match.group(5)) >= (1.0 if frame_width == 224 else 0.6)  # square frames at full size; 16:9 shrink a little
