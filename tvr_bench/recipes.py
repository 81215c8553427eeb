"""The recipes folder of this checkout and the built-in methods it defines.

A built-in method is one `recipes/methods/<name>.yaml` that names a model class; `<method>_<dataset>.yaml`
files are per-dataset layers of a method, not methods. Everything that lists the methods (the Makefile's
`METHODS`, the tests that run over every method, the scoring audit) reads this list, so that a method added
as one recipe is picked up everywhere without new code.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

#: The recipes folder of this checkout (the package is installed from source).
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def dataset_recipes(recipes: Path = RECIPES) -> list[str]:
    """Names of the data recipes (`recipes/data/<name>.yaml`), sorted."""
    return sorted(p.stem for p in (recipes / "data").glob("*.yaml"))


def method_recipes(recipes: Path = RECIPES) -> list[str]:
    """Names of the built-in methods (`recipes/methods/<name>.yaml`, per-dataset layers excluded), sorted."""
    datasets = dataset_recipes(recipes)
    stems = sorted(p.stem for p in (recipes / "methods").glob("*.yaml"))
    return [s for s in stems if not any(s.endswith(f"_{d}") and s[: -len(d) - 1] in stems for d in datasets)]


@lru_cache(maxsize=None)
def _recipe(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def method_model_config(name: str, recipes: Path = RECIPES) -> dict[str, Any]:
    """The `model` block (class_path, init_args) of a built-in method's recipe; ValueError for an unknown name."""
    path = recipes / "methods" / f"{name}.yaml"
    known = method_recipes(recipes)
    if name not in known or not path.is_file():
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(known)}")
    model = _recipe(path).get("model") or {}
    if not model.get("class_path"):
        raise ValueError(f"{path}: no model.class_path")
    return {"class_path": model["class_path"], "init_args": dict(model.get("init_args") or {})}


def method_class(name: str, recipes: Path = RECIPES) -> type:
    """The LightningModule class of a built-in method (imported from its recipe's class_path)."""
    module_name, _, cls_name = method_model_config(name, recipes)["class_path"].rpartition(".")
    return getattr(importlib.import_module(module_name), cls_name)
