"""The scoring audit: does a method's test-time score of (text, video) depend on anything but that text and that
video? Every method x scoring option x evaluator post-processing is run through the evaluator's own scoring path
(`tvr_bench.callbacks.evaluator.eval_scores`) on the same features and checked for

- label invariance: a random relabelling (which captions belong to which video; features and order unchanged)
  leaves every score unchanged (<= 1e-6);
- query independence: a text's scores do not change when other texts are removed or added (one text alone, all
  texts but one, a video's texts removed, texts whose video is not in the gallery added; <= 1e-5). Items keep
  their global `index`, so stochastic scorers are compared with the same per-pair draws;
- gallery independence: score(t, v) does not change when other videos are removed (all texts x 7 videos, with
  unequal caption counts; all texts x all videos but v, for each v; all texts x the videos no text ranks first);
- order equivariance: permuting texts and videos permutes the matrix (<= 1e-5);
- noise floor: on pure-noise features (random text and frame features in the method's own layout, several hundred
  videos with one caption each, a few seeds) t2v R@1 stays inside the 99.9% interval of chance (a parametric
  bootstrap of chance: binomial hits at 1/n_videos over the same number of queries and seeds).

The features are the method's own feature dicts with every floating entry replaced by N(0, rms^2) noise
(`noise_like`; the layout, masks and the rms come from encoding random pixels and random words, or from a run's
saved test features), so any method is audited without knowing what its features mean.

Each scoring gets a class (docs/leaderboard.md, "What counts as a retrieval result"): `label-dependent` when it
fails label invariance or the noise floor, else `transductive` when it fails query independence or order
equivariance, else `gallery-normalised` when it fails gallery independence, else `pairwise`.

`tvr-bench audit` runs it over every built-in method (`tvr_bench.recipes.method_recipes()`), each class's
`SCORING_OPTIONS` and every evaluator post-processing (`tvr_bench.postprocessing.POSTPROCESSING`); a method or option
added later is audited by the same code. The evaluator runs the property checks on a subset of the real test
features at the end of every test, which gives each result its `result_class`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import string
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tvr_bench.callbacks.evaluator import eval_scores, select_features
from tvr_bench.postprocessing import POSTPROCESSING, postprocessing
from tvr_bench.results import LABEL_DEPENDENT, PAIRWISE, RANKED_CLASSES, TRANSDUCTIVE, GALLERY_NORMALISED

Features = dict[str, Tensor]

#: the properties, in report order
PROPERTIES = ("label", "query", "gallery", "order", "noise")
TOLERANCES = {"label": 1e-6, "query": 1e-5, "gallery": 1e-5, "order": 1e-5}
#: two-sided level of the chance interval of the noise floor (a pairwise scorer leaves it 1 time in 1,000)
NOISE_LEVEL = 0.999
#: videos in the audit's property set (caption counts cycle through CAPTION_COUNTS: unequal on purpose)
PROPERTY_VIDEOS, CAPTION_COUNTS, GALLERY_VIDEOS = 12, (1, 3, 2), 7
NOISE_VIDEOS, NOISE_SEEDS = 300, (0, 1, 2)
#: gallery check: at most this many "all videos but one" cases
LEAVE_ONE_OUT = 12
#: scoring memory budget of the audit's sets (MiB): one block for most methods, and T-MASS's per-pair draws
#: (eps_mode pair: M x D hashes per pair) stay small: at 64 MiB their int64 temporaries went through mmap and
#: page faults (sys time 11 s vs 0.6 s at 16 MiB for one 300 x 300 noise set)
AUDIT_BUDGET_MB = 16.0
#: query-bank texts used when auditing post-processing that needs one
BANK_TEXTS = 16
#: the subset of real test features the evaluator audits at the end of a test
TEST_AUDIT_VIDEOS, TEST_AUDIT_CAPTIONS = 12, 3

EXIT_CONFIG, EXIT_DATA = 2, 3


class AuditInputError(Exception):
    """Bad input to `tvr-bench audit` (one line for the user); `code` is the exit code."""

    def __init__(self, message: str, code: int = EXIT_CONFIG):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------- the sets
@dataclass
class EvalSet:
    """Assembled evaluation features: texts, videos and each text's video column (-1: not in this gallery)."""

    text: Features
    video: Features
    text_to_video: Tensor
    #: a name for sets scored by several scorings (the noise sets): their plain scores are computed once
    key: str | None = None

    def __post_init__(self) -> None:
        n_text, n_video = len(next(iter(self.text.values()))), len(next(iter(self.video.values())))
        if "index" not in self.text:  # explicit global indices: subsets keep their items' draws
            self.text = {**self.text, "index": torch.arange(n_text)}
        if "index" not in self.video:
            self.video = {**self.video, "index": torch.arange(n_video)}
        self.text_to_video = self.text_to_video.long().cpu()

    @property
    def n_text(self) -> int:
        """Number of texts."""
        return int(self.text_to_video.numel())

    @property
    def n_video(self) -> int:
        """Number of videos."""
        return len(next(iter(self.video.values())))

    def subset(self, rows: Any = None, cols: Any = None, text_to_video: Tensor | None = None) -> EvalSet:
        """The texts `rows` (in that order) x the videos `cols` (in that order); labels follow the videos (-1 when
        a text's video is not among `cols`), or are `text_to_video` (over the original columns) when given."""
        rows = torch.arange(self.n_text) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        cols = torch.arange(self.n_video) if cols is None else torch.as_tensor(cols, dtype=torch.long)
        labels = (self.text_to_video if text_to_video is None else text_to_video.long())[rows]
        new_col = torch.full((self.n_video,), -1, dtype=torch.long)
        new_col[cols] = torch.arange(len(cols))
        mapped = torch.where(labels >= 0, new_col[labels.clamp(min=0)], labels)
        return EvalSet(select_features(self.text, rows), select_features(self.video, cols), mapped)

    def relabelled(self, text_to_video: Tensor) -> EvalSet:
        """The same features and order with other labels."""
        return EvalSet(self.text, self.video, text_to_video)


