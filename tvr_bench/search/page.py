"""A self-contained HTML page of search results: per query its top-k videos as frame strips with scores.

The strips come from the qualitative page (`tvr_bench.qualitative.frame_strip`, JPEG data URIs, the same size
budget): frames of an indexed file are decoded again with the index's sampling, frames of a prepared video are
read back from its shard.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from tvr_bench.qualitative import PAGE_BUDGET, STRIP_SETTINGS, _jpeg_data_uri, frame_strip, read_videos
from tvr_bench.results import atomic_write
from tvr_bench.search.engine import SearchResult
from tvr_bench.search.store import StoredIndex


def _file_jpegs(stored: StoredIndex, rel: str, frames: int) -> list[bytes]:
    """`frames` evenly spaced frames of an indexed file among those its sampling picks, as JPEG bytes."""
    from tvr_bench.data.frames import sample_indices, uniform_pick
    from tvr_bench.data.shards import jpeg_bytes
    from tvr_bench.data.video import decode_video

    proto = stored.meta["protocol"]
    root = Path(stored.meta["source"]["root"])

    def choose(info: Any) -> list[int]:
        picked = sample_indices(proto["sampling"], info.num_frames, info.fps, int(proto["num_frames"]))
        return [picked[i] for i in uniform_pick(len(picked), frames)] if picked else []

    decoded = decode_video(root / rel, choose, 128)
    return [jpeg_bytes(image, 85) for image in decoded.images]


def strip_sources(stored: StoredIndex, rows: set[int], frames: int) -> dict[int, list[bytes]]:
    """Frame JPEGs of the given index rows (a row whose frames cannot be read again is left out)."""
    items = stored.items
    out: dict[int, list[bytes]] = {}
    if stored.meta["source"]["kind"] == "shards":
        root = Path(stored.meta["source"]["root"])
        by_shard: dict[str, dict[str, int]] = {}
        for row in rows:
            by_shard.setdefault(items[row]["source"], {})[items[row].get("sample", items[row]["key"])] = row
        for shard, keys in by_shard.items():
            try:
                found = read_videos([str(root / shard)], set(keys))
            except (KeyError, OSError):
                continue
            for key, row in keys.items():
                out[row] = found[key][1]
        return out
    for row in rows:
        try:
            out[row] = _file_jpegs(stored, str(items[row].get("source", items[row]["key"])), frames)
        except Exception:  # noqa: BLE001 - a file moved or deleted since indexing: no strip, the row stays
            continue
    return out


def render_page(title: str, results: list[SearchResult], strips: dict[int, str], meta: dict[str, Any]) -> str:
    """The page: one section per query, a table row per hit (rank, strip, key, score, first-stage score)."""
    esc = html.escape
    sections = []
    for result in results:
        rows = []
        for hit in result.hits:
            strip = f'<img src="{strips[hit.row]}" alt="{esc(hit.key)}">' if hit.row in strips else "<i>frames unavailable</i>"
            first = "" if hit.first_stage_score is None else f"{hit.first_stage_score:.4f}"
            dur = "" if hit.duration in (None, 0) else f"{hit.duration:.1f} s"
            rows.append(f"<tr><td class='rank'>{hit.rank}</td><td>{strip}</td><td>{esc(hit.key)}<br><small>"
                        f"{esc(hit.source)}</small></td><td>{hit.score:.4f}</td><td>{first}</td><td>{dur}</td></tr>")
        times = ", ".join(f"{k} {v:.1f} ms" for k, v in result.timings_ms.items())
        sections.append(
            f"<h2>{esc(result.query)}</h2><p>{esc(result.mode)}; {result.gallery:,} videos; {esc(times)}</p>"
            "<table><thead><tr><th>rank</th><th>frames</th><th>video</th><th>score</th><th>first-stage score</th>"
            f"<th>duration</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )
    info = (f"{meta.get('method')} ({meta.get('backbone')}), checkpoint {meta.get('checkpoint')}, fingerprint "
            f"{str(meta.get('fingerprint'))[:12]}; {meta.get('num_videos'):,} videos indexed from {meta['source']['root']}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 4px; vertical-align: middle; font-size: 12px; }}
td.rank {{ font-weight: bold; text-align: center; }}
</style></head><body>
<h1>{esc(title)}</h1>
<p>{esc(info)}</p>
{''.join(sections)}
</body></html>
"""


def write_page(results: list[SearchResult], stored: StoredIndex, path: str | Path, title: str = "tvr-bench search",
               max_bytes: int = PAGE_BUDGET) -> Path:
    """Write the results page (strips shrink, as on the qualitative page, until it fits `max_bytes`)."""
    rows = {hit.row for r in results for hit in r.hits}
    sources = strip_sources(stored, rows, STRIP_SETTINGS[0][0])
    page = ""
    for frames, height, quality in STRIP_SETTINGS:
        strips = {row: _jpeg_data_uri(frame_strip(jpegs, frames, height), quality) for row, jpegs in sources.items() if jpegs}
        page = render_page(title, results, strips, stored.meta)
        if len(page.encode("utf-8")) <= max_bytes:
            break
    return atomic_write(path, page)
