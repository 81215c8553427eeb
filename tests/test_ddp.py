"""DDP exactness: the same checkpoint gives the same metrics on 1 and on 2 processes, for every method.

Real DDP on CPU (gloo, 2 processes) through the `tvr-bench` CLI run as subprocesses with a clean
environment (no leaked MASTER_PORT / RANK variables) and a timeout; never `strategy='ddp'` inside
pytest (see ../shared/anchors/environment.md). The test split has 23 videos / 115 captions in shards of
10, 10 and 3 samples, so it divides evenly neither over 2 ranks x 2 workers nor over the batches.

Marked `slow`: `make test-slow` (CI) runs them. Budget: one short in-process fit per method, then one
1-process and one 2-process `tvr-bench test` per method, and one 2-process fit for the training check.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from tests.data_fixtures import tiny_root  # noqa: F401 - pytest fixture
from tvr_bench.data.shards import INDEX_FILE, MANIFEST_FILE, SHARD_PATTERN, ShardFile, iter_shard, parse_sample, read_index, write_json_atomic
from tvr_bench.recipes import method_class, method_recipes

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
#: Shard sizes of the odd test split: 23 videos (prime), uneven shards, uneven slots on 2 ranks x 2 workers.
ODD_SHARDS = (10, 10, 3)
DDP_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK",
           "LOCAL_WORLD_SIZE", "PL_GLOBAL_SEED", "PL_SEED_WORKERS", "PL_TRAINER_GPUS")
TIMEOUT_S = 420
QUIET = {
    "trainer": {
        "logger": False,
        "callbacks": [],
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
}


def build_odd_root(tiny: Path, out: Path, shard_sizes: tuple[int, ...] = ODD_SHARDS) -> Path:
    """A dataset root whose `test` split re-shards the tiny test + val videos into `shard_sizes`
    (train and val are links to the tiny set's)."""
    samples = []
    for split in ("test", "val"):
        for entry in read_index(tiny / split)["shards"]:
            for raw in iter_shard(tiny / split / entry["file"]):
                samples.append({k: v for k, v in raw.items() if k == "__key__" or not k.startswith("__")})
    if sum(shard_sizes) > len(samples):
        raise ValueError(f"the tiny set has {len(samples)} eval samples, {sum(shard_sizes)} asked")
    split_dir = out / "test"
    split_dir.mkdir(parents=True)
    infos, start = [], 0
    for i, size in enumerate(shard_sizes):
        shard = ShardFile(split_dir / SHARD_PATTERN.format(i))
        for sample in samples[start : start + size]:
            meta, _ = parse_sample(sample)
            shard.write(sample, len(meta["captions"]))
        start += size
        infos.append(shard.finish().as_dict())
    index = read_index(tiny / "test")
    index.update(
        shards=infos,
        num_shards=len(infos),
        num_samples=sum(i["num_samples"] for i in infos),
        num_captions=sum(i["num_captions"] for i in infos),
    )
    write_json_atomic(split_dir / INDEX_FILE, index)
    for split in ("train", "val"):
        (out / split).symlink_to((tiny / split).resolve(), target_is_directory=True)
    shutil.copy(tiny / MANIFEST_FILE, out / MANIFEST_FILE)
    return out


@pytest.fixture(scope="module")
def odd_root(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The tiny synthetic set with an odd-sized, unevenly sharded test split (23 videos)."""
    return build_odd_root(tiny_root, tmp_path_factory.mktemp("ddp") / "synthetic-odd")


@pytest.fixture(scope="module")
def quiet_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config that switches loggers, checkpointing and progress output off (composed last)."""
    path = tmp_path_factory.mktemp("ddp-config") / "quiet.yaml"
    path.write_text(yaml.safe_dump(QUIET))
    return path


def clean_env() -> dict[str, str]:
    """The test's environment minus DDP / seed variables, W&B disabled, the repository importable."""
    env = {k: v for k, v in os.environ.items() if k not in DDP_ENV}
    env["WANDB_MODE"] = "disabled"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def tvr_command() -> list[str]:
    """The `tvr-bench` console script of this interpreter's environment (or `python -m tvr_bench.cli`)."""
    script = Path(sys.executable).parent / "tvr-bench"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "tvr_bench.cli"]


def run_tvr(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run `tvr-bench <args>` in a clean environment with a timeout; fail with its output's tail."""
    proc = subprocess.run(
        [*tvr_command(), *args], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    if proc.returncode != 0:
        pytest.fail(f"tvr-bench {' '.join(args[:1])} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc


def recipe_args(recipe: str, root: Path, quiet: Path) -> list[str]:
    """Recipe configs (base, method, synthetic data, quiet) with the data root set."""
    return [
        "--config", str(RECIPES / "base.yaml"),
        "--config", str(RECIPES / "methods" / f"{recipe}.yaml"),
        "--config", str(RECIPES / "data" / "synthetic.yaml"),
        "--config", str(RECIPES / "profiles" / "scratch.yaml"),  # the tiny set has no pretrained backbone
        "--config", str(quiet),
        "--data.init_args.size", "tiny",
        "--data.init_args.root", str(root),
        "--seed_everything", "0",
    ]


def fit_checkpoint(recipe: str, root: Path, quiet: Path, out: Path) -> Path:
    """Train `recipe` for two steps in this process (1 device) and save the checkpoint."""
    from tvr_bench.cli import cli_main

    saved = {k: os.environ.get(k) for k in DDP_ENV}
    argv, sys.argv = sys.argv, ["tvr-bench"]  # LightningCLI warns when pytest's argv sits beside `args`
    try:
        cli = cli_main([
            "fit", *recipe_args(recipe, root, quiet),
            "--data.init_args.num_workers", "0",
            "--data.init_args.batch_size", "8",
            "--trainer.accelerator", "cpu",
            "--trainer.devices", "1",
            "--trainer.max_steps", "2",
            "--trainer.limit_val_batches", "0",
            "--trainer.default_root_dir", str(out / "fit"),
            "--leaderboard.runs_dir", str(out / "fit"),
        ])
        path = out / f"{recipe}.ckpt"
        cli.trainer.save_checkpoint(path)
    finally:
        sys.argv = argv
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return path


def cli_test_result(recipe: str, root: Path, quiet: Path, ckpt: Path, out: Path, *extra: str) -> dict:
    """`tvr-bench test --ckpt_path` in a subprocess; the result JSON the LeaderboardWriter wrote."""
    out.mkdir(parents=True)
    run_tvr(
        [
            "test", *recipe_args(recipe, root, quiet),
            "--data.init_args.eval_batch_size", "4",
            "--ckpt_path", str(ckpt),
            "--trainer.default_root_dir", str(out),
            "--leaderboard.runs_dir", str(out),
            "--leaderboard.rebuild", "false",
            "--evaluator.print_table", "false",
            "--evaluator.save_scores", str(out / "scores.pt"),
            *extra,
        ],
        cwd=out,
    )
    written = {p.name: json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))}
    # a label-dependent or transductive scoring is also scored honestly, in its own JSON (docs/leaderboard.md)
    [result] = [r for r in written.values() if not r.get("companion") or r["companion"]["file"] not in written
                or "honest" in r["companion"]["relation"]]
    if result.get("companion"):
        result["honest"] = written[result["companion"]["file"]]
    result["scores"] = torch.load(out / "scores.pt", weights_only=True)
    return result




@pytest.mark.slow
@pytest.mark.parametrize("recipe", method_recipes())
def test_ddp_two_processes_equal_one_process(recipe: str, odd_root: Path, quiet_config: Path, tmp_path: Path) -> None:
    """Same checkpoint, uneven test split: metrics on 2 DDP processes (2 workers each) == 1 process (1 worker)."""
    ckpt = fit_checkpoint(recipe, odd_root, quiet_config, tmp_path)
    one = cli_test_result(recipe, odd_root, quiet_config, ckpt, tmp_path / "one",
                      "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--data.init_args.num_workers", "1")
    two = cli_test_result(recipe, odd_root, quiet_config, ckpt, tmp_path / "two",
                      "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                      "--data.init_args.num_workers", "2")
    assert (one["device"]["world_size"], two["device"]["world_size"]) == (1, 2)
    n_videos, n_texts = sum(ODD_SHARDS), 5 * sum(ODD_SHARDS)
    for result in (one, two):
        assert (result["eval"]["videos"], result["eval"]["texts"]) == (n_videos, n_texts)
    s1, s2 = one["scores"], two["scores"]
    assert (s1["video_keys"], s1["caption_keys"]) == (s2["video_keys"], s2["caption_keys"])
    assert torch.equal(s1["text_to_video"], s2["text_to_video"])
    diff = float((s1["sim"] - s2["sim"]).abs().max())
    assert diff <= 1e-5, f"{recipe}: score matrices differ by up to {diff:.2e}"
    assert two["metrics"] == one["metrics"], f"{recipe}: 1 process {one['metrics']} != 2 processes {two['metrics']}"
    # the method's other scoring (every SCORING_OPTIONS key at its last listed value: the references' scorings,
    # including block-mixing ones whose evaluator gives each rank whole blocks)
    # (`test --ckpt_path` takes the model's init args from the checkpoint, so they go into a copy of it)
    options = {k: v[-1] for k, v in getattr(method_class(recipe), "SCORING_OPTIONS", {}).items() if len(v) > 1}
    if options:
        payload = torch.load(ckpt, weights_only=True)
        payload["hyper_parameters"].update(options)
        alt = tmp_path / f"{recipe}-alt.ckpt"
        torch.save(payload, alt)
        one = cli_test_result(recipe, odd_root, quiet_config, alt, tmp_path / "one-alt",
                              "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--data.init_args.num_workers", "1")
        two = cli_test_result(recipe, odd_root, quiet_config, alt, tmp_path / "two-alt",
                              "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
                              "--data.init_args.num_workers", "2")
        assert {k: one["protocol"].get(k, v) for k, v in options.items()} == options  # the options did apply
        diff = float((one["scores"]["sim"] - two["scores"]["sim"]).abs().max())
        assert diff <= 1e-5, f"{recipe} {options}: score matrices differ by up to {diff:.2e}"
        assert two["metrics"] == one["metrics"], f"{recipe} {options}: 1 process {one['metrics']} != 2 processes {two['metrics']}"
        assert one["protocol"].get("eval_blocks") == two["protocol"].get("eval_blocks")
        if "honest" in one or "honest" in two:  # the second, honest scoring of the same features: also rank-exact
            assert one["honest"]["metrics"] == two["honest"]["metrics"], f"{recipe}: honest scorings differ"


@pytest.mark.slow
def test_ddp_training_loss_sees_the_gathered_global_batch(odd_root: Path, quiet_config: Path, tmp_path: Path) -> None:
    """2-process fit: every rank's loss gets 2 x the local batch, with gradients, and both ranks agree on it."""
    probe = tmp_path / "probe.yaml"
    probe_dir = tmp_path / "probe"
    probe.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "tests.ddp_probe.GlobalBatchProbe", "init_args": {"out_dir": str(probe_dir)}}
    ]}}))
    run_tvr(
        [
            "fit", *recipe_args("clip4clip", odd_root, quiet_config),
            "--config", str(probe),
            "--data.init_args.num_workers", "1",
            "--data.init_args.batch_size", "4",
            "--trainer.accelerator", "cpu",
            "--trainer.devices", "2",
            "--trainer.strategy", "ddp",
            "--trainer.max_steps", "2",
            "--trainer.limit_val_batches", "0",
            "--trainer.default_root_dir", str(tmp_path / "fit"),
            "--leaderboard.runs_dir", str(tmp_path / "fit"),
        ],
        cwd=tmp_path,
    )
    ranks = [json.loads((probe_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for rank in ranks:
        assert len(rank["records"]) == 2
        for rec in rank["records"]:
            assert rec["local_batch"] == 4
            assert set(rec["text_rows"].values()) == set(rec["video_rows"].values()) == {8}
            assert rec["requires_grad"]
    for a, b in zip(ranks[0]["records"], ranks[1]["records"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)


def _fit_recorded(root: Path, quiet: Path, out: Path, devices: int, workers: int) -> tuple[list[list[tuple[str, str]]], dict]:
    """`tvr-bench fit` of CLIP4Clip for 36 steps at global batch 8 (pairs: 30 batches an epoch, so an epoch boundary
    is crossed) on `devices` gloo processes; the global batches trained on, step by step, and rank 0's weights."""
    probe = out / "recorder.yaml"
    out.mkdir(parents=True)
    probe.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "tests.ddp_probe.TrainRecorder", "init_args": {"out_dir": str(out / "rec")}}
    ]}}))
    run_tvr(
        [
            "fit", *recipe_args("clip4clip", root, quiet),
            "--config", str(probe),
            "--data.init_args.train_stream", "pairs",
            "--data.init_args.num_frames", "4",
            "--data.init_args.num_workers", str(workers),
            "--data.init_args.batch_size", str(8 // devices),
            "--trainer.accelerator", "cpu",
            "--trainer.devices", str(devices),
            *(["--trainer.strategy", "ddp"] if devices > 1 else []),
            "--trainer.max_steps", "36",
            "--trainer.limit_val_batches", "0",
            "--trainer.default_root_dir", str(out / "fit"),
            "--leaderboard.runs_dir", str(out / "fit"),
        ],
        cwd=out,
    )
    ranks = [json.loads((out / "rec" / f"batches_rank{r}.json").read_text()) for r in range(devices)]
    assert [r["world_size"] for r in ranks] == [devices] * devices
    steps = [[p for rank in ranks for p in zip(rank["steps"][i]["keys"], rank["steps"][i]["captions"])]
             for i in range(len(ranks[0]["steps"]))]  # fmt: skip
    return steps, torch.load(out / "rec" / "weights_rank0.pt", weights_only=True)


@pytest.mark.slow
def test_ddp_two_processes_train_on_the_batches_and_weights_of_one(odd_root: Path, quiet_config: Path, tmp_path: Path) -> None:
    """Issue 23: 36 CLIP4Clip steps at global batch 8 on 1 process (0 workers) and on 2 gloo processes x 4 (2 workers
    each): the very same global batches at every step (the ranks' shares concatenated) and the same parameters
    within 1e-5 (relative, per tensor) at the end."""
    one_steps, one_w = _fit_recorded(odd_root, quiet_config, tmp_path / "one", 1, 0)
    two_steps, two_w = _fit_recorded(odd_root, quiet_config, tmp_path / "two", 2, 2)
    assert len(one_steps) == len(two_steps) == 36 and all(len(s) == 8 for s in one_steps)
    assert two_steps == one_steps
    assert len({k for k, _ in one_steps[0]}) == 8  # distinct videos
    assert one_w.keys() == two_w.keys()
    floats = [n for n in one_w if one_w[n].is_floating_point()]
    rel = {n: float((two_w[n] - one_w[n]).norm() / one_w[n].norm().clamp_min(1e-30)) for n in floats}
    overall = float(sum((two_w[n] - one_w[n]).norm() ** 2 for n in floats) ** 0.5 / sum(one_w[n].norm() ** 2 for n in floats) ** 0.5)
    # attention key biases: their gradient is 0 in exact arithmetic (a softmax ignores a per-row constant), so AdamW
    # turns float noise into steps of about lr: they hold noise in any two runs, 1 vs 2 processes or not
    noise = [n for n in floats if n.endswith("k_proj.bias")]
    worst = sorted(((rel[n], n) for n in floats if n not in noise), reverse=True)[:3]
    assert overall <= 1e-5 and worst[0][0] <= 1e-5, f"relative differences: all {overall:.2e}; worst tensors {worst}"
    assert all(float(one_w[n].abs().max()) <= 36 * 5e-4 for n in noise)  # at most one lr-sized step per step


def test_gather_features_flattens_ranks_and_keeps_gradients() -> None:
    """gather_features with a fake 2-rank all_gather: [world*B, ...] rows, gradients reach local features."""
    from tvr_bench.methods.base import RetrievalModule

    import lightning as L

    module = RetrievalModule.__new__(RetrievalModule)  # no backbone needed
    L.LightningModule.__init__(module)
    assert module.gather_features({"x": torch.ones(2)})["x"].shape == (2,)  # no trainer: identity
    module._trainer = SimpleNamespace(world_size=2)
    module.all_gather = lambda value, sync_grads=False: torch.stack([value, value * 2])  # type: ignore[method-assign]
    local = torch.randn(3, 4, requires_grad=True)
    out = module.gather_features({"embeds": local, "mask": torch.ones(3, 5, dtype=torch.bool)})
    assert out["embeds"].shape == (6, 4) and out["mask"].shape == (6, 5)
    out["embeds"].sum().backward()
    assert torch.allclose(local.grad, torch.full((3, 4), 3.0))


def test_eval_split_smaller_than_world_size_is_refused(tiny_root: Path) -> None:  # noqa: F811
    """A rank without a single evaluation batch would hang the others: refuse with a clear error."""
    from tvr_bench.data.datamodule import RetrievalDataModule

    dm = RetrievalDataModule(root=str(tiny_root), num_workers=0)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=17, current_epoch=0)
    with pytest.raises(ValueError, match="fewer than the 17 DDP processes"):
        dm.test_dataloader()
    dm.trainer = SimpleNamespace(global_rank=15, world_size=16, current_epoch=0)
    assert len(dm.test_dataloader()) == 1