@dataclass
class Scoring:
    """One scoring to audit: a method with some of its scoring options, optionally an evaluator post-processing."""

    method: Any
    options: dict[str, Any] = field(default_factory=dict)
    post: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    bank: Features | None = None
    budget_mb: float | None = None
    #: plain scores of keyed sets, shared by the scorings of one method (post-processing reuses them)
    cache: dict[Any, Tensor] | None = None

    def budget(self) -> float:
        """The scoring memory budget: `budget_mb`, else AUDIT_BUDGET_MB whatever the method's `eval_memory_mb` (the
        audit's sets are small; blocks never change a score, and `eval_block_sizes()` is honoured anyway)."""
        return AUDIT_BUDGET_MB if self.budget_mb is None else float(self.budget_mb)

    @property
    def label(self) -> str:
        """`tmass pairing=reference eps_mode=pair + qbnorm`: what is audited."""
        opts = " ".join(f"{k}={v}" for k, v in self.options.items())
        return " ".join(p for p in (self.method_name, opts, f"+ {self.post}" if self.post else "") if p)

    @property
    def method_name(self) -> str:
        """The method's name under these options (T-MASS: `tmass_refpairing` with the reference pairing)."""
        with self.method.using_scoring_options(**self.options):
            return str(getattr(self.method, "method_name", type(self.method).__name__.lower()))

    def __call__(self, s: EvalSet) -> Tensor:
        """The [n_text, n_video] scores of `s` through the evaluator's scoring path (and the post-processing)."""
        with torch.no_grad(), self.method.using_scoring_options(**self.options):
            key = (tuple(sorted((k, str(v)) for k, v in self.options.items())), s.key)
            if s.key is not None and self.cache is not None and key in self.cache:
                sim = self.cache[key]
            else:
                sim = eval_scores(self.method, s.text, s.video, s.text_to_video, self.budget()).float()
                if s.key is not None and self.cache is not None:
                    self.cache[key] = sim
            if self.post is None:
                return sim
            option = postprocessing(self.post)
            bank_sim = None
            if option.needs_bank:
                if self.bank is None:
                    raise ValueError(f"{self.post} needs a query bank")
                n_bank = len(next(iter(self.bank.values())))
                bank_sim = eval_scores(self.method, self.bank, s.video, torch.full((n_bank,), -1), self.budget())
            return option.apply(sim, bank_sim, self.settings).float()


# ---------------------------------------------------------------------------------------------- checks
@dataclass
class Check:
    """One comparison: the largest score difference where none is allowed (or the noise floor's R@1)."""

    property: str
    case: str
    deviation: float
    tolerance: float
    error: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """No error, the same NaN/inf pattern and shape, and the deviation within the tolerance."""
        return self.error is None and not self.detail.get("mismatch") and self.deviation <= self.tolerance

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"property": self.property, "case": self.case, "passed": self.passed,
                "deviation": None if math.isinf(self.deviation) else self.deviation, "tolerance": self.tolerance,
                "error": self.error, **({"detail": self.detail} if self.detail else {})}


def deviation(a: Tensor, b: Tensor) -> tuple[float, str | None]:
    """(max |a - b| over the entries finite in both, divided by max(1, max |b|) so that scores on a logit scale
    (SK-norm: cosine / 0.01) get the same float32 headroom as cosines; what else differs: shape, NaN or inf
    pattern, or None)."""
    if a.shape != b.shape:
        return math.inf, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    a, b = a.double(), b.double()
    finite = torch.isfinite(a) & torch.isfinite(b)
    value = 0.0
    if bool(finite.any()):
        value = float((a[finite] - b[finite]).abs().max()) / max(1.0, float(b[finite].abs().max()))
    if not torch.equal(a.isnan(), b.isnan()):
        return value, f"NaN pattern differs ({int(a.isnan().sum())} vs {int(b.isnan().sum())} NaN scores)"
    if not torch.equal(a.isinf(), b.isinf()) or not torch.equal(a[a.isinf()], b[b.isinf()]):
        return value, "infinite scores differ"
    return value, None


