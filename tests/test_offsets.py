"""Random access to prepared shards (tvr_bench/data/offsets.py): the offsets index prepare writes, the same index
built on first use for shards prepared before it existed, reads equal to streaming, clear errors (file, key) for
corrupt or truncated members, pax headers, and remote roots copied into a local cache for training."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.data_fixtures import tiny_root  # noqa: F401 - pytest fixture
from tvr_bench.data import offsets as offsets_module
from tvr_bench.data.datamodule import RetrievalDataModule
from tvr_bench.data.offsets import OFFSETS_FILE, SampleReader, build_offsets, load_offsets, scan_shard
from tvr_bench.data.shards import INDEX_FILE, ShardError, iter_shard, read_index, sha256_file


def _copy(tiny_root: Path, dest: Path, split: str = "train") -> Path:  # noqa: F811
    shutil.copytree(tiny_root / split, dest / split)
    shutil.copy(tiny_root / "manifest.json", dest / "manifest.json")
    return dest


def _train_keys(root: str, **kw: object) -> list[tuple[str, ...]]:
    args: dict = dict(root=root, dataset="synthetic", num_frames=2, image_size=32, batch_size=16, num_workers=0,
                      val_split=None, train_stream="pairs")  # fmt: skip
    dm = RetrievalDataModule(**{**args, **kw})
    dm.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=0)
    return [tuple(b["video_key"]) + tuple(b["captions"]) for b in dm.train_dataloader()]


def test_prepare_writes_the_index_and_reads_equal_streaming(tiny_root: Path) -> None:  # noqa: F811
    """offsets.json of every split lists each sample's byte range; reading by offset gives the streamed samples."""
    for split in ("train", "val", "test"):
        payload = json.loads((tiny_root / split / OFFSETS_FILE).read_text())
        index = read_index(tiny_root / split)
        assert [s["file"] for s in payload["shards"]] == [e["file"] for e in index["shards"]]
        assert [len(s["samples"]) for s in payload["shards"]] == [e["num_samples"] for e in index["shards"]]
    offsets = load_offsets(tiny_root / "train")
    reader = SampleReader(offsets)
    streamed = [s for e in read_index(tiny_root / "train")["shards"] for s in iter_shard(tiny_root / "train" / e["file"])]
    assert offsets.num_samples == len(streamed) == 48 and offsets.captions.sum() == 240
    for i in (0, 17, 47):
        raw = reader.raw(i)
        assert raw["__key__"] == streamed[i]["__key__"] and raw["__url__"] == offsets.files[offsets.shard[i]]
        assert {k: v for k, v in raw.items() if not k.startswith("__")} == {k: v for k, v in streamed[i].items() if not k.startswith("__")}


