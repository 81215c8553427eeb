"""Cached frozen CLIP features: `tvr-bench features` writes them, `FeaturesDataModule` trains heads on them (docs/features.md)."""

from tvr_bench.features.datamodule import FeaturesDataModule

__all__ = ["FeaturesDataModule"]