def _compare(prop: str, case: str, scoring: Scoring, s: EvalSet, expected: Tensor, rows: Any = None) -> Check:
    """Score `s`, take its `rows` (default all) and compare them with `expected`."""
    try:
        got = scoring(s)
    except Exception as exn:  # noqa: BLE001 - a scorer that cannot score the case fails it, with the reason
        return Check(prop, case, math.inf, TOLERANCES[prop], error=f"{type(exn).__name__}: {exn}")
    if rows is not None:
        got = got[torch.as_tensor(rows, dtype=torch.long)]
    dev, why = deviation(got, expected)
    return Check(prop, case, dev, TOLERANCES[prop], detail={"mismatch": why} if why else {})


def _spread(n: int, k: int) -> list[int]:
    """Up to k distinct indices spread over range(n) (first, last, middle...)."""
    return sorted(set(np.linspace(0, n - 1, num=min(k, n)).round().astype(int).tolist())) if n else []


def property_checks(scoring: Scoring, s: EvalSet, seed: int = 0) -> list[Check]:
    """Label invariance, query independence, gallery independence and order equivariance of `scoring` on `s`."""
    try:
        full = scoring(s)
    except Exception as exn:  # noqa: BLE001
        return [Check(p, "the whole set", math.inf, TOLERANCES[p], error=f"{type(exn).__name__}: {exn}")
                for p in ("label", "query", "gallery", "order")]
    g = torch.Generator().manual_seed(seed)
    checks: list[Check] = []
    t2v, n_text, n_video = s.text_to_video, s.n_text, s.n_video
    # label invariance: captions reassigned among the videos (counts kept), then uniformly at random (counts change)
    shuffled = t2v[torch.randperm(n_text, generator=g)]
    if torch.equal(shuffled, t2v) and n_text > 1:
        shuffled = t2v.roll(1)
    checks.append(_compare("label", "captions reassigned among the videos", scoring, s.relabelled(shuffled), full))
    random_labels = torch.randint(0, n_video, (n_text,), generator=g)
    checks.append(_compare("label", "uniformly random labels", scoring, s.relabelled(random_labels), full))
    # query independence: remove texts, or add texts whose video is not in the gallery
    for i in _spread(n_text, 3):
        checks.append(_compare("query", f"text {i} alone", scoring, s.subset([i]), full[[i]]))
    for i in _spread(n_text, 2):
        keep = [j for j in range(n_text) if j != i]
        checks.append(_compare("query", f"all texts but {i}", scoring, s.subset(keep), full[keep]))
    counts = torch.bincount(t2v[t2v >= 0], minlength=n_video)
    v = int(counts.argmax())
    keep = [j for j in range(n_text) if int(t2v[j]) != v]
    if keep:
        checks.append(_compare("query", f"the {int(counts[v])} texts of video {v} removed", scoring, s.subset(keep),
                               full[keep]))
        others = [c for c in range(n_video) if c != v]
        try:
            base = scoring(s.subset(keep, others))
        except Exception as exn:  # noqa: BLE001
            checks.append(Check("query", "texts whose video is not in the gallery added", math.inf, TOLERANCES["query"],
                                error=f"{type(exn).__name__}: {exn}"))
        else:
            added = keep + [j for j in range(n_text) if int(t2v[j]) == v]
            checks.append(_compare("query", f"{int(counts[v])} texts whose video is not in the gallery added", scoring,
                                   s.subset(added, others), base, rows=list(range(len(keep)))))
    # gallery independence
    if n_video > 1:
        cols = sorted(torch.randperm(n_video, generator=g)[: min(GALLERY_VIDEOS, n_video - 1)].tolist())
        unequal = len(set(counts[cols].tolist())) > 1
        checks.append(_compare("gallery", f"all texts x {len(cols)} videos" + (" (unequal caption counts)" if unequal else ""),
                               scoring, s.subset(None, cols), full[:, cols]))
        for drop in _spread(n_video, LEAVE_ONE_OUT):  # each video left out in turn (a text's best, a hub, ...)
            cols = [c for c in range(n_video) if c != drop]
            checks.append(_compare("gallery", f"all texts x all videos but {drop}", scoring, s.subset(None, cols),
                                   full[:, cols]))
        best = set(full.nan_to_num(nan=float("-inf")).argmax(1).tolist())  # every text's first video
        cols = [c for c in range(n_video) if c not in best]
        if cols:  # the videos that matter most to anything normalised over the gallery are gone
            checks.append(_compare("gallery", f"all texts x the {len(cols)} videos no text ranks first", scoring,
                                   s.subset(None, cols), full[:, cols]))
    # order equivariance
    rp, cp = torch.randperm(n_text, generator=g), torch.randperm(n_video, generator=g)
    checks.append(_compare("order", "texts and videos permuted", scoring, s.subset(rp, cp), full[rp][:, cp]))
    return checks


