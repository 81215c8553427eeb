"""The scoring audit (tvr_bench/audit.py): each property check on toy scorers that break exactly one property, the
classes of every built-in method x scoring option x evaluator post-processing (iterating `method_recipes()` and
each class's `SCORING_OPTIONS`, so a method added later is audited here without new test code), the noise floor,
and `tvr-bench audit`'s bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tests.data_fixtures import tiny_root  # noqa: F401 (fixture)
from tvr_bench.audit import (
    EvalSet,
    Scoring,
    audit_main,
    audit_scoring,
    builtin_method,
    chance_interval,
    classify,
    honest_options,
    noise_floor,
    noise_sets,
    option_combinations,
    property_checks,
    property_set,
    scorings,
    template_set,
)
from tvr_bench.methods.base import RetrievalModule
from tvr_bench.postprocessing import POSTPROCESSING
from tvr_bench.recipes import method_recipes
from tvr_bench.results import GALLERY_NORMALISED, LABEL_DEPENDENT, PAIRWISE, RANKED_CLASSES, TRANSDUCTIVE

#: the class each post-processing must get on top of a pairwise scoring (docs/leaderboard.md)
POST_CLASSES = {"dsl": TRANSDUCTIVE, "sinkhorn": TRANSDUCTIVE, "qbnorm": GALLERY_NORMALISED, "sknorm": GALLERY_NORMALISED}


class Toy(nn.Module):
    """A minimal method for the evaluator's scoring path: dot products, with one optional way to cheat."""

    SCORING_OPTIONS = {"cheat": ("none", "labels", "queries", "gallery", "order")}

    def __init__(self, cheat: str = "none"):
        super().__init__()
        self.cheat = cheat
        self.hparams = {"eval_memory_mb": 64.0}

    scoring_options = RetrievalModule.scoring_options
    using_scoring_options = RetrievalModule.using_scoring_options

    @property
    def method_name(self) -> str:
        """`toy` or `toy_<cheat>`."""
        return "toy" if self.cheat == "none" else f"toy_{self.cheat}"

    def prepare_eval_features(self, text: dict[str, Tensor], video: dict[str, Tensor], t2v: Tensor):
        """Set-level features: the labels, the query mean, the gallery size or the row order, by `cheat`."""
        n = len(t2v)
        extra = {"labels": t2v.float(), "queries": text["e"].mean(0).expand(n, -1).sum(1),
                 "order": torch.arange(n, dtype=torch.float32)}
        if self.cheat in extra:
            text = {**text, "x": extra[self.cheat]}
        if self.cheat == "gallery":
            video = {**video, "x": torch.full((len(video["e"]),), float(len(video["e"])))}
        return text, video

    def similarity(self, text: dict[str, Tensor], video: dict[str, Tensor]) -> Tensor:
        """t . v, plus the cheat's term."""
        sim = text["e"] @ video["e"].T
        if self.cheat == "labels":  # a bonus on the labelled video (the leak the audit exists for; one block)
            sim = sim + 5.0 * (text["x"][:, None] == torch.arange(sim.shape[1])[None, :].float())
        elif self.cheat in ("queries", "order"):
            sim = sim + 1e-3 * text["x"][:, None]
        elif self.cheat == "gallery":
            sim = sim + 1e-3 * video["x"][None, :]
        return sim

    def pair_cost_bytes(self, text: Any, video: Any) -> int:
        """One float per pair."""
        return 4


def toy_set(n_video: int = 12, seed: int = 0) -> EvalSet:
    """Gaussian texts and videos with 1, 3, 2, ... captions per video."""
    g = torch.Generator().manual_seed(seed)
    counts = [(1, 3, 2)[i % 3] for i in range(n_video)]
    t2v = torch.repeat_interleave(torch.arange(n_video), torch.tensor(counts))
    return EvalSet({"e": torch.randn(len(t2v), 8, generator=g)}, {"e": torch.randn(n_video, 8, generator=g)}, t2v)