def test_shards_prepared_before_the_index_build_it_on_first_use(tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Without offsets.json (an older preparation), the first training loader builds the same index and writes it;
    a read-only split keeps it in memory; an index of other shards (sha256) is rebuilt."""
    root = _copy(tiny_root, tmp_path / "old")
    (root / "train" / OFFSETS_FILE).unlink()
    assert _train_keys(str(root)) == _train_keys(str(tiny_root))
    assert json.loads((root / "train" / OFFSETS_FILE).read_text()) == json.loads((tiny_root / "train" / OFFSETS_FILE).read_text())
    stale = json.loads((root / "train" / OFFSETS_FILE).read_text())
    stale["shards"][0]["sha256"] = "0" * 64
    (root / "train" / OFFSETS_FILE).write_text(json.dumps(stale))
    assert load_offsets(root / "train").num_samples == 48
    assert json.loads((root / "train" / OFFSETS_FILE).read_text())["shards"][0]["sha256"] != "0" * 64
    (root / "train" / OFFSETS_FILE).unlink()
    monkeypatch.setattr(offsets_module, "write_offsets", _read_only)  # a dataset directory nobody may write to
    assert _train_keys(str(root)) == _train_keys(str(tiny_root))
    assert not (root / "train" / OFFSETS_FILE).exists()


def _read_only(split_dir: Path, index: dict | None = None) -> dict:
    raise PermissionError(13, "Permission denied", str(split_dir / OFFSETS_FILE))


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x20
    path.write_bytes(bytes(data))


def test_corrupt_or_truncated_members_name_the_shard_and_key(tiny_root: Path, tmp_path: Path) -> None:  # noqa: F811
    """Found during random access: a truncated shard, a corrupt member header and a corrupt JPEG each stop the
    training loader with a ShardError naming the shard file and the sample's key."""
    root = _copy(tiny_root, tmp_path / "root")
    offsets = load_offsets(root / "train")
    shard = Path(offsets.files[1])
    first = [i for i in range(offsets.num_samples) if offsets.shard[i] == 1]
    last_key, header_key = offsets.keys[first[-1]], offsets.keys[first[3]]

    shard.write_bytes(shard.read_bytes()[: int(offsets.offset[first[-1]]) + 700])  # the shard's last sample cut off
    with pytest.raises(ShardError) as info:
        _train_keys(str(root))
    assert str(shard) in str(info.value) and repr(last_key) in str(info.value) and "truncated" in str(info.value)

    shutil.rmtree(root / "train")
    _copy(tiny_root, root)
    _flip(shard, int(offsets.offset[first[3]]) + 3)  # a byte of the member name: the header checksum fails
    with pytest.raises(ShardError) as info:
        _train_keys(str(root))
    assert str(shard) in str(info.value) and repr(header_key) in str(info.value) and "corrupt" in str(info.value)

    shutil.rmtree(root / "train")
    _copy(tiny_root, root)
    with tarfile.open(shard) as tar:
        jpeg = next(m for m in tar.getmembers() if m.name == f"{header_key}.000.jpg")
    shard.write_bytes(shard.read_bytes()[: jpeg.offset_data + 2] + b"\x00" * 64 + shard.read_bytes()[jpeg.offset_data + 66 :])
    with pytest.raises(ShardError) as info:
        _train_keys(str(root))
    assert str(shard) in str(info.value) and repr(header_key) in str(info.value) and "undecodable frame" in str(info.value)


def test_scan_of_a_corrupt_shard_names_it(tiny_root: Path, tmp_path: Path) -> None:  # noqa: F811
    root = _copy(tiny_root, tmp_path / "root")
    (root / "train" / OFFSETS_FILE).unlink()
    shard = root / "train" / "shard-00001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ShardError, match="corrupt or truncated shard") as info:
        build_offsets(root / "train", read_index(root / "train"))
    assert str(shard) in str(info.value)


def test_pax_headers_long_keys_are_read(tmp_path: Path) -> None:
    """A key longer than a ustar name (pax header): the index and the reads go through tarfile."""
    key = "k" * 120
    meta = {"captions": ["a long one"], "num_frames": 1}
    path = tmp_path / "shard-00000.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in ((f"{key}.000.jpg", b"\xff\xd8jpeg"), (f"{key}.json", json.dumps(meta).encode()), ("short.000.jpg", b"x"),
                           ("short.json", json.dumps(meta).encode())):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = scan_shard(path)
    assert [s[0] for s in samples] == [key, "short"] and [s[3] for s in samples] == [1, 1]
    index = {"shards": [{"file": path.name, "num_samples": 2, "sha256": sha256_file(path), "bytes": path.stat().st_size}]}
    (tmp_path / INDEX_FILE).write_text(json.dumps({**index, "num_samples": 2, "num_captions": 2}))
    reader = SampleReader(load_offsets(tmp_path))
    assert reader.raw(0)["000.jpg"] == b"\xff\xd8jpeg" and reader.raw(1)["000.jpg"] == b"x"


def test_pipe_root_trains_on_the_same_batches_through_a_local_cache(tiny_root: Path, tmp_path: Path) -> None:  # noqa: F811
    """A `pipe:` root: the train split is copied into cache_dir once (sha256 checked), then read by offset: the
    batches of the local folder. A shard that differs from index.json is refused naming its URL."""
    cache = tmp_path / "cache"
    piped = _train_keys(f"pipe:cat {tiny_root}/{{}}", cache_dir=str(cache))
    assert piped == _train_keys(str(tiny_root))
    [split_dir] = list(cache.glob("*/train"))
    assert sorted(p.name for p in split_dir.glob("shard-*.tar")) == sorted(p.name for p in (tiny_root / "train").glob("shard-*.tar"))
    assert (split_dir / OFFSETS_FILE).is_file()
    assert _train_keys(f"pipe:cat {tiny_root}/{{}}", cache_dir=str(cache)) == piped  # from the cache

    root = _copy(tiny_root, tmp_path / "remote")
    _flip(root / "train" / "shard-00002.tar", 5000)
    with pytest.raises(ShardError, match="sha256") as info:
        _train_keys(f"pipe:cat {root}/{{}}", cache_dir=str(tmp_path / "cache2"))
    assert "shard-00002.tar" in str(info.value)