def chance_interval(n_video: int, n_queries: int, n_seeds: int, level: float = NOISE_LEVEL, draws: int = 200_000,
                    seed: int = 0) -> tuple[float, float, float]:
    """(chance, lo, hi): t2v R@1 (%) of scores that ignore the pairing, and the `level` interval of its mean over
    `n_seeds` sets of `n_queries` queries (parametric bootstrap: binomial hits at 1/n_video)."""
    p = 1.0 / n_video
    total = n_queries * n_seeds
    hits = np.random.default_rng(seed).binomial(total, p, size=draws) / total * 100.0
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(hits, [tail, 1.0 - tail])
    return 100.0 * p, float(lo), float(hi)


def noise_floor(scoring: Scoring, sets: list[EvalSet], level: float = NOISE_LEVEL) -> Check:
    """t2v R@1 over pure-noise sets (mean over the sets) against the chance interval; deviation = distance outside."""
    from tvr_bench.metrics import retrieval_metrics

    r1 = []
    try:
        for s in sets:
            r1.append(float(retrieval_metrics(scoring(s), s.text_to_video)["t2v/R@1"]))
    except Exception as exn:  # noqa: BLE001
        return Check("noise", "pure noise", math.inf, 0.0, error=f"{type(exn).__name__}: {exn}")
    n_video, n_text = sets[0].n_video, sets[0].n_text
    chance, lo, hi = chance_interval(n_video, n_text, len(sets), level)
    mean = float(np.mean(r1))
    outside = max(0.0, mean - hi, lo - mean)
    return Check("noise", f"{len(sets)} noise sets of {n_text} texts x {n_video} videos", outside, 0.0,
                 detail={"t2v_R@1": r1, "mean": mean, "chance": chance, "interval": [lo, hi], "level": level})


def classify(checks: list[Check]) -> str:
    """The result class of a scoring from its checks (module docstring)."""
    failed = {c.property for c in checks if not c.passed}
    if failed & {"label", "noise"}:
        return LABEL_DEPENDENT
    if failed & {"query", "order"}:
        return TRANSDUCTIVE
    if "gallery" in failed:
        return GALLERY_NORMALISED
    return PAIRWISE


@dataclass
class ScoringReport:
    """The audit of one scoring: its checks and its class."""

    scoring: str
    method: str
    options: dict[str, Any]
    post: str | None
    checks: list[Check]
    seconds: float

    @property
    def result_class(self) -> str:
        """pairwise | gallery-normalised | transductive | label-dependent."""
        return classify(self.checks)

    def failures(self) -> dict[str, Check]:
        """The worst failing check of each property."""
        out: dict[str, Check] = {}
        for c in self.checks:
            if not c.passed and (c.property not in out or c.deviation > out[c.property].deviation):
                out[c.property] = c
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {"scoring": self.scoring, "method": self.method, "options": _plain(self.options), "post": self.post,
                "result_class": self.result_class, "failed": sorted(self.failures()),
                "seconds": round(self.seconds, 3), "checks": [c.as_dict() for c in self.checks]}


def _plain(options: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (str, int, float, bool)) or v is None else str(v)) for k, v in options.items()}