@pytest.mark.parametrize("cheat, failing, verdict", [
    ("none", set(), PAIRWISE),
    ("labels", {"label"}, LABEL_DEPENDENT),
    ("queries", {"query"}, TRANSDUCTIVE),
    ("order", {"query", "order"}, TRANSDUCTIVE),
    ("gallery", {"gallery"}, GALLERY_NORMALISED),
])  # fmt: skip
def test_each_check_catches_what_it_is_for(cheat: str, failing: set[str], verdict: str) -> None:
    """A scorer that breaks one property fails that check (and what it implies), by a reported amount, and gets
    its class; an honest scorer passes every check exactly."""
    report = audit_scoring(Scoring(Toy(), {"cheat": cheat}), toy_set())
    assert set(report.failures()) == failing
    assert report.result_class == verdict
    assert all(c.passed for c in report.checks if c.property not in failing)
    for prop, worst in report.failures().items():  # "by how much": the largest score change, far above tolerance
        assert worst.error is None and worst.deviation > 10 * worst.tolerance, (prop, worst)
    if cheat == "none":
        assert max(c.deviation for c in report.checks) <= 1e-6


def test_noise_floor_flags_a_label_leak_and_passes_chance() -> None:
    """On pure noise a scorer that reads the labels ranks the labelled video first far above chance; an honest one
    stays inside the chance interval."""
    sets = [EvalSet({"e": torch.randn(150, 8, generator=torch.Generator().manual_seed(s))},
                    {"e": torch.randn(150, 8, generator=torch.Generator().manual_seed(100 + s))}, torch.arange(150))
            for s in range(2)]
    honest, leak = noise_floor(Scoring(Toy(), {"cheat": "none"}), sets), noise_floor(Scoring(Toy(), {"cheat": "labels"}), sets)
    assert honest.passed and leak.detail["mean"] > 20.0 and not leak.passed  # chance: 0.67 %
    assert classify([leak]) == LABEL_DEPENDENT
    chance, lo, hi = chance_interval(150, 150, 2)
    assert chance == pytest.approx(100 / 150) and lo <= chance <= hi and hi < 5.0


def test_chance_interval_covers_random_scores() -> None:
    """The parametric chance interval holds the R@1 of random score matrices (its level is 99.9%)."""
    from tvr_bench.metrics import retrieval_metrics

    chance, lo, hi = chance_interval(100, 100, 1)
    g = torch.Generator().manual_seed(0)
    r1 = [retrieval_metrics(torch.randn(100, 100, generator=g), torch.arange(100))["t2v/R@1"] for _ in range(200)]
    assert sum(lo <= r <= hi for r in r1) >= 198 and abs(sum(r1) / len(r1) - chance) < 0.3


@pytest.mark.parametrize("method", method_recipes())
def test_every_builtin_scoring_is_audited_and_classed(method: str) -> None:
    """Every scoring option combination of every built-in method and every post-processing on its default scoring
    runs through the checks without an error of the audit itself; the default scoring is rankable (an option that
    reproduces a reference must never pass as the honest default), and each post-processing gets its class."""
    model = builtin_method(method)
    template = template_set(model)
    s = property_set(model, template=template)
    from tvr_bench.audit import bank_features

    reports = {sc.label: (sc, audit_scoring(sc, s)) for sc in scorings(model, None, {}, bank_features(model, template=template))}
    assert len(reports) == len(option_combinations(type(model)) or [{}]) + len(POSTPROCESSING)
    default = next(r for sc, r in reports.values() if sc.post is None and sc.options == (option_combinations(type(model)) or [{}])[0])
    assert default.result_class in RANKED_CLASSES, default.failures()
    for sc, report in reports.values():
        assert len(report.checks) >= 10  # label x2, query x>=5, gallery x2, order
        if sc.post is not None and default.result_class == PAIRWISE:
            assert report.result_class == POST_CLASSES[sc.post], (sc.label, report.failures())


