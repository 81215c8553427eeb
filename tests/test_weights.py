"""CLIP weights as a new user meets them: a hub name that is neither cached nor downloadable (no network, or
HF_HUB_OFFLINE=1) ends in one `error:` line naming the model, the cache and the two ways out (exit 2), for the
weights, for the tokenizer, and before any data work; weights from a local save_pretrained directory train in
train mode (no Lightning "module(s) in eval mode" warning). No test touches the network: the hub endpoint is a
closed port on this machine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from huggingface_hub import constants
from transformers import CLIPModel

from tvr_bench.backbones.clip import PRESETS, WeightsUnavailableError, hub_unreachable, load_clip, weights_problem
from tvr_bench.backbones.tokenizer import offline_clip_tokenizer
from tvr_bench.optim import REFERENCE_ADAM_ARGS

REPO = Path(__file__).resolve().parents[1]
HUB_NAME = "openai/clip-vit-base-patch32"


def _closed_port() -> int:
    """A local TCP port nobody listens on (bound, then released): connecting to it is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(params=["unreachable", "hf_hub_offline"])
def no_hub(request, tmp_path, monkeypatch) -> str:
    """An empty Hugging Face cache and a hub that cannot be had: a closed local port, or HF_HUB_OFFLINE=1."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", request.param == "hf_hub_offline")
    return request.param


def _assert_the_message(text: str, what: str, mode: str) -> None:
    """One line naming the model, the cache, why, and both ways out."""
    assert "\n" not in text.strip()
    assert f"CLIP {what} '{HUB_NAME}'" in text and "not in the local Hugging Face cache" in text
    assert constants.HF_HUB_CACHE in text
    assert ("HF_HUB_OFFLINE is set" if mode == "hf_hub_offline" else "cannot be reached") in text
    assert "local directory made with save_pretrained" in text and "machine with hub access" in text
    assert "--model.init_args.backbone" in text


def _small_clip_dir(path: Path, tokenizer: bool = False) -> Path:
    """A small random CLIP (the `tiny` preset) saved with save_pretrained, optionally with OpenAI's tokenizer."""
    torch.manual_seed(0)
    CLIPModel(PRESETS["tiny"].config()).save_pretrained(path)
    if tokenizer:
        offline_clip_tokenizer().save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------ weights
def test_hub_weights_that_cannot_be_had_are_one_line(no_hub: str) -> None:
    why = hub_unreachable()
    assert why is not None and ("HF_HUB_OFFLINE" in why if no_hub == "hf_hub_offline" else "Connection refused" in why)
    _assert_the_message(weights_problem(HUB_NAME) or "", "weights and tokenizer", no_hub)
    with pytest.raises(WeightsUnavailableError) as err:
        load_clip(HUB_NAME)
    _assert_the_message(str(err.value), "weights", no_hub)
    assert err.value.__cause__ is None  # no chained traceback behind the line


