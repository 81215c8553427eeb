"""The real benchmarks: their prepare specs and DataModules, one module each.

:mod:`tvr_bench.data.readers` adds :func:`official_specs` to its registry, so
``tvr-bench prepare <name>`` knows every benchmark listed here. Adding a benchmark means adding its
module to :data:`MODULES` (it must define ``SPEC`` and may define more ``*_SPEC`` objects).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from tvr_bench.data.benchmarks.common import BenchmarkDataModule, BenchmarkSpec

#: Benchmark modules under tvr_bench/data/benchmarks/: the official benchmarks, then `custom` (the user's own
#: captioned videos, data_cards/custom.md), which has no official protocol.
MODULES: tuple[str, ...] = ("msrvtt", "didemo", "lsmdc", "activitynet", "msvd", "vatex", "charades", "custom")


def _module(name: str) -> ModuleType:
    """Import ``tvr_bench.data.benchmarks.<name>``."""
    return importlib.import_module(f"tvr_bench.data.benchmarks.{name}")


def official_specs() -> dict[str, BenchmarkSpec]:
    """Every spec (``SPEC`` and ``*_SPEC``) of every benchmark module, by dataset name."""
    specs: dict[str, BenchmarkSpec] = {}
    for name in MODULES:
        module = _module(name)
        for attr in sorted(vars(module)):
            value = getattr(module, attr)
            if (attr == "SPEC" or attr.endswith("_SPEC")) and isinstance(value, BenchmarkSpec):
                specs[value.name] = value
    return specs


def datamodules() -> dict[str, type[BenchmarkDataModule]]:
    """Every benchmark DataModule class, by dataset name."""
    out: dict[str, type[BenchmarkDataModule]] = {}
    for name in MODULES:
        module = _module(name)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, BenchmarkDataModule) and value.NAME:
                out[value.NAME] = value
    return out
