"""A many-caption prepared stream for the training-stream tests: real shards written by ``prepare``.

320 videos (the tiny synthetic mp4s, each used under several ids) with 20 captions each (MSR-VTT-like),
2 frames per video at short side 32, in shards of 40: built once per session by the project's own
``prepare`` (decoding the mp4s with PyAV, JPEG-encoding frames, writing tars and index.json).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest

from tests.data_fixtures import tiny_root  # noqa: F401 - pytest fixture
from tvr_bench.data.prepare import PrepareConfig, VideoRecord, prepare

VIDEOS, CAPTIONS = 320, 20


@lru_cache(maxsize=None)
def _build(base: str, tiny: str) -> Path:
    """Prepare the many-caption split under ``base`` (once)."""
    root = Path(base) / "many-captions"
    if (root / "train" / "index.json").is_file():
        return root
    videos = sorted((Path(tiny) / "raw" / "videos").glob("*.mp4"))
    records = [
        VideoRecord(
            video_id=f"v{i:04d}",
            path=videos[i % len(videos)],
            captions=[f"caption {j} of video {i}" for j in range(CAPTIONS)],
            split="train",
        )
        for i in range(VIDEOS)
    ]
    config = PrepareConfig(dataset="synthetic", num_frames=2, sampling="segment_middle", short_side=32, jpeg_quality=80, shard_size=40)
    prepare(records, root, config, source_root=Path(tiny) / "raw" / "videos", workers=2, progress=False)
    return root


@pytest.fixture(scope="session")
def many_captions_root(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """Prepared shards: split ``train`` with 320 videos x 20 captions, 2 frames each; treat as read-only."""
    return _build(str(tmp_path_factory.getbasetemp() / "tvr-stream-data"), str(tiny_root))