def test_tokenizer_missing_from_the_cache_is_one_line(no_hub: str, tmp_path: Path) -> None:
    """Weights in the hub cache but no tokenizer files: transformers would build an empty tokenizer (ids
    [0, 2, 2, ...]) without a word; we stop with the tokenizer's own message."""
    snapshot = Path(constants.HF_HUB_CACHE) / f"models--{HUB_NAME.replace('/', '--')}" / "snapshots" / ("0" * 40)
    _small_clip_dir(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    _assert_the_message(weights_problem(HUB_NAME) or "", "tokenizer", no_hub)
    with pytest.raises(WeightsUnavailableError) as err:
        load_clip(HUB_NAME)
    _assert_the_message(str(err.value), "tokenizer", no_hub)


def test_local_directory_problems_name_the_directory(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no config.json" in (weights_problem(str(empty)) or "")
    with pytest.raises(WeightsUnavailableError, match="not a CLIP directory made with CLIPModel.save_pretrained"):
        load_clip(str(empty))
    broken = _small_clip_dir(tmp_path / "broken")
    (broken / "vocab.json").write_text("{}")  # tokenizer files that hold no vocabulary
    (broken / "merges.txt").write_text("#version: 0.2\n")
    assert weights_problem(str(broken)) is None  # the weights are there
    with pytest.raises(WeightsUnavailableError, match=r"tokenizer of '.*broken' is empty"):
        load_clip(str(broken))


def test_cli_names_missing_weights_and_shards_at_once(no_hub: str, tmp_path: Path, monkeypatch, capsys) -> None:
    """PROFILE=paper on a benchmark that is not prepared: the weights are checked before any data work, and
    both missing pieces are named, one `error:` line each; exit 2."""
    from tvr_bench.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["tvr-bench"])
    recipes = REPO / "recipes"
    argv = ["fit", "--config", str(recipes / "base.yaml"), "--config", str(recipes / "methods" / "xpool.yaml"),
            "--config", str(recipes / "data" / "msrvtt.yaml"), "--config", str(recipes / "profiles" / "paper.yaml"),
            "--config", str(recipes / "profiles" / "paper_xpool.yaml")]
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 2 and all(line.startswith("error: ") for line in errors), errors
    _assert_the_message(errors[0], "weights and tokenizer", no_hub)
    assert "msrvtt shards are not prepared" in errors[1] and "tvr-bench prepare msrvtt" in errors[1]
    assert not (tmp_path / "data").exists()  # no data work happened


@pytest.mark.slow
@pytest.mark.parametrize("offline", ["0", "1"])
def test_console_script_without_network_or_with_hf_hub_offline(offline: str, tmp_path: Path) -> None:
    """The real command as a user types it, the hub a closed port (HF_HUB_OFFLINE=0) or switched off (=1):
    exactly one line on stderr, exit 2, in a few seconds (no retry loop against the unreachable hub)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", HF_HUB_OFFLINE=offline,
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), WANDB_MODE="disabled")
    script = ("import sys; from tvr_bench.cli import main; sys.exit(main())")
    argv = [sys.executable, "-c", script, "fit", "--config", str(REPO / "recipes/base.yaml"),
            "--config", str(REPO / "recipes/methods/clip4clip.yaml"), "--config", str(REPO / "recipes/data/synthetic.yaml"),
            "--model.init_args.backbone", HUB_NAME]
    out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert f"CLIP weights and tokenizer '{HUB_NAME}' are not in the local Hugging Face cache ({tmp_path / 'hf' / 'hub'})" in errors[0]
    assert ("HF_HUB_OFFLINE is set" if offline == "1" else "cannot be reached") in errors[0]
    assert "save_pretrained" in errors[0] and "machine with hub access" in errors[0]
    assert not (tmp_path / "data").exists()  # the synthetic benchmark was not built for nothing


# ------------------------------------------------------------------------------------ train mode (item 8)
class _Batches(torch.utils.data.Dataset):
    """Four training batches of random uint8 frames and captions, as the DataModule gives them."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {
            "frames": torch.randint(0, 256, (4, 3, 3, self.size, self.size), dtype=torch.uint8, generator=g),
            "frame_mask": torch.ones(4, 3, dtype=torch.bool),
            "captions": [f"a red square moves left {i} {j}" for j in range(4)],
            "video_key": [f"v{i}-{j}" for j in range(4)],
        }


@pytest.mark.parametrize("method", ["tvr_bench.methods.xpool.XPool", "tvr_bench.methods.clip4clip.CLIP4Clip"])
def test_local_pretrained_weights_train_in_train_mode(tmp_path: Path, method: str) -> None:
    """from_pretrained returns CLIP in eval mode; the backbone puts it in train mode, as the references train it,
    so Lightning finds no module in eval mode when training starts (with `optimizer: reference` as in the issue)."""
    import importlib

    module_name, _, cls_name = method.rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    clip_dir = _small_clip_dir(tmp_path / "clip", tokenizer=True)
    assert not CLIPModel.from_pretrained(clip_dir).training  # what transformers hands over
    betas, eps = REFERENCE_ADAM_ARGS[cls.REFERENCE_OPTIMIZER]
    model = cls(backbone=str(clip_dir), optimizer="reference", betas=betas, adam_eps=eps)
    assert all(m.training for m in model.modules())
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                        limit_val_batches=0)
    loader = torch.utils.data.DataLoader(_Batches(model.backbone.image_size), batch_size=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train_dataloaders=loader)
    eval_mode = [str(w.message) for w in caught if "eval mode" in str(w.message)]
    assert not eval_mode, eval_mode
    assert trainer.global_step == 2