def test_tmass_reference_pairing_is_label_dependent_and_the_query_pairing_pairwise() -> None:
    """The known leak: T-MASS `pairing: reference` reads the test labels (fails label invariance), with either
    eps mode; `pairing: query` passes every check, with the same per-pair draws (eps_mode pair) too."""
    model = builtin_method("tmass")
    s = property_set(model)
    for eps in ("text", "pair"):
        ref = audit_scoring(Scoring(model, {"pairing": "reference", "eps_mode": eps}), s)
        assert ref.result_class == LABEL_DEPENDENT and "label" in ref.failures()
        query = audit_scoring(Scoring(model, {"pairing": "query", "eps_mode": eps}), s)
        assert query.result_class == PAIRWISE and max(c.deviation for c in query.checks) <= 1e-5
    with model.using_scoring_options(pairing="reference", eps_mode="pair"):
        found = honest_options(model, s)
    assert found == ({"pairing": "query", "eps_mode": "pair"}, PAIRWISE)
    assert model.scoring_options() == {"pairing": "query", "eps_mode": "text"}  # restored after the block


def test_tmass_reference_pairing_beats_chance_on_pure_noise() -> None:
    """The issue's observation, through the evaluator's path: on pure-noise features the reference pairing ranks the
    ground truth first far above chance, the query pairing does not."""
    model = builtin_method("tmass")
    sets = noise_sets(model, n_video=120, seeds=(0,))
    ref = noise_floor(Scoring(model, {"pairing": "reference", "eps_mode": "text"}), sets)
    query = noise_floor(Scoring(model, {"pairing": "query", "eps_mode": "text"}), sets)
    assert not ref.passed and ref.detail["mean"] > 5 * ref.detail["chance"]
    assert query.passed


def test_evaluator_records_the_verdict_and_scores_twice(tmp_path: Path) -> None:
    """The evaluator's test-time audit gives `last_audit`; a label-dependent configuration is also scored with the
    honest options (same features), reported under `honest/...`, and the verdict is printed under the table."""
    from types import SimpleNamespace

    from tvr_bench.callbacks.evaluator import RetrievalEvaluator

    model = builtin_method("tmass")
    model.pairing, model.eps_mode = "reference", "pair"
    s = property_set(model)
    evaluator = RetrievalEvaluator(print_table=False, bootstrap_resamples=0, postprocess=["sinkhorn"])
    keys = [f"v{int(v):02d}" for v in range(s.n_video)]
    seen: dict[int, int] = {}
    captions = []
    for v in s.text_to_video.tolist():
        captions.append(f"v{v:02d}#{seen.get(v, 0)}")
        seen[v] = seen.get(v, 0) + 1
    evaluator.on_test_batch_end(None, model, {
        "text": {k: v for k, v in s.text.items() if k != "index"},
        "video": {k: v for k, v in s.video.items() if k != "index"},
        "video_key": keys, "caption_key": captions, "caption_video": s.text_to_video}, None, 0)  # fmt: skip
    model.log = lambda *a, **k: None
    metrics = evaluator._evaluate(SimpleNamespace(is_global_zero=True), model, "test")
    assert evaluator.last_audit["result_class"] == LABEL_DEPENDENT
    assert evaluator.last_post["sinkhorn"]["result_class"] == LABEL_DEPENDENT  # post-processing never launders it
    companion = evaluator.last_companion
    assert companion["options"] == {"pairing": "query", "eps_mode": "pair"} and companion["result_class"] == PAIRWISE
    assert companion["method"] == "tmass" and set(companion["changed"]) == {"pairing"}
    expected = Scoring(model, {"pairing": "query", "eps_mode": "pair"})(s)
    from tvr_bench.metrics import retrieval_metrics

    assert metrics["honest/t2v/R@1"] == pytest.approx(retrieval_metrics(expected, s.text_to_video)["t2v/R@1"])
    assert "sinkhorn/t2v/R@1" in metrics and "sinkhorn/v2t/R@1" not in metrics
    assert model.pairing == "reference"  # the configured options are back