def test_blocked_similarity_rank_shares_rebuild_the_full_matrix() -> None:
    """Each rank's strided rows, scored in blocks of any size, are those rows of the full matrix (up to float
    rounding: a matmul over a different block shape may round differently in the last bit)."""
    from tvr_bench.callbacks.evaluator import blocked_similarity

    class Scorer:
        def similarity(self, t: dict, v: dict) -> torch.Tensor:
            return t["e"] @ v["e"].T + 1e-3 * t["index"][:, None] - 1e-4 * v["index"][None, :]

        def pair_cost_bytes(self, t: dict, v: dict) -> int:
            return 4

    g = torch.Generator().manual_seed(0)
    unit = lambda n: torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1)  # noqa: E731 - cosines
    text = {"e": unit(37), "index": torch.arange(37)}
    video = {"e": unit(23), "index": torch.arange(23)}
    full = Scorer().similarity(text, video)
    for budget_mb in (1e-4, 2e-3, 100.0):  # 26 pairs, 524 pairs, everything at once
        assert torch.allclose(blocked_similarity(Scorer(), text, video, budget_mb), full, rtol=0, atol=1e-6)
        for world in (2, 3):
            rebuilt = torch.empty_like(full)
            for rank in range(world):
                rows = torch.arange(rank, 37, world)
                rebuilt[rows] = blocked_similarity(Scorer(), text, video, budget_mb, rows)
            assert torch.allclose(rebuilt, full, rtol=0, atol=1e-6)