def audit_scoring(scoring: Scoring, s: EvalSet, noise_sets: list[EvalSet] | None = None) -> ScoringReport:
    """Run the property checks on `s` (and the noise floor on `noise_sets`) for one scoring."""
    start = time.perf_counter()
    checks = property_checks(scoring, s)
    if noise_sets:
        checks.append(noise_floor(scoring, noise_sets))
    return ScoringReport(scoring.label, scoring.method_name, dict(scoring.options), scoring.post, checks,
                         time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------- inputs
def method_frames(method: Any, default: int = 12) -> int:
    """Frames per video the method expects (its `num_frames` init arg, else `default`)."""
    hparams = getattr(method, "hparams", None) or {}
    value = hparams.get("num_frames") if hasattr(hparams, "get") else None
    return int(value or default)


def random_captions(n: int, generator: torch.Generator) -> list[str]:
    """`n` captions of 3-10 random lowercase 'words' (pure noise for the text encoder)."""
    letters = string.ascii_lowercase
    out = []
    for _ in range(n):
        words = int(torch.randint(3, 11, (1,), generator=generator))
        lengths = torch.randint(2, 8, (words,), generator=generator).tolist()
        out.append(" ".join("".join(letters[int(i)] for i in torch.randint(0, 26, (k,), generator=generator)) for k in lengths))
    return out


@torch.no_grad()
def encode_random(method: Any, counts: list[int], seed: int, num_frames: int | None = None, batch: int = 64) -> EvalSet:
    """Pure-noise inputs through the method's own encoders: random pixels (normalised space) and random words;
    `counts[v]` captions for video v; one video in four has its last frames padded."""
    g = torch.Generator().manual_seed(seed)
    n_video, frames = len(counts), num_frames or method_frames(method)
    size = int(method.backbone.image_size)
    device = getattr(method, "device", torch.device("cpu"))
    captions = random_captions(int(sum(counts)), g)
    videos, texts = [], []
    for i in range(0, n_video, batch):
        b = min(batch, n_video - i)
        pixels = torch.randn(b, frames, 3, size, size, generator=g)
        mask = torch.ones(b, frames, dtype=torch.bool)
        for j in range(b):
            if (i + j) % 4 == 3 and frames > 2:
                mask[j, frames - int(torch.randint(1, frames // 2 + 1, (1,), generator=g)):] = False
        videos.append({k: v.float().cpu() if v.is_floating_point() else v.cpu()
                       for k, v in method.encode_video(pixels.to(device), mask.to(device)).items()})
    for i in range(0, len(captions), batch):
        tokens = method.tokenize(captions[i : i + batch])
        texts.append({k: v.float().cpu() if v.is_floating_point() else v.cpu()
                      for k, v in method.encode_text(**tokens).items()})
    cat = lambda chunks: {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}  # noqa: E731
    t2v = torch.repeat_interleave(torch.arange(n_video), torch.tensor(counts))
    return EvalSet(cat(texts), cat(videos), t2v)


def noise_like(template: EvalSet, counts: list[int], seed: int) -> EvalSet:
    """Pure-noise features laid out like `template` (the method's own feature dict): every floating entry drawn
    i.i.d. from N(0, rms^2), rms = that entry's root mean square in the template (its absolute value for an entry
    that is never negative in the template: weights); masks and other integer entries copied from random template
    items; `counts[v]` captions for video v. No pairing information at all."""
    g = torch.Generator().manual_seed(seed)

    def draw(feats: Features, n: int) -> Features:
        m = len(next(iter(feats.values())))
        pick = torch.randint(0, m, (n,), generator=g)
        out = {}
        for k, v in feats.items():
            if k == "index":
                continue
            if v.is_floating_point():
                rms = float(v.float().pow(2).mean().sqrt()) or 1.0
                noise = rms * torch.randn((n, *v.shape[1:]), generator=g)
                out[k] = noise.abs() if bool((v >= 0).all()) else noise  # weights stay non-negative
            else:
                out[k] = v[pick]
        return out

    t2v = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return EvalSet(draw(template.text, len(t2v)), draw(template.video, len(counts)), t2v)


def template_set(method: Any, seed: int = 0) -> EvalSet:
    """A few noise inputs through the method's own encoders: the layout (keys, shapes, masks) noise is drawn like."""
    return encode_random(method, [1, 2, 1, 2, 1, 2, 1, 2], seed=40_000 + seed)


def property_set(method: Any, seed: int = 0, n_video: int = PROPERTY_VIDEOS, template: EvalSet | None = None) -> EvalSet:
    """The audit's property set: `n_video` pure-noise videos with 1, 3, 2, 1, 3, 2, ... captions."""
    counts = [CAPTION_COUNTS[i % len(CAPTION_COUNTS)] for i in range(n_video)]
    return noise_like(template_set(method) if template is None else template, counts, seed=10_000 + seed)


def noise_sets(method: Any, n_video: int = NOISE_VIDEOS, seeds: tuple[int, ...] = NOISE_SEEDS,
               template: EvalSet | None = None) -> list[EvalSet]:
    """Pure-noise sets of `n_video` videos with one caption each, one per seed (`noise_like`)."""
    template = template_set(method) if template is None else template
    sets = [noise_like(template, [1] * n_video, 20_000 + s) for s in seeds]
    for seed, s in zip(seeds, sets):
        s.key = f"noise-{n_video}-{seed}"
    return sets


def bank_features(method: Any, n: int = BANK_TEXTS, seed: int = 30_000, template: EvalSet | None = None) -> Features:
    """A small query bank of noise texts (no labels), laid out like the method's text features."""
    s = noise_like(template_set(method) if template is None else template, [n], seed)
    return {**{k: v for k, v in s.text.items() if k != "index"}, "index": torch.arange(n)}


def test_subset(s: EvalSet, videos: int = TEST_AUDIT_VIDEOS, captions: int = TEST_AUDIT_CAPTIONS) -> EvalSet:
    """A small audit set from real test features: `videos` videos spread over the set, up to `captions` each."""
    cols = _spread(s.n_video, videos)
    rows = []
    for c in cols:
        rows += torch.nonzero(s.text_to_video == c).flatten()[:captions].tolist()
    return s.subset(rows, cols)


# ---------------------------------------------------------------------------------------------- what is audited
def option_combinations(cls: type) -> list[dict[str, Any]]:
    """Every combination of a class's `SCORING_OPTIONS` values (the defaults first)."""
    declared = getattr(cls, "SCORING_OPTIONS", {}) or {}
    names = list(declared)
    return [dict(zip(names, values)) for values in itertools.product(*(declared[n] for n in names))]


def scorings(method: Any, post: list[str] | None = None, settings: dict[str, Any] | None = None,
             bank: Features | None = None) -> list[Scoring]:
    """Every option combination of the method, then every post-processing on its default options."""
    combos = option_combinations(type(method)) or [{}]
    cache: dict[Any, Tensor] = {}
    out = [Scoring(method, combo, cache=cache) for combo in combos]
    for name in (list(POSTPROCESSING) if post is None else post):
        out.append(Scoring(method, combos[0], name, dict(settings or {}), bank, cache=cache))
    return out


def is_ranked(result_class: str) -> bool:
    """Whether rows of this class are ranked with plain retrieval (pairwise, gallery-normalised)."""
    return result_class in RANKED_CLASSES


def honest_options(method: Any, s: EvalSet, verdict: str | None = None) -> tuple[dict[str, Any], str] | None:
    """Scoring options that make the method's configured scoring rankable (pairwise or gallery-normalised), found by
    resetting its non-default `SCORING_OPTIONS` to their defaults one at a time (in declaration order) and auditing
    each; None when the configured scoring already is rankable or no reset makes it so. `verdict`: the configured
    scoring's class when already known."""
    declared = getattr(type(method), "SCORING_OPTIONS", {}) or {}
    current = method.scoring_options()
    if verdict is None:
        verdict = classify(property_checks(Scoring(method, current), s))
    if is_ranked(verdict):
        return None
    trial = dict(current)
    for name, values in declared.items():
        if trial[name] == values[0]:
            continue
        trial[name] = values[0]
        verdict = classify(property_checks(Scoring(method, trial), s))
        if is_ranked(verdict):
            return trial, verdict
    return None


def evaluation_audit(method: Any, s: EvalSet, post: list[str], settings: dict[str, Any], bank: Features | None
                     ) -> dict[str, Any]:
    """What the evaluator records after a test: the property checks of the configured scoring and of each
    post-processing on a small subset of the real test features (`test_subset`), and their classes."""
    start = time.perf_counter()
    sub = test_subset(s)
    bank_sub = None if bank is None else select_features(bank, torch.arange(min(BANK_TEXTS, len(next(iter(bank.values()))))))
    current = method.scoring_options()
    plain = audit_scoring(Scoring(method, current), sub)
    out: dict[str, Any] = {
        "method": "tvr_bench/audit.py property checks (label, query, gallery, order) on a subset of the test features",
        "videos": sub.n_video, "texts": sub.n_text,
        "result_class": plain.result_class, "failed": sorted(plain.failures()), "options": _plain(current),
        "post": {},
    }
    for name in post:
        if postprocessing(name).needs_bank and bank_sub is None:
            continue
        report = audit_scoring(Scoring(method, current, name, settings, bank_sub), sub)
        out["post"][name] = {"result_class": report.result_class, "failed": sorted(report.failures())}
    out["seconds"] = round(time.perf_counter() - start, 3)
    return out


# ---------------------------------------------------------------------------------------------- models
def builtin_method(name: str, seed: int = 0) -> Any:
    """A built-in method as its recipe builds it (tiny random CLIP), in eval mode."""
    from tvr_bench.recipes import method_class, method_model_config

    config = method_model_config(name)  # ValueError naming the choices for an unknown name
    cls = method_class(name)
    torch.manual_seed(seed)
    model = cls(**config["init_args"])
    return model.eval()


def checkpoint_method(path: Path, expected: str | None = None) -> Any:
    """The method of a Lightning checkpoint (class and init args from its hyperparameters, then its weights)."""
    from tvr_bench.recipes import method_class, method_model_config

    if not path.is_file():
        raise AuditInputError(f"checkpoint {path} does not exist", EXIT_DATA)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exn:  # noqa: BLE001 - a damaged or foreign file
        raise AuditInputError(f"cannot read checkpoint {path}: {type(exn).__name__}: {str(exn).splitlines()[0]}",
                              EXIT_DATA) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise AuditInputError(f"{path} is not a Lightning checkpoint (no state_dict)", EXIT_DATA)
    hparams = dict(ckpt.get("hyper_parameters") or {})
    class_path = hparams.pop("_class_path", None) or ckpt.get("tvr_bench_class_path")
    cls = None
    if class_path:
        module_name, _, cls_name = str(class_path).rpartition(".")
        cls = getattr(__import__(module_name, fromlist=[cls_name]), cls_name, None)
    want = None
    if expected is not None:
        method_model_config(expected)  # unknown name -> ValueError naming the choices
        want = method_class(expected)
        if cls is not None and cls is not want:
            raise AuditInputError(f"{path} holds a {cls.__module__}.{cls.__name__} model, not {expected} "
                                  f"({want.__module__}.{want.__name__})")
    cls = cls or want
    if cls is None:
        raise AuditInputError(f"{path} does not say which method it holds (no model class path in its "
                              "hyperparameters): name the method, e.g. `tvr-bench audit clip4clip --ckpt ...`")
    init = {k: v for k, v in hparams.items() if not k.startswith("_")}
    try:
        model = cls(**init)
    except TypeError as exn:  # init args of another class
        raise AuditInputError(f"the hyperparameters of {path} do not fit {cls.__name__} ({str(exn).splitlines()[0]}): "
                              "it holds another method") from None
    except Exception as exn:  # noqa: BLE001 - a backbone that cannot be loaded, a refused value
        raise AuditInputError(f"cannot rebuild the {cls.__name__} model of {path}: {type(exn).__name__}: "
                              f"{str(exn).splitlines()[0]}", EXIT_DATA) from None
    try:
        missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as exn:  # shape mismatches
        raise AuditInputError(f"the parameters of {path} do not fit {cls.__name__}: {str(exn).splitlines()[0]} "
                              f"{str(exn).splitlines()[1].strip() if len(str(exn).splitlines()) > 1 else ''}".rstrip()) from None
    if missing or unexpected:
        example = (list(missing) + list(unexpected))[:2]
        raise AuditInputError(f"the parameters of {path} do not fit {cls.__name__} ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected, e.g. {example}): it holds another method or model size")
    return model.eval()


def run_inputs(run: Path, expected: str | None = None) -> tuple[Any, EvalSet]:
    """The method (from the checkpoint that was tested) and the saved test features of a run directory."""
    from tvr_bench.callbacks.evaluator import FEATURES_FILE

    if not run.is_dir():
        raise AuditInputError(f"run directory {run} does not exist", EXIT_DATA)
    path = run / FEATURES_FILE
    if not path.is_file():
        raise AuditInputError(f"{run} has no saved test features ({FEATURES_FILE}): rerun its test with "
                              "`--evaluator.save_features true` (or audit its checkpoint with --ckpt)", EXIT_DATA)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        text, video, t2v = saved["text"], saved["video"], saved["text_to_video"]
    except Exception as exn:  # noqa: BLE001
        raise AuditInputError(f"cannot read {path}: {type(exn).__name__}: {str(exn).splitlines()[0]}", EXIT_DATA) from None
    ckpt = saved.get("ckpt_path")
    candidates = [Path(ckpt)] if ckpt else []
    candidates += sorted((run / "checkpoints").glob("*.ckpt")) if (run / "checkpoints").is_dir() else []
    candidates = [c for c in candidates if c.is_file()]
    if not candidates:
        raise AuditInputError(f"{run}: the checkpoint that produced {FEATURES_FILE} is gone ({ckpt or 'no path'}), and "
                              f"{run / 'checkpoints'} holds none", EXIT_DATA)
    model = checkpoint_method(candidates[0], expected)
    if saved.get("class_path") and saved["class_path"] != f"{type(model).__module__}.{type(model).__name__}":
        raise AuditInputError(f"{path} was scored by {saved['class_path']}, but {candidates[0]} holds "
                              f"{type(model).__module__}.{type(model).__name__}")
    return model, EvalSet(text, video, t2v)


# ---------------------------------------------------------------------------------------------- report
def audit_method(model: Any, post: list[str] | None, settings: dict[str, Any], props: EvalSet,
                 noise: list[EvalSet] | None, bank: Features | None) -> list[ScoringReport]:
    """Audit every scoring of one model."""
    return [audit_scoring(sc, props, noise) for sc in scorings(model, post, settings, bank)]


def _cell(report: ScoringReport, prop: str) -> str:
    checks = [c for c in report.checks if c.property == prop]
    if not checks:
        return "–"
    bad = report.failures().get(prop)
    if bad is None:
        if prop == "noise":
            d = checks[0].detail
            return f"ok {d['mean']:.2f}% (chance {d['chance']:.2f})"
        return "ok"
    if bad.error:
        return f"FAIL ({bad.error.split(':')[0]})"
    if prop == "noise":
        d = bad.detail
        return f"FAIL R@1 {d['mean']:.2f}% ∉ [{d['interval'][0]:.2f}, {d['interval'][1]:.2f}]"
    text = "FAIL Δ " + ("shape" if math.isinf(bad.deviation) else f"{bad.deviation:.1e}")
    return text + (" + NaN" if "NaN" in str(bad.detail.get("mismatch", "")) else "")


def print_reports(reports: list[ScoringReport], file: Any = None) -> None:
    """The per method x option x post-processing table: which property fails, by how much, and the class."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tvr-bench scoring audit (label invariance, query and gallery independence, order, noise floor)")
    table.add_column("scoring")
    for prop in PROPERTIES:
        table.add_column(prop, no_wrap=True)
    table.add_column("class", no_wrap=True)
    for r in reports:
        table.add_row(r.scoring, *(_cell(r, p) for p in PROPERTIES), r.result_class)
    console = Console(file=file, width=200) if file is not None or not sys.stdout.isatty() else Console()
    console.print(table)
    for r in reports:
        for prop, c in r.failures().items():
            reason = c.error or c.detail.get("mismatch") or ""
            if prop == "noise":
                d = c.detail
                what = (f"t2v R@1 {d['mean']:.2f}% on pure noise, outside [{d['interval'][0]:.2f}, "
                        f"{d['interval'][1]:.2f}] ({d['level']:.1%} interval of chance {d['chance']:.2f}%)") if d else ""
            else:
                what = f"max |Δ score| {c.deviation:.3g} (tolerance {c.tolerance:g})"
            console.print(f"  {r.scoring}: {prop} fails on '{c.case}' {what} {reason}".rstrip(), highlight=False)


def report_json(reports: list[ScoringReport], meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON report."""
    return {"schema": "tvr-bench/audit/v1", **meta, "scorings": [r.as_dict() for r in reports],
            "classes": {r.scoring: r.result_class for r in reports}}


def audit_main(argv: list[str] | None = None) -> int:
    """`tvr-bench audit`: audit the scoring of every method x scoring option x post-processing (or a run's weights)."""
    parser = argparse.ArgumentParser(prog="tvr-bench audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("methods", nargs="*", help="built-in methods to audit (default: all of recipes/methods/)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--ckpt", type=Path, help="audit the trained weights of this checkpoint")
    source.add_argument("--run", type=Path, help="a run directory: its checkpoint and its saved test features")
    parser.add_argument("--postprocess", default=",".join(POSTPROCESSING),
                        help=f"comma-separated post-processing to audit (default all: {','.join(POSTPROCESSING)}; '' none)")
    parser.add_argument("--noise-videos", type=int, default=NOISE_VIDEOS, help="videos per noise set (default %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(NOISE_SEEDS), help="noise seeds (default 0 1 2)")
    parser.add_argument("--no-noise", action="store_true", help="skip the noise floor")
    parser.add_argument("--json", type=Path, default=Path("runs/audit.json"), help="report file (default %(default)s)")
    args = parser.parse_args(argv)
    from tvr_bench.recipes import method_recipes

    try:
        post = [p for p in args.postprocess.split(",") if p]
        for p in post:
            postprocessing(p)
        if args.noise_videos < 2:
            raise AuditInputError(f"--noise-videos must be at least 2, got {args.noise_videos}")
        known = method_recipes()
        for m in args.methods:
            if m not in known:
                raise AuditInputError(f"unknown method {m!r}; choose one of: {', '.join(known)}")
        if (args.ckpt or args.run) and len(args.methods) > 1:
            raise AuditInputError("--ckpt/--run audit one model: name at most one method")
        expected = args.methods[0] if args.methods else None
        jobs: list[tuple[str, Any, EvalSet | None]] = []
        if args.run:
            model, real = run_inputs(args.run, expected)
            jobs.append((str(args.run), model, real))
        elif args.ckpt:
            jobs.append((str(args.ckpt), checkpoint_method(args.ckpt, expected), None))
        else:
            jobs += [(m, builtin_method(m), None) for m in (args.methods or known)]
    except (AuditInputError, ValueError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return getattr(exn, "code", EXIT_CONFIG)
    reports: list[ScoringReport] = []
    start = time.perf_counter()
    for source_name, model, real in jobs:
        template = real if real is not None else template_set(model)
        props = test_subset(real) if real is not None else property_set(model, template=template)
        noise = None if args.no_noise else noise_sets(model, args.noise_videos, tuple(args.seeds), template)
        bank = bank_features(model, template=template) if any(postprocessing(p).needs_bank for p in post) else None
        reports += audit_method(model, post, {}, props, noise, bank)
    print_reports(reports)
    meta = {"sources": [j[0] for j in jobs], "postprocess": post, "noise": None if args.no_noise else {
        "videos": args.noise_videos, "seeds": list(args.seeds), "level": NOISE_LEVEL,
        "inputs": "N(0, rms^2) features laid out like " + ("the run's saved test features" if args.run else
                                                             "the method's encodings of random pixels and words")},
        "tolerances": TOLERANCES, "seconds": round(time.perf_counter() - start, 1)}
    from tvr_bench.results import atomic_write

    atomic_write(args.json, json.dumps(report_json(reports, meta), indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0
