"""Shards read from a URL or a `pipe:` command (object storage / HTTP through WebDataset's openers)."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from pathlib import Path

import pytest
import torch

from tests.data_fixtures import tiny_root  # noqa: F401 - pytest fixture
from tvr_bench.data.datamodule import RetrievalDataModule
from tvr_bench.data.streams import is_remote, load_split, remote_join


def _test_pass(root: str) -> dict[str, object]:
    """Keys, captions and frames of one pass over the test split from `root` (one process)."""
    dm = RetrievalDataModule(root=root, num_workers=0, eval_batch_size=5, image_size=64)
    batches = list(dm.test_dataloader())
    assert len(batches) == len(dm.test_dataloader())
    return {
        "keys": [k for b in batches for k in b["video_key"]],
        "captions": [c for b in batches for c in b["captions"]],
        "frames": torch.cat([b["frames"] for b in batches]),
    }


def test_remote_root_helpers() -> None:
    """URL and pipe roots are recognised and joined; a pipe root without `{}` is refused."""
    assert is_remote("https://host/bucket/msrvtt") and is_remote("pipe:cat /x/{}") and is_remote("gs://b/p")
    assert not is_remote("data/synthetic-tiny") and not is_remote(Path("/abs/path"))
    assert remote_join("https://host/msrvtt/", "test/index.json") == "https://host/msrvtt/test/index.json"
    assert remote_join("pipe:aws s3 cp s3://b/msrvtt/{} -", "test/shard-00000.tar") == "pipe:aws s3 cp s3://b/msrvtt/test/shard-00000.tar -"
    with pytest.raises(ValueError, match="needs a"):
        remote_join("pipe:cat /x", "test/index.json")


def test_pipe_root_streams_the_same_batches(tiny_root: Path) -> None:  # noqa: F811
    """`pipe:cat {root}/{}` yields exactly the batches of the local folder."""
    local = _test_pass(str(tiny_root))
    piped = _test_pass(f"pipe:cat {tiny_root}/{{}}")
    assert piped["keys"] == local["keys"] and piped["captions"] == local["captions"]
    assert torch.equal(piped["frames"], local["frames"])
    shards = load_split(f"pipe:cat {tiny_root}/{{}}", "test", "synthetic")
    assert shards.urls == [f"pipe:cat {tiny_root}/test/shard-00000.tar"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="WebDataset opens http(s) URLs with curl")
def test_http_root_streams_the_same_batches(tiny_root: Path) -> None:  # noqa: F811
    """An HTTP root (a local server here) yields exactly the batches of the local folder."""
    handler = functools.partial(_QuietHandler, directory=str(tiny_root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        remote, local = _test_pass(url), _test_pass(str(tiny_root))
        assert remote["keys"] == local["keys"] and torch.equal(remote["frames"], local["frames"])
        with pytest.raises(FileNotFoundError, match="cannot read"):
            load_split(url, "no-such-split", "synthetic")
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Static files without request logging."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        """Drop the access log."""
