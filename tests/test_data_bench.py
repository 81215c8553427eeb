"""Data benchmarks of `tvr-bench perf`: the data-memory helpers and the data sections' Markdown."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.data_fixtures import tiny_root  # noqa: F401 - pytest fixture
from tvr_bench.perf.data_bench import measure_loader_memory, process_tree, tree_memory
from tvr_bench.perf.harness import TARGETS
from tvr_bench.perf.run import render_markdown


def test_process_tree_and_memory_count_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 << 20); time.sleep(5)"])
    try:
        import time

        time.sleep(1.0)
        assert child.pid in process_tree()
        pss, rss = tree_memory()
        assert pss > 64 << 20 and rss >= pss
    finally:
        child.kill()
        child.wait()


def test_measure_loader_memory_on_prepared_shards(tiny_root: Path) -> None:  # noqa: F811
    run = measure_loader_memory(str(tiny_root), 4, 2, 4, 3, dataset="synthetic", image_size=64)
    assert run["batches"] == 3 and run["workers"] == 2
    assert run["peak_pss_gib"] >= run["baseline_pss_gib"] > 0 and run["peak_rss_sum_gib"] > 0
    assert run["prefetch_factor"] == 2 and run["batches_in_flight_max"] == 5  # 2 per worker + the one handed out


def test_data_sections_markdown() -> None:
    rates = {"per_item_decoder": 1.0, "per_item_sequential": 4.0, "jpeg_ceiling": 100.0, "datamodule_0_workers": 85.0,
             "datamodule_1_worker": 80.0, "datamodule_2_workers": 150.0}  # fmt: skip
    data = {"clips_per_s": rates, "setup": {"clip": "c"},
            "ratios": {"datamodule_vs_per_item": 85.0, "datamodule_vs_per_item_sequential": 21.0, "datamodule_vs_ceiling": 0.85,
                       "datamodule_2w_vs_per_item": 150.0, "datamodule_2w_vs_ceiling": 1.5, "datamodule_2w_vs_1w": 1.875},
            "targets_met": {"vs_per_item_decoder": True, "vs_jpeg_ceiling": True, "2_vs_1_worker": True}}  # fmt: skip
    run = {"frames": 64, "batch_size": 16, "peak_pss_gib": 3.4, "peak_rss_sum_gib": 5.7, "uint8_batch_mib": 147.0, "batches_in_flight_max": 17}
    memory = {"runs": {"64_frames": run}, "targets_met": {"64_frames": False}, "targets_gib": {"64_frames": 3.0}, "note": "how"}
    result = {"machine": {"cpu": "x", "cpu_count": 2, "torch": "t", "torch_threads": 1}, "command": "perf", "load_start": [1.0],
              "load_end": [1.0], "seconds": 1.0, "quick": True, "sections": {"data": data, "data-memory": memory}}  # fmt: skip
    md = render_markdown(result)
    assert "| shard DataModule, 1 worker | 80.00 |" in md and "**1.88×** the 1-worker rate" in md
    assert f"≥ {TARGETS['data_vs_jpeg_ceiling']} of the ceiling ✓" in md
    assert "## Data memory" in md and "| 64 | 16 | 3.40 | 5.70 | 147 | ≤ 17 | ≤ 3 GiB ✗ |" in md
    assert "| training loader, 0 workers (global order, reads by offset) | n/a |" in md  # a result from before the row
