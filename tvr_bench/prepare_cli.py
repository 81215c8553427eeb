"""`tvr-bench prepare` as the command line runs it: the data command (:mod:`tvr_bench.data.commands`) plus what
the built-in methods need from it. After converting a release, prepare prints the exact command for the
shards every other method reads (another frame sampling or frame count): that needs each method's
``DATA_PROTOCOL``, so it lives here, on the face layer, and the data package never imports a method.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tvr_bench.data import commands
from tvr_bench.data.frames import POLICIES
from tvr_bench.data.readers import get_reader
from tvr_bench.recipes import RECIPES, method_class, method_recipes

__all__ = ["methods_by_sampling", "other_sampling_commands", "prepare_main", "recipe_needs"]


def _protocol(method: str, recipes: Path) -> dict[str, str] | None:
    """A built-in method's DATA_PROTOCOL (None when its class cannot be imported)."""
    try:
        return dict(getattr(method_class(method, recipes), "DATA_PROTOCOL", None) or {})
    except (ImportError, AttributeError, ValueError):
        return None


def recipe_needs(dataset: str, recipes: Path = RECIPES) -> dict[tuple[str, int], list[str]]:
    """(sampling, frames) -> methods whose `make bench METHOD=<m> DATA=<dataset>` recipe stack reads such
    shards: sampling from the method's DATA_PROTOCOL unless a recipe sets it, frames from the recipes."""
    import yaml

    data_recipe = recipes / "data" / f"{dataset}.yaml"
    if not data_recipe.is_file():
        return {}
    needs: dict[tuple[str, int], list[str]] = {}
    for method in method_recipes(recipes):
        protocol = _protocol(method, recipes)
        if protocol is None:
            continue
        stack = [recipes / "methods" / f"{method}.yaml", data_recipe, recipes / "methods" / f"{method}_{dataset}.yaml"]
        init: dict[str, object] = {}
        for path in stack:
            if path.is_file():
                doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
                init.update(((doc.get("data") or {}).get("init_args")) or {})
        sampling = str(init.get("sampling") or protocol.get("sampling", "fps1_uniform"))
        frames = int(init.get("num_frames") or get_reader(dataset).num_frames)  # type: ignore[arg-type]
        needs.setdefault((sampling, frames), []).append(method)
    return needs


def methods_by_sampling(recipes: Path = RECIPES) -> dict[str, list[str]]:
    """Frame sampling policy -> the built-in methods whose DATA_PROTOCOL uses it."""
    users: dict[str, list[str]] = {}
    for method in method_recipes(recipes):
        protocol = _protocol(method, recipes)
        if protocol is not None:
            users.setdefault(str(protocol.get("sampling", "")), []).append(method)
    return {k: sorted(set(v)) for k, v in users.items()}


def other_sampling_commands(args: argparse.Namespace, sampling: str, num_frames: int) -> list[str]:
    """The same prepare command for the shards every other method recipe reads (another sampling or frame
    count), into the root its DataModule reads by default; the other sampling at these frames without recipes."""
    from tvr_bench.data.benchmarks.catalog import datamodules

    cls = datamodules().get(args.dataset)
    needs = recipe_needs(args.dataset) if cls is not None else {}
    if not needs:
        users = methods_by_sampling()
        needs = {(other, num_frames): users.get(other, []) for other in POLICIES if other != sampling}
    out = []
    for (other, frames), methods in sorted(needs.items()):
        if (other, frames) == (sampling, num_frames):
            continue
        root = cls.default_root(other, frames) if cls is not None else f"{args.out}-{other}"
        parts = ["tvr-bench prepare", args.dataset]
        if args.source != "files":
            parts.append(f"--source {args.source}")
        parts += [f"--videos {args.videos}", f"--annotations {args.annotations}"]
        if frames != get_reader(args.dataset).num_frames:
            parts.append(f"--frames {frames}")
        parts += [f"--sampling {other}", f"--out {root}"]
        who = ", ".join(methods) or "no built-in method"
        out.append(f"{' '.join(parts)}   # {other}, {frames} frames: {who}")
    return out


def prepare_main(argv: list[str]) -> int:
    """Convert a raw release into frame shards checked against the protocol's split sizes, and name the prepare command of every other method's shards (``tvr-bench prepare <dataset> ...``)."""
    return commands.prepare_main(argv, other_commands=other_sampling_commands)
