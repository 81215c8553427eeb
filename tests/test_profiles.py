"""`make bench ... PROFILE=paper`: the paper-reproduction layers compose for every method x benchmark and set
what the references did (recipes/profiles/, recipes/selection/); PROFILE unset leaves `make bench` as it was."""

from __future__ import annotations

import shlex
import subprocess

import pytest
import yaml

from tests.test_recipes import (
    METHODS,
    REAL_DATASETS,
    RECIPES,
    REPO,
    bench_stack,
    compose,
    expected_settings,
    lookup,
)

#: The references' seeds (argparse defaults the README commands keep); MASCOT: CLIP4Clip's, assumed; TS2-Net: main_task_retrieval.py L45;
#: EMCL: main_retrieval.py L41; X-CLIP: main_xclip.py L44.
REFERENCE_SEEDS = {"clip4clip": 42, "clip4clip_seqtransf": 42, "drl": 0, "xpool": 24, "tmass": 24, "mascot": 42, "ts2net": 42, "emcl": 0, "xclip": 42}
#: Methods whose reference evaluates 10 times per epoch and keeps the best 5-evaluation window.
WINDOWED = {"xpool", "tmass"}
#: Methods whose reference evaluates every N training steps (across epochs) instead of once per epoch.
STEP_INTERVAL = {"emcl": 150}
#: Methods whose reference selects on the benchmark's validation split where its loaders have one (the data recipes'
#: own `val_split`), not on the test split: X-CLIP (main_xclip.py L531 evaluates DATALOADER_DICT[d]["val"]).
SELECTS_ON_VAL = {"xclip"}


def paper_stack(method: str, dataset: str) -> list[str]:
    """What the Makefile stacks with PROFILE=paper (checked against `make -n` below)."""
    layers = ["recipes/profiles/paper.yaml"]
    if (RECIPES / "profiles" / f"paper_{method}.yaml").exists():
        layers.append(f"recipes/profiles/paper_{method}.yaml")
    return bench_stack(method, dataset) + layers + [f"recipes/selection/reference_{method}.yaml"]