def test_block_mixing_scores_rank_shares_rebuild_the_reference_block_loop() -> None:
    """A method whose scores mix the items of an evaluation block (`eval_block_sizes`): the evaluator scores whole
    blocks of consecutive items, whatever rows are asked, and the ranks' whole-block shares rebuild the matrix."""
    from tvr_bench.callbacks.evaluator import block_rows, blocked_similarity

    class BlockScorer:
        calls: list[tuple[int, int]] = []

        def eval_block_sizes(self) -> tuple[int, int]:
            return 4, 3

        def similarity(self, t: dict, v: dict) -> torch.Tensor:
            self.calls.append((len(t["index"]), len(v["index"])))
            return t["e"] @ v["e"].T + t["e"].sum() - 2 * v["e"].sum()  # every score depends on its whole block

        def pair_cost_bytes(self, t: dict, v: dict) -> int:
            raise AssertionError("blocks are the reference's, not sized by memory")

    g = torch.Generator().manual_seed(0)
    text = {"e": torch.randn(11, 5, generator=g), "index": torch.arange(11)}
    video = {"e": torch.randn(7, 5, generator=g), "index": torch.arange(7)}
    loop = torch.empty(11, 7)
    for i in range(0, 11, 4):
        for j in range(0, 7, 3):
            loop[i : i + 4, j : j + 3] = BlockScorer().similarity({k: x[i : i + 4] for k, x in text.items()},
                                                                   {k: x[j : j + 3] for k, x in video.items()})  # fmt: skip
    BlockScorer.calls = []
    assert torch.allclose(blocked_similarity(BlockScorer(), text, video, 1e-9), loop, rtol=0, atol=1e-6)
    assert sorted(set(BlockScorer.calls)) == [(3, 1), (3, 3), (4, 1), (4, 3)]
    strided = torch.arange(1, 11, 2)  # rows that cut through blocks: still taken from their whole blocks
    assert torch.allclose(blocked_similarity(BlockScorer(), text, video, 100.0, strided), loop[strided], rtol=0, atol=1e-6)
    for world in (2, 3, 5):
        rebuilt = torch.full_like(loop, float("nan"))
        for rank in range(world):
            rows = block_rows(11, 4, rank, world)
            assert all(int(r) // 4 % world == rank for r in rows)
            rebuilt[rows] = blocked_similarity(BlockScorer(), text, video, 100.0, rows)
        assert torch.allclose(rebuilt, loop, rtol=0, atol=1e-6)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gradient_probe(out: Path, world: int, methods: list[str], reference_gather: list[str]) -> None:
    """`python -m tests.ddp_probe` on `world` processes (DDP environment set here, as torchrun would), with a timeout."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = clean_env()
        if world > 1:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                       LOCAL_RANK=str(rank), NODE_RANK="0")  # fmt: skip
        cmd = [sys.executable, "-m", "tests.ddp_probe", "--out", str(out), "--methods", ",".join(methods),
               "--reference-gather", ",".join(reference_gather)]  # fmt: skip
        log = open(out.parent / f"{out.name}.rank{rank}.log", "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for rank, (proc, log) in enumerate(procs):
        try:
            code = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = "timeout"
        log.close()
        if code != 0:
            failed.append(f"rank {rank} exited {code}:\n{Path(log.name).read_text()[-3000:]}")
    if failed:
        pytest.fail("\n".join(failed))


@pytest.mark.slow
def test_ddp_parameter_gradients_equal_one_process_with_the_global_batch(tmp_path: Path) -> None:
    """Every method: parameter gradients of one step on 2 gloo ranks (4 pairs each) == 1 process with the 8 pairs,
    within 1e-6; the references' local-slice gather would give half of that on the feature path (shown on clip4clip)."""
    methods = method_recipes()
    assert {"clip4clip", "clip4clip_seqtransf", "xpool", "drl", "tmass", "mascot"} <= set(methods)
    run_gradient_probe(tmp_path / "one", 1, methods, [])
    run_gradient_probe(tmp_path / "two", 2, methods, ["clip4clip"])
    for method in methods:
        one = torch.load(tmp_path / "one" / f"{method}_rank0.pt", weights_only=True)
        two = [torch.load(tmp_path / "two" / f"{method}_rank{r}.pt", weights_only=True) for r in (0, 1)]
        assert set(one) == set(two[0]) == set(two[1]) and len(one) > 10, method
        scale = max(float(g.abs().max()) for g in one.values())
        assert scale > 1e-3, f"{method}: vanishing gradients make the comparison vacuous"
        for name, grad in one.items():
            for rank in (0, 1):
                diff = float((two[rank][name] - grad).abs().max())
                assert diff <= 1e-6, f"{method}: {name} differs by {diff:.2e} on rank {rank} (max |grad| {scale:.2e})"
    # the references' AllGather (backward = local slice) + DDP's average: feature-path gradients are 1/W
    one = torch.load(tmp_path / "one" / "clip4clip_rank0.pt", weights_only=True)
    ref = torch.load(tmp_path / "two" / "clip4clip_refgather_rank0.pt", weights_only=True)
    feature_path = [n for n in one if n != "backbone.clip.logit_scale"]
    for name in feature_path:
        assert torch.allclose(ref[name], 0.5 * one[name], rtol=1e-4, atol=1e-7), name
    assert torch.allclose(ref["backbone.clip.logit_scale"], one["backbone.clip.logit_scale"], rtol=1e-5)  # used after the gather
