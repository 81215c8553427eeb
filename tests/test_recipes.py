"""Every method x dataset recipe stack composes, and every sourced value equals recipes/reference_settings.yaml."""

from __future__ import annotations

import contextlib
import io
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from tvr_bench.recipes import method_recipes

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
METHODS = tuple(method_recipes())
DATASETS = tuple(sorted(p.stem for p in (RECIPES / "data").glob("*.yaml")))
REAL_DATASETS = tuple(d for d in DATASETS if d != "synthetic")
TABLE = yaml.safe_load((RECIPES / "reference_settings.yaml").read_text())


def bench_stack(method: str, dataset: str, *extra: str) -> list[str]:
    """The config files `make bench METHOD=<method> DATA=<dataset>` passes, in order (Makefile RECIPES + RECIPE_EXTRA)."""
    stack = ["recipes/base.yaml", f"recipes/methods/{method}.yaml", f"recipes/data/{dataset}.yaml"]
    if (RECIPES / "methods" / f"{method}_{dataset}.yaml").exists():
        stack.append(f"recipes/methods/{method}_{dataset}.yaml")
    return stack + list(extra)


@lru_cache(maxsize=None)
def compose(stack: tuple[str, ...]) -> dict[str, Any]:
    """The config `tvr-bench bench` builds from the stack, via the CLI parser (`--print_config`: nothing runs)."""
    from tvr_bench.cli import cli_main

    argv = ["bench", *[a for c in stack for a in ("--config", str(REPO / c))], "--print_config"]
    out = io.StringIO()
    with mock.patch.object(sys, "argv", ["tvr-bench"]), contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        cli_main(argv)
    assert done.value.code in (0, None), f"{stack} does not compose"
    return yaml.safe_load(out.getvalue())


def lookup(config: dict[str, Any], dotted: str) -> Any:
    """The value at a dotted path (KeyError naming the path when absent)."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def expected_settings(method: str, dataset: str) -> dict[str, dict[str, Any]]:
    """The table's entries for one method x real dataset: defaults, then the dataset's overrides (`same_as` followed)."""
    entry = TABLE[method]
    base = TABLE[entry["same_as"]] if "same_as" in entry else entry
    settings = dict(base.get("defaults", {}))
    settings.update(base.get("datasets", {}).get(dataset, {}))
    return settings


def setting_file(stack: list[str], dotted: str) -> str | None:
    """The last file of the stack that sets the dotted key (the one whose value wins)."""
    found = None
    for path in stack:
        try:
            lookup(yaml.safe_load((REPO / path).read_text()) or {}, dotted)
        except KeyError:
            continue
        found = path
    return found


def has_source_comment(path: str, dotted: str, value: Any) -> bool:
    """True when a line of the file sets the key's leaf to the value and carries a `#` comment."""
    leaf = dotted.rsplit(".", 1)[-1]
    for line in (REPO / path).read_text().splitlines():
        m = re.match(rf"^\s*{re.escape(leaf)}:\s*([^#]*?)\s*(#.*)?$", line)
        if m and yaml.safe_load(m.group(1)) == value and m.group(2):
            return True
    return False


def test_table_covers_every_method_and_names_real_benchmarks():
    assert set(TABLE) == set(METHODS)
    for method, entry in TABLE.items():
        assert entry.get("repo"), method
        assert set(entry.get("published", [])) <= set(REAL_DATASETS), method
        if "same_as" in entry:
            assert entry["same_as"] in TABLE and "defaults" not in entry, method
        for scope in [entry.get("defaults", {}), *entry.get("datasets", {}).values()]:
            for key, item in scope.items():
                assert set(item) == {"value", "source"} and item["source"].strip(), (method, key)
        assert set(entry.get("datasets", {})) <= set(REAL_DATASETS), method


@pytest.mark.parametrize("method", METHODS)
def test_every_dataset_stack_composes(method: str):
    """`make bench METHOD=<m> DATA=<d>` parses for every dataset; the model and data classes are the method's."""
    method_class = yaml.safe_load((RECIPES / "methods" / f"{method}.yaml").read_text())["model"]["class_path"]
    for dataset in DATASETS:
        config = compose(tuple(bench_stack(method, dataset)))
        assert config["model"]["class_path"] == method_class, dataset
        data_class = yaml.safe_load((RECIPES / "data" / f"{dataset}.yaml").read_text())["data"]["class_path"]
        assert config["data"]["class_path"] == data_class, dataset
        if "num_frames" in config["model"]["init_args"]:  # sized by F (T-MASS radius head, X-CLIP frame matrices): the data's F
            assert config["model"]["init_args"]["num_frames"] == config["data"]["init_args"]["num_frames"], dataset


@pytest.mark.parametrize("method", METHODS)
def test_sourced_values_match_the_table(method: str):
    """Each table value is what the composed stack uses, and the recipe line that sets it names a source."""
    for dataset in REAL_DATASETS:
        stack = bench_stack(method, dataset)
        config = compose(tuple(stack))
        for key, item in expected_settings(method, dataset).items():
            got = lookup(config, key)
            assert got == item["value"], f"{method} x {dataset}: {key} = {got!r}, table {item['value']!r} ({item['source']})"
            path = setting_file(stack, key)
            assert path is not None, f"{method} x {dataset}: no recipe sets {key}: it must be written with its source"
            assert has_source_comment(path, key, item["value"]), f"{path}: `{key}: {item['value']}` has no source comment"


def test_paragraph_batches_follow_the_clip4clip_readme():
    """Issue 13 item 2: DiDeMo and ActivityNet use the README's global batch 128 (they used 64)."""
    for dataset in ("didemo", "activitynet"):
        for method in ("clip4clip", "drl", "mascot"):
            assert compose(tuple(bench_stack(method, dataset)))["data"]["init_args"]["batch_size"] == 128
        # X-Pool / T-MASS: one GPU at batch 32 and 77 tokens, whatever the CLIP4Clip-style data recipe says
        for method in ("xpool", "tmass"):
            init = compose(tuple(bench_stack(method, dataset)))
            assert init["data"]["init_args"]["batch_size"] == 32
            assert init["model"]["init_args"]["max_words"] == 77


def test_method_list_is_the_recipes_and_the_makefile_agrees():
    """`tvr_bench.recipes.method_recipes` lists each method recipe once, without per-dataset layers, as the Makefile."""
    import subprocess

    from tvr_bench.recipes import method_class, method_model_config

    assert {"clip4clip", "clip4clip_seqtransf", "xpool", "drl", "tmass", "mascot"} <= set(METHODS)
    assert not any(m.endswith(f"_{d}") for m in METHODS for d in DATASETS)
    for method in METHODS:
        assert method_class(method).__name__ == method_model_config(method)["class_path"].rsplit(".", 1)[1]
    with pytest.raises(ValueError, match="unknown method 'xpool_msrvtt'"):
        method_model_config("xpool_msrvtt")
    done = subprocess.run(["make", "-s", "-C", str(REPO), "check-names", "METHOD=nope"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines()[0].split("choose one of: ")[1].split() == list(METHODS)
