"""The evaluator-level post-processing options: what each one is, its source, whether it needs a query bank of
training captions, and which directions it reports. The evaluator applies them (`--evaluator.postprocess`), the
scoring audit audits every one of them on top of every method (tvr_bench/audit.py), and their numbers are kept
under their own keys (`<name>/t2v/R@1`), never mixed with the plain ones. The math is in
`tvr_bench/functional/postprocess.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from tvr_bench.functional.postprocess import (
    QBNORM_BETA,
    QBNORM_K,
    SINKHORN_ITERS,
    SINKHORN_TEMPERATURE,
    dual_softmax,
    qbnorm,
    sinkhorn_normalise,
)

#: Settings of the post-processing options (evaluator init args of the same names).
DEFAULT_SETTINGS: dict[str, Any] = {
    "dsl_temperature": 100.0,
    "qbnorm_beta": QBNORM_BETA,
    "qbnorm_k": QBNORM_K,
    "sinkhorn_iters": SINKHORN_ITERS,
    "sinkhorn_temperature": SINKHORN_TEMPERATURE,
}


@dataclass(frozen=True)
class PostProcessing:
    """One post-processing option of the evaluator."""

    name: str
    title: str
    source: str
    needs_bank: bool
    directions: tuple[str, ...]
    settings: tuple[str, ...]
    #: why only some directions are reported ("" when both are)
    note: str = ""

    def apply(self, sim: Tensor, bank_sim: Tensor | None = None, settings: dict[str, Any] | None = None) -> Tensor:
        """The post-processed [n_text, n_video] matrix (`bank_sim`: query bank x the same videos, when needed)."""
        s = {**DEFAULT_SETTINGS, **(settings or {})}
        if self.needs_bank and bank_sim is None:
            raise ValueError(f"post-processing {self.name!r} needs the query bank's scores (training captions x test videos)")
        if self.name == "dsl":
            return dual_softmax(sim, float(s["dsl_temperature"]))
        if self.name == "qbnorm":
            return qbnorm(sim, bank_sim, float(s["qbnorm_beta"]), int(s["qbnorm_k"]))
        if self.name == "sknorm":
            return sinkhorn_normalise(sim, bank_sim, float(s["sinkhorn_temperature"]), int(s["sinkhorn_iters"]))
        if self.name == "sinkhorn":
            return sinkhorn_normalise(sim, None, float(s["sinkhorn_temperature"]), int(s["sinkhorn_iters"]))
        raise ValueError(f"unknown post-processing {self.name!r}")

    def used_settings(self, settings: dict[str, Any] | None = None) -> dict[str, Any]:
        """The settings this option reads, with their values."""
        s = {**DEFAULT_SETTINGS, **(settings or {})}
        return {k: s[k] for k in self.settings}


#: name -> option. Keys `<name>/t2v/...` (and `<name>/v2t/...` where both directions are meaningful).
POSTPROCESSING: dict[str, PostProcessing] = {
    p.name: p
    for p in (
        PostProcessing(
            "dsl", "dual softmax (DSL)",
            "T-MASS modules/metrics.py np_softmax over queries; sims * softmax(100 sims, axis=0) (tvr_bench/metrics.py)",
            needs_bank=False, directions=("t2v", "v2t"), settings=("dsl_temperature",),
        ),
        PostProcessing(
            "qbnorm", "QB-Norm (dynamic inverted softmax, query bank of training captions)",
            "Bogolin et al., CVPR 2022; ioanacroi/qb-norm @ 76d4d90 dynamic_inverted_softmax.py L6-30",
            needs_bank=True, directions=("t2v",), settings=("qbnorm_beta", "qbnorm_k"),
            note="only text→video: normalised and untouched rows end up on different scales",
        ),
        PostProcessing(
            "sknorm", "SK-norm (Sinkhorn video bias from training captions, as UCoFiA)",
            "Wang et al., ICCV 2023; Ziyang412/UCoFiA @ 6098be2 eval_t2v/main_ucofia.py L342-358, L459-485",
            needs_bank=True, directions=("t2v",), settings=("sinkhorn_temperature", "sinkhorn_iters"),
            note="only text→video: a bias per video leaves the video→text ranking as it was",
        ),
        PostProcessing(
            "sinkhorn", "Sinkhorn normalisation of the test matrix (video bias from the test queries)",
            "the same Sinkhorn-Knopp bias (UCoFiA main_ucofia.py L342-358) computed on the test queries x test videos",
            needs_bank=False, directions=("t2v",), settings=("sinkhorn_temperature", "sinkhorn_iters"),
            note="only text→video: a bias per video leaves the video→text ranking as it was",
        ),
    )
}


def postprocessing(name: str) -> PostProcessing:
    """The post-processing option called `name`; ValueError naming the choices otherwise."""
    if name not in POSTPROCESSING:
        raise ValueError(f"unknown post-processing {name!r}; choose from {', '.join(POSTPROCESSING)}")
    return POSTPROCESSING[name]