def make_dry_run(*args: str) -> list[str]:
    """The `tvr-bench bench` command line `make -n bench <args>` would run, as argv."""
    out = subprocess.run(["make", "-s", "-n", "bench", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout
    line = next(l for l in out.replace("\\\n", " ").splitlines() if "tvr-bench bench" in l)
    argv = shlex.split(line.split("tvr-bench bench", 1)[1].split("||")[0].replace("$seed", "SEED"))
    return argv


def configs_of(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--config"]


def callbacks(config: dict) -> dict[str, dict]:
    return {cb["class_path"].rsplit(".", 1)[-1]: cb.get("init_args", {}) for cb in config["trainer"]["callbacks"]}


@pytest.mark.parametrize("method", METHODS)
def test_paper_profile_composes_and_sets_the_reference_protocol(method: str):
    import importlib

    from tvr_bench.cli import fill_data_protocol

    for dataset in REAL_DATASETS:
        config = compose(tuple(paper_stack(method, dataset)))
        model, data = config["model"]["init_args"], config["data"]["init_args"]
        assert model["backbone"] == "openai/clip-vit-base-patch32", dataset
        assert model["optimizer"] == "reference", dataset
        assert config["leaderboard"]["profile"] == "paper", dataset
        assert config["seed_everything"] == REFERENCE_SEEDS[method], dataset
        # selection on the test split: the result JSON's `selection` is "test" (datamodule.val_split == test_split)
        data_cls = getattr(importlib.import_module(config["data"]["class_path"].rsplit(".", 1)[0]), config["data"]["class_path"].rsplit(".", 1)[1])
        test_split = data.get("test_split") or getattr(data_cls, "TEST_SPLIT", "test")
        if method in SELECTS_ON_VAL:  # the layer leaves the benchmark's own validation split
            assert data["val_split"] == compose(tuple(bench_stack(method, dataset)))["data"]["init_args"]["val_split"], dataset
        else:
            assert data["val_split"] == test_split, dataset
        cbs = callbacks(config)
        if method in WINDOWED:
            assert config["trainer"]["val_check_interval"] == 0.1, dataset
            assert cbs["WindowedMetric"] == {"monitor": "val/t2v/R@1", "window": 5, "name": None}
            assert cbs["SelectionCheckpoint"]["monitor"] == "val/t2v/R@1_window5"
            assert cbs["SelectionCheckpoint"]["ties"] == "first"
        elif method in STEP_INTERVAL:
            assert config["trainer"]["val_check_interval"] == STEP_INTERVAL[method], dataset
            assert config["trainer"]["check_val_every_n_epoch"] is None, dataset
            assert "WindowedMetric" not in cbs
            assert cbs["SelectionCheckpoint"]["monitor"] == "val/t2v/R@1"
            assert cbs["SelectionCheckpoint"]["ties"] == "last"
        else:
            assert config["trainer"].get("val_check_interval") in (None, 1.0), dataset
            assert "WindowedMetric" not in cbs
            assert cbs["SelectionCheckpoint"]["monitor"] == "val/t2v/R@1"
            assert cbs["SelectionCheckpoint"]["ties"] == "last"
        assert cbs["SelectionCheckpoint"]["mode"] == "max" and cbs["SelectionCheckpoint"]["save_top_k"] == 1
        if method == "tmass":
            assert (model["pairing"], model["eps_mode"]) == ("reference", "pair"), dataset
        if method == "emcl":
            assert model["grouping"] == "reference", dataset
        # the data protocol is the method's DATA_PROTOCOL, filled by the CLI because no layer sets it
        model_cls = getattr(importlib.import_module(config["model"]["class_path"].rsplit(".", 1)[0]), config["model"]["class_path"].rsplit(".", 1)[1])
        init = dict(data)
        fill_data_protocol(init, data_cls, model_cls)
        for key in ("sampling", "train_stream", "augment", "last_batch"):
            if key in init:
                assert init[key] == model_cls.DATA_PROTOCOL[key], (dataset, key)
        # the profile keeps every sourced recipe value (recipes/reference_settings.yaml)
        for key, item in expected_settings(method, dataset).items():
            assert lookup(config, key) == item["value"], (dataset, key)


def test_selection_layers_keep_the_base_callbacks():
    """A selection layer replaces the callback list: it must keep every base callback except the checkpoint."""
    base = yaml.safe_load((RECIPES / "base.yaml").read_text())["trainer"]["callbacks"]
    kept = [cb for cb in base if not cb["class_path"].endswith("ModelCheckpoint")]
    for path in sorted((RECIPES / "selection").glob("reference_*.yaml")):
        layer = yaml.safe_load(path.read_text())["trainer"]["callbacks"]
        for cb in kept:
            assert cb in layer, (path.name, cb["class_path"])
    assert {p.stem.removeprefix("reference_") for p in (RECIPES / "selection").glob("reference_*.yaml")} == set(METHODS)


def test_makefile_stacks_the_paper_layers_and_the_reference_seed():
    argv = make_dry_run("METHOD=tmass", "DATA=lsmdc", "PROFILE=paper")
    assert configs_of(argv) == paper_stack("tmass", "lsmdc")
    assert "runs/tmass/lsmdc/paper/seedSEED" in argv
    out = subprocess.run(["make", "-s", "-n", "bench", "METHOD=tmass", "DATA=lsmdc", "PROFILE=paper"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "for seed in 24;" in out  # T-MASS `--seed 24`, from recipes/profiles/paper_tmass.yaml
    out = subprocess.run(["make", "-s", "-n", "bench", "METHOD=drl", "DATA=msrvtt", "PROFILE=paper", "SEED=7"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "for seed in 7;" in out  # an explicit SEED wins


def test_makefile_without_profile_is_unchanged():
    """PROFILE unset: the same three configs (+ method_dataset), seed 0 and run directory as before profiles existed."""
    argv = make_dry_run()
    assert configs_of(argv) == ["recipes/base.yaml", "recipes/methods/clip4clip.yaml", "recipes/data/synthetic.yaml"]
    assert argv[argv.index("--trainer.default_root_dir") + 1] == "runs/clip4clip/synthetic/seedSEED"
    out = subprocess.run(["make", "-s", "-n", "bench"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "for seed in 0;" in out and "profiles" not in out and "selection" not in out
    argv = make_dry_run("METHOD=xpool", "DATA=msrvtt")
    assert configs_of(argv) == bench_stack("xpool", "msrvtt")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["PROFILE=paper"], "PROFILE=paper reproduces published numbers"),
        (["PROFILE=papr", "DATA=msrvtt"], "unknown PROFILE 'papr'; choose one of: paper"),
    ],
)
def test_makefile_refuses_bad_profiles(args: list[str], message: str):
    done = subprocess.run(["make", "-s", "check-names", *args], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr


def test_paper_layers_name_their_sources():
    """Every value a paper layer sets carries a comment (the source, or why it is this suite's choice)."""
    for path in [*sorted((RECIPES / "profiles").glob("*.yaml")), *sorted((RECIPES / "selection").glob("*.yaml"))]:
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if not stripped or stripped.startswith(("#", "-")) or stripped.endswith(":"):
                continue
            key = stripped.split(":", 1)[0]
            if key in {"class_path", "save_last", "save_top_k", "filename", "mode", "logging_interval", "monitor"}:
                continue  # plumbing, not a protocol value
            assert "#" in line, f"{path.relative_to(REPO)}: `{stripped}` has no source comment"


def test_dry_run_parser_reads_make_output():
    """make_dry_run itself: it finds the bench line and its configs (guards the other tests' helper)."""
    argv = make_dry_run("METHOD=drl", "DATA=didemo")
    assert configs_of(argv)[-1] == "recipes/methods/drl_didemo.yaml"