def _write_ckpt(path: Path, model: nn.Module, class_path: str | None) -> Path:
    hp = dict(model.hparams)
    if class_path:
        hp["_class_path"] = class_path
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hp}, path)
    return path


def test_bad_input_gives_one_error_line_and_an_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """An unknown method, a run without saved features, a checkpoint of another method: one `error:` line each."""
    def run(*argv: str) -> tuple[int, list[str]]:
        code = audit_main(list(argv) + ["--json", str(tmp_path / "a.json")])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        return code, err

    code, err = run("nosuchmethod")
    assert code == 2 and len(err) == 1 and err[0].startswith("error: unknown method 'nosuchmethod'") and "tmass" in err[0]
    (tmp_path / "run").mkdir()
    code, err = run("--run", str(tmp_path / "run"))
    assert code == 3 and len(err) == 1 and "no saved test features" in err[0] and "save_features" in err[0]
    model = builtin_method("clip4clip")
    ckpt = _write_ckpt(tmp_path / "c4c.ckpt", model, "tvr_bench.methods.clip4clip.CLIP4Clip")
    code, err = run("tmass", "--ckpt", str(ckpt))
    assert code == 2 and len(err) == 1 and "holds a tvr_bench.methods.clip4clip.CLIP4Clip model, not tmass" in err[0]
    bare = _write_ckpt(tmp_path / "bare.ckpt", model, None)
    code, err = run("xpool", "--ckpt", str(bare))
    assert code == 2 and len(err) == 1 and "do not fit XPool" in err[0] and "another method" in err[0]
    code, err = run("--ckpt", str(tmp_path / "missing.ckpt"))
    assert code == 3 and len(err) == 1 and "does not exist" in err[0]


def test_audit_command_on_a_checkpoint_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`tvr-bench audit clip4clip --ckpt X` audits those weights: the table on stdout, the JSON report with a class
    for every scoring."""
    model = builtin_method("clip4clip")
    with torch.no_grad():
        model.backbone.clip.text_projection.weight.mul_(1.5)  # trained weights, not the recipe's init
    ckpt = _write_ckpt(tmp_path / "c4c.ckpt", model, "tvr_bench.methods.clip4clip.CLIP4Clip")
    out = tmp_path / "audit.json"
    assert audit_main(["clip4clip", "--ckpt", str(ckpt), "--postprocess", "dsl", "--noise-videos", "40", "--seeds", "0",
                       "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["classes"] == {"clip4clip": PAIRWISE, "clip4clip + dsl": TRANSDUCTIVE}
    assert "clip4clip + dsl" in capsys.readouterr().out


@pytest.mark.slow
def test_audit_command_over_every_method_option_and_post_processing(tmp_path: Path) -> None:
    """`tvr-bench audit` with its defaults (every built-in method x scoring option x post-processing, noise floor on
    300 videos x 3 seeds): every noise floor agrees with label invariance (it fails exactly where the scoring reads
    the labels), every method's default scoring is rankable, T-MASS's reference pairing is label-dependent, and
    every other option of the built-in methods is pairwise."""
    out = tmp_path / "audit.json"
    assert audit_main(["--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["noise"]["videos"] == 300 and report["noise"]["seeds"] == [0, 1, 2]
    for s in report["scorings"]:
        checks = {p: [c for c in s["checks"] if c["property"] == p] for p in ("label", "noise")}
        assert len(checks["noise"]) == 1 and checks["noise"][0]["detail"]["t2v_R@1"]
        assert checks["noise"][0]["passed"] == all(c["passed"] for c in checks["label"]), s["scoring"]
    from tvr_bench.recipes import method_class

    expected = sum(len(option_combinations(method_class(m)) or [{}]) + len(POSTPROCESSING) for m in method_recipes())
    assert len(report["scorings"]) == expected  # every method x option, every post-processing
    for label, verdict in report["classes"].items():
        if "pairing=reference" in label:
            assert verdict == LABEL_DEPENDENT, label
        elif "+ " in label:
            assert verdict == POST_CLASSES[label.rsplit("+ ", 1)[1]], label
        elif label.split()[0] in ("clip4clip", "clip4clip_seqtransf", "xpool", "drl", "tmass", "mascot"):
            assert verdict == PAIRWISE, label  # the statement about the built-in methods of this version


@pytest.mark.slow
def test_paper_scoring_on_synthetic_reports_both_numbers(tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    """T-MASS with the paper profile's layers on the synthetic benchmark (tiny backbone, one epoch): a warning at the
    start, both numbers in the table (the honest one first), a warning under it, two result JSONs that name each
    other, and a leaderboard that ranks the honest row and puts the reference pairing under 'Not valid'."""
    import sys

    from tvr_bench.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["tvr-bench"])
    r = Path(__file__).resolve().parents[1] / "recipes"
    layers = [f"--config={r / f}" for f in ("base.yaml", "methods/tmass.yaml", "data/synthetic.yaml", "profiles/paper.yaml",
                                            "profiles/paper_tmass.yaml")]
    small = ["--model.init_args.backbone", "tiny", "--data.init_args.root", str(tiny_root), "--data.init_args.num_workers",
             "0", "--trainer.max_epochs", "1", "--trainer.default_root_dir", "runs/x", "--leaderboard.runs_dir", "runs",
             "--leaderboard.bootstrap_resamples", "200", "--evaluator.bootstrap_resamples", "200",
             "--leaderboard.qualitative", "0", "--evaluator.save_features", "true"]
    assert main(["bench", *layers, *small]) == 0
    out = capsys.readouterr().out
    warnings_at = [i for i, line in enumerate(out.splitlines()) if line.startswith("warning: tmass_refpairing")]
    lines = out.splitlines()
    table = [i for i, line in enumerate(lines) if "pairwise (pairing=query)" in line]
    ref_rows = [i for i, line in enumerate(lines) if "label-dependent (pairing=reference)" in line]
    assert len(warnings_at) == 2 and warnings_at[0] < table[0] < ref_rows[0] < warnings_at[1]
    assert "scored the same test features twice" in out
    results = {p.name: json.loads(p.read_text()) for p in (tmp_path / "runs" / "results").glob("*.json")}
    honest = next(v for k, v in results.items() if k.startswith("tmass__"))
    ref = next(v for k, v in results.items() if k.startswith("tmass_refpairing__"))
    assert honest["protocol"]["result_class"] == PAIRWISE and ref["protocol"]["result_class"] == LABEL_DEPENDENT
    assert honest["protocol"]["pairing"] == "query" and ref["protocol"]["pairing"] == "reference"
    assert honest["protocol"]["eps_mode"] == ref["protocol"]["eps_mode"] == "pair" == honest["hparams"]["eps_mode"]
    assert honest["companion"]["file"] in results and ref["companion"]["file"] in results
    assert honest["eval"]["texts"] == ref["eval"]["texts"] and honest["eval"]["videos"] == ref["eval"]["videos"]
    md = (tmp_path / "runs" / "leaderboard.md").read_text()
    plain, invalid = md.split("## Not valid retrieval results")
    assert "| ★ | tmass (profile=paper, eps_mode=pair)" in plain and "tmass_refpairing" not in plain.split("## Efficiency")[0]
    assert "tmass_refpairing (profile=paper, pairing=reference, eps_mode=pair)" in invalid
    run = next((tmp_path / "runs" / "x").rglob("result.honest.json")).parent
    assert audit_main(["--run", str(run), "--postprocess", "", "--no-noise", "--json", str(tmp_path / "a.json")]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["classes"] == {
        "tmass pairing=query eps_mode=text": PAIRWISE, "tmass pairing=query eps_mode=pair": PAIRWISE,
        "tmass_refpairing pairing=reference eps_mode=text": LABEL_DEPENDENT,
        "tmass_refpairing pairing=reference eps_mode=pair": LABEL_DEPENDENT}
