"""The references' optimisers and schedules (tvr_bench/optim.py) and `optimizer: reference` in the modules.

Every expected value is computed here from the reference formulas written out independently in numpy
(CLIP4Clip modules/optimization.py BertAdam + warmup_cosine, X-Pool modules/optimization.py AdamW +
get_cosine_schedule_with_warmup; see the method cards, section "Optimiser"), never by calling the code
under test.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from tvr_bench.optim import BertAdam, LegacyAdamW, schedule_lambda, warmup_cosine, warmup_cosine_overall


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------- reference formulas (numpy)
def ref_bert_factor(step: int, total: int, warmup: float) -> float:
    """BertAdam's warmup_cosine at progress step / total (step = updates already taken)."""
    x = step / total
    return x / warmup if x < warmup else 0.5 * (1.0 + np.cos(np.pi * x))


def ref_hf_factor(step: int, warmup_steps: int, total: int) -> float:
    """get_cosine_schedule_with_warmup (0.5 cycles) at `step`."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return max(0.0, 0.5 * (1.0 + np.cos(np.pi * progress)))


def ref_clip(g: np.ndarray, max_norm: float) -> np.ndarray:
    """torch's clip_grad_norm_ of one tensor: scale by min(1, max_norm / (||g|| + 1e-6))."""
    return g * min(1.0, max_norm / (np.sqrt((g**2).sum()) + 1e-6))


def ref_global_clip(grads: list[np.ndarray], max_norm: float) -> list[np.ndarray]:
    """clip_grad_norm_ over several tensors: one coefficient from the norm of all of them."""
    total = np.sqrt(sum((g**2).sum() for g in grads))
    coef = min(1.0, max_norm / (total + 1e-6))
    return [g * coef for g in grads]


def ref_bertadam(p, g, m, v, lr, b1, b2, eps, wd, max_norm):
    """One BertAdam update of one tensor; returns (p, m, v)."""
    g = ref_clip(g, max_norm) if max_norm > 0 else g
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    update = m / (np.sqrt(v) + eps) + wd * p
    return p - lr * update, m, v


def ref_legacy_adamw(p, g, m, v, t, lr, b1, b2, eps, wd):
    """One update of the vendored transformers AdamW (correct_bias=True) at step t (1-based); returns (p, m, v)."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    step_size = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
    p = p - step_size * m / (np.sqrt(v) + eps)
    p = p - lr * wd * p
    return p, m, v


# ---------------------------------------------------------------------- schedules
def test_schedules_match_the_reference_formulas_and_start_at_zero():
    """Both schedules, every step of a 37-step run, equal the references' formulas; the first factor is 0."""
    total = 37
    for ratio in (0.0, 0.1, 0.3):
        hf = schedule_lambda("cosine", total, ratio)
        bert = schedule_lambda("cosine_overall", total, ratio)
        for step in range(total):
            assert hf(step) == pytest.approx(ref_hf_factor(step, int(ratio * total), total), abs=1e-15)
            if ratio > 0:
                assert bert(step) == pytest.approx(ref_bert_factor(step, total, ratio), abs=1e-15)
        if ratio > 0:
            assert hf(0) == 0.0 and bert(0) == 0.0  # no one-step offset: the first update has lr 0
    # hand values: BertAdam's cosine runs over the overall progress, so warm-up ends on a drop
    assert warmup_cosine_overall(5, 100, 0.1) == pytest.approx(0.5)
    assert warmup_cosine_overall(9, 100, 0.1) == pytest.approx(0.9)
    assert warmup_cosine_overall(10, 100, 0.1) == pytest.approx(0.5 * (1 + math.cos(0.1 * math.pi)))  # 0.9755
    assert warmup_cosine_overall(50, 100, 0.1) == pytest.approx(0.5)
    assert warmup_cosine(10, 10, 100) == 1.0 and warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0, abs=1e-15) and warmup_cosine(150, 10, 100) == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="unknown schedule"):
        schedule_lambda("linear", 10, 0.1)
    with pytest.raises(ValueError, match="warmup_ratio"):
        schedule_lambda("cosine", 10, 1.0)


# ---------------------------------------------------------------------- update rules
def _grads(rng: np.random.Generator, shapes: list[tuple[int, ...]], step: int) -> list[np.ndarray]:
    """Per-step gradients: the first tensor's norm is well above 1 (clipped), the others below (not)."""
    scales = [3.0, 0.05, 1e-7]
    return [rng.standard_normal(s) * scales[i % 3] * (1 + 0.3 * step) for i, s in enumerate(shapes)]


def test_bertadam_matches_the_closed_form_update():
    """BertAdam + cosine_overall LambdaLR over 6 steps (float64) == the per-element reference update."""
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (4,), (2, 5)]
    init = [rng.standard_normal(s) for s in shapes]
    wds = [0.2, 0.0, 0.2]
    params = [torch.nn.Parameter(torch.tensor(x)) for x in init]
    opt = BertAdam(
        [{"params": [params[0]], "weight_decay": wds[0], "lr": 0.05},
         {"params": [params[1]], "weight_decay": wds[1]},
         {"params": [params[2]], "weight_decay": wds[2], "lr": 0.05}],
        lr=0.1, betas=(0.9, 0.98), eps=1e-6, max_grad_norm=1.0,
    )  # fmt: skip
    total, warmup = 8, 0.3
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule_lambda("cosine_overall", total, warmup))
    ref_p = [x.copy() for x in init]
    ref_m = [np.zeros_like(x) for x in init]
    ref_v = [np.zeros_like(x) for x in init]
    base_lr = [0.05, 0.1, 0.05]
    for step in range(6):
        grads = _grads(rng, shapes, step)
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g)
        opt.step()
        sched.step()
        for i in range(3):
            lr = base_lr[i] * ref_bert_factor(step, total, warmup)
            ref_p[i], ref_m[i], ref_v[i] = ref_bertadam(ref_p[i], grads[i], ref_m[i], ref_v[i], lr, 0.9, 0.98, 1e-6, wds[i], 1.0)
            np.testing.assert_allclose(params[i].detach().numpy(), ref_p[i], rtol=0, atol=1e-12)
            np.testing.assert_allclose(opt.state[params[i]]["exp_avg"].numpy(), ref_m[i], rtol=0, atol=1e-12)
        if step == 0:  # factor 0: nothing moves, the moments took the (clipped) gradient
            np.testing.assert_array_equal(params[0].detach().numpy(), init[0])
    assert np.abs(ref_p[0] - init[0]).max() > 1e-3  # the check is not vacuous
    # the first tensor's gradients were clipped in place (norm 1 after the step), the small ones not
    assert float(params[0].grad.norm()) == pytest.approx(1.0, abs=1e-5)


def test_legacy_adamw_matches_the_closed_form_update_and_differs_from_torch_adamw():
    """The vendored AdamW over 6 steps (float64) == the reference update; torch AdamW is measurably different."""
    rng = np.random.default_rng(1)
    shapes = [(3, 4), (4,), (2, 5)]
    init = [rng.standard_normal(s) for s in shapes]
    params = [torch.nn.Parameter(torch.tensor(x)) for x in init]
    twins = [torch.nn.Parameter(torch.tensor(x)) for x in init]
    groups = lambda ps: [{"params": ps[:2], "lr": 1e-3}, {"params": ps[2:], "lr": 1e-2}]  # noqa: E731
    opt = LegacyAdamW(groups(params), betas=(0.9, 0.999), eps=1e-6, weight_decay=0.2)
    torch_opt = torch.optim.AdamW(groups(twins), betas=(0.9, 0.999), eps=1e-6, weight_decay=0.2)
    total, warmup_steps = 10, 2
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule_lambda("cosine", total, 0.2))
    torch_sched = torch.optim.lr_scheduler.LambdaLR(torch_opt, schedule_lambda("cosine", total, 0.2))
    ref_p = [x.copy() for x in init]
    ref_m = [np.zeros_like(x) for x in init]
    ref_v = [np.zeros_like(x) for x in init]
    base_lr = [1e-3, 1e-3, 1e-2]
    for step in range(6):
        grads = _grads(rng, shapes, step)
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = torch.tensor(g), torch.tensor(g)
        opt.step(), torch_opt.step(), sched.step(), torch_sched.step()
        for i in range(3):
            lr = base_lr[i] * ref_hf_factor(step, warmup_steps, total)
            ref_p[i], ref_m[i], ref_v[i] = ref_legacy_adamw(ref_p[i], grads[i], ref_m[i], ref_v[i], step + 1, lr, 0.9, 0.999, 1e-6, 0.2)
            np.testing.assert_allclose(params[i].detach().numpy(), ref_p[i], rtol=0, atol=1e-12)
    # a tiny gradient (1e-7), one step at lr 1: eps on the uncorrected sqrt(v) gives
    # sqrt(1 - b2) / (1 - b1) * m / (sqrt(v) + eps) = 0.00315, torch AdamW 1 / (1 - b1) * m / (sqrt(v / (1 - b2)) + eps) = 0.0909
    ours, theirs = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64)), torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    ours.grad, theirs.grad = torch.full_like(ours, 1e-7), torch.full_like(theirs, 1e-7)
    LegacyAdamW([ours], lr=1.0).step()
    torch.optim.AdamW([theirs], lr=1.0, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0).step()
    m, v = 0.1 * 1e-7, 0.001 * 1e-14
    assert float(ours.detach()) == pytest.approx(-math.sqrt(0.001) / 0.1 * m / (math.sqrt(v) + 1e-6), rel=1e-12)
    assert float(theirs.detach()) == pytest.approx(-m / 0.1 / (math.sqrt(v / 0.001) + 1e-6), rel=1e-6)
    assert float(theirs.detach()) < 20 * float(ours.detach()) < 0


def test_optimisers_refuse_bad_arguments():
    """Negative lr / eps / decay and betas outside [0, 1) are refused with the argument named."""
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="learning rate"):
        BertAdam(p, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        LegacyAdamW(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="weight_decay"):
        LegacyAdamW(p, weight_decay=-0.1)


# ---------------------------------------------------------------------- modules
def _fake_trainer(clip: float | None = 1.0, algorithm: str | None = None, steps: int = 20) -> SimpleNamespace:
    return SimpleNamespace(gradient_clip_val=clip, gradient_clip_algorithm=algorithm, estimated_stepping_batches=steps, max_steps=-1)


def _groups_by_param(model, opt) -> dict[str, dict]:
    ids = {id(p): n for n, p in model.named_parameters()}
    return {ids[id(p)]: g for g in opt.param_groups for p in g["params"]}


def test_clip4clip_reference_groups_decay_layer_norms_and_temperature_like_bertadam():
    """CLIP4Clip seqTransf, `optimizer: reference`: BertAdam; CLIP params at backbone_lr; only biases undecayed."""
    from tvr_bench.methods.clip4clip import CLIP4Clip

    model = CLIP4Clip(head="seqTransf", freeze="embeddings", lr=1e-4, backbone_lr=1e-7, weight_decay=0.2, optimizer="reference")
    model._trainer = _fake_trainer()
    conf = model.configure_optimizers()
    opt = conf["optimizer"]
    assert isinstance(opt, BertAdam) and opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["max_grad_norm"] == 1.0
    where = _groups_by_param(model, opt)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(where) == trainable  # frozen embeddings stay out, everything else is in exactly one group
    for name, group in where.items():
        assert group["initial_lr"] == (1e-7 if name.startswith("backbone.") else 1e-4), name  # base lr (factor 0 now)
        assert group["weight_decay"] == (0.0 if "bias" in name else 0.2), name
    assert where["backbone.clip.logit_scale"]["weight_decay"] == 0.2
    assert where["backbone.clip.vision_model.post_layernorm.weight"]["weight_decay"] == 0.2
    assert where["temporal.blocks.0.ln_1.weight"]["weight_decay"] == 0.2
    # warm-up over the overall progress: factor 0 at the first step, and the drop when warm-up ends
    factors = [conf["lr_scheduler"]["scheduler"].lr_lambdas[0](s) for s in range(20)]
    assert factors[0] == 0.0 and factors[1] == pytest.approx(0.5) and factors[2] == pytest.approx(0.5 * (1 + math.cos(0.1 * math.pi)))
    # the default path is unchanged apart from the warm-up offset: AdamW, no decay on norms/biases/temperature
    default = CLIP4Clip(head="seqTransf", freeze="embeddings")
    default._trainer = _fake_trainer()
    conf = default.configure_optimizers()
    assert type(conf["optimizer"]) is torch.optim.AdamW
    where = _groups_by_param(default, conf["optimizer"])
    assert where["backbone.clip.logit_scale"]["weight_decay"] == 0.0
    assert where["temporal.blocks.0.ln_1.weight"]["weight_decay"] == 0.0
    assert conf["lr_scheduler"]["scheduler"].lr_lambdas[0](0) == 0.0


@pytest.mark.parametrize("method", ["xpool", "tmass"])
def test_xpool_and_tmass_reference_groups_decay_everything(method: str):
    """X-Pool / T-MASS `optimizer: reference`: the vendored AdamW, two learning rates, decay on every parameter."""
    from tvr_bench.methods.tmass import TMASS
    from tvr_bench.methods.xpool import XPool

    cls = {"xpool": XPool, "tmass": TMASS}[method]
    model = cls(lr=1e-5, backbone_lr=1e-6, weight_decay=0.2, betas=(0.9, 0.999), optimizer="reference")
    model._trainer = _fake_trainer()
    opt = model.configure_optimizers()["optimizer"]
    assert isinstance(opt, LegacyAdamW) and opt.defaults["correct_bias"]
    assert {(g["initial_lr"], g["weight_decay"]) for g in opt.param_groups} == {(1e-6, 0.2), (1e-5, 0.2)}
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_reference_optimizer_needs_a_declaration_and_the_reference_clip():
    """A method without REFERENCE_OPTIMIZER, an unknown value, or a trainer without the global 1.0 clip are refused."""
    from tvr_bench.methods.base import RetrievalModule
    from tvr_bench.methods.clip4clip import CLIP4Clip
    from tvr_bench.methods.mascot import MASCOT
    from tvr_bench.methods.tmass import TMASS

    with pytest.raises(ValueError, match="declares no reference optimiser"):
        RetrievalModule(optimizer="reference")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        CLIP4Clip(optimizer="bertadam")
    assert MASCOT.REFERENCE_OPTIMIZER == "bertadam"
    with pytest.raises(ValueError, match=r"uses betas \(0.9, 0.98\)"):
        CLIP4Clip(optimizer="reference", betas=(0.9, 0.999))
    with pytest.raises(ValueError, match=r"uses betas \(0.9, 0.999\)"):
        TMASS(optimizer="reference")  # forgot the X-Pool/T-MASS betas of the recipe
    model = CLIP4Clip(optimizer="reference")
    for trainer in (_fake_trainer(clip=None), _fake_trainer(clip=0.5), _fake_trainer(algorithm="value")):
        model._trainer = trainer
        with pytest.raises(ValueError, match="gradient_clip_val"):
            model.configure_optimizers()


# ---------------------------------------------------------------------- Lightning end to end
class _Recorder(L.Callback):
    """Records every trainable parameter and its (unclipped, pre-step) gradient before each optimiser step."""

    def __init__(self) -> None:
        self.params: list[dict[str, np.ndarray]] = []
        self.grads: list[dict[str, np.ndarray]] = []
        self.lrs: list[list[float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        self.params.append({n: p.detach().double().numpy().copy() for n, p in named})
        self.grads.append({n: p.grad.detach().double().numpy().copy() for n, p in named if p.grad is not None})
        self.lrs.append([g["lr"] for g in optimizer.param_groups])

    def on_train_end(self, trainer, pl_module) -> None:
        self.params.append({n: p.detach().double().numpy().copy() for n, p in pl_module.named_parameters() if p.requires_grad})


def _batches(n: int, size: int = 4, frames: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    words = ["a", "dog", "runs", "on", "red", "grass", "cat", "sleeps", "blue", "car"]
    out = []
    for _ in range(n):
        caps = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (5,), generator=g)) for _ in range(size)]
        out.append({
            "captions": caps,
            "frames": torch.randn(size, frames, 3, 64, 64, generator=g),
            "frame_mask": torch.ones(size, frames, dtype=torch.bool),
            "video_key": [f"v{i}" for i in range(size)],
        })  # fmt: skip
    return out


@pytest.mark.parametrize("method", ["clip4clip", "xpool"])
def test_lightning_reference_steps_equal_the_reference_loop(method: str, tmp_path):
    """4 Lightning steps with `optimizer: reference` == the reference loop replayed in numpy on the same gradients:
    global clip at 1.0 (the references' training loop), then BertAdam (per-tensor clip, no bias correction,
    cosine over overall progress) or the vendored AdamW (cosine after int(ratio * total) warm-up steps)."""
    from tvr_bench.methods.clip4clip import CLIP4Clip
    from tvr_bench.methods.xpool import XPool

    L.seed_everything(0, verbose=False)
    if method == "clip4clip":
        model = CLIP4Clip(max_words=8, lr=1e-3, backbone_lr=5e-4, weight_decay=0.2, warmup_ratio=0.3, freeze="none", optimizer="reference")
    else:
        model = XPool(max_words=8, lr=1e-3, backbone_lr=5e-4, weight_decay=0.2, warmup_ratio=0.3, betas=(0.9, 0.999), dropout=0.0, optimizer="reference")
    recorder = _Recorder()
    steps = 4
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, gradient_clip_val=1.0, callbacks=[recorder], default_root_dir=tmp_path,
        limit_val_batches=0, num_sanity_val_steps=0,
    )
    loader = torch.utils.data.DataLoader(_batches(steps), batch_size=None)
    trainer.fit(model, train_dataloaders=loader)
    assert len(recorder.grads) == steps and len(recorder.params) == steps + 1
    names = list(recorder.params[0])
    bert = method == "clip4clip"
    b1, b2 = (0.9, 0.98) if bert else (0.9, 0.999)
    lr_of = {n: (5e-4 if n.startswith("backbone.") else 1e-3) for n in names}
    wd_of = {n: (0.0 if bert and "bias" in n else 0.2) for n in names}
    p = {n: recorder.params[0][n].copy() for n in names}
    m = {n: np.zeros_like(p[n]) for n in names}
    v = {n: np.zeros_like(p[n]) for n in names}
    clipped_any = False
    for k in range(steps):
        assert set(recorder.grads[k]) == set(names)
        grads = dict(zip(names, ref_global_clip([recorder.grads[k][n] for n in names], 1.0)))
        clipped_any |= np.sqrt(sum((recorder.grads[k][n] ** 2).sum() for n in names)) > 1.0
        factor = ref_bert_factor(k, steps, 0.3) if bert else ref_hf_factor(k, int(0.3 * steps), steps)
        for n in names:
            lr = lr_of[n] * factor
            if bert:
                p[n], m[n], v[n] = ref_bertadam(p[n], grads[n], m[n], v[n], lr, b1, b2, 1e-6, wd_of[n], 1.0)
            else:
                p[n], m[n], v[n] = ref_legacy_adamw(p[n], grads[n], m[n], v[n], k + 1, lr, b1, b2, 1e-6, wd_of[n])
        for n in names:  # the next recorded snapshot is the parameter after step k (float32 in the module)
            np.testing.assert_allclose(recorder.params[k + 1][n], p[n], rtol=2e-7, atol=1e-7, err_msg=f"step {k}: {n}")
    moved = max(np.abs(recorder.params[-1][n] - recorder.params[0][n]).max() for n in names)
    assert moved > 1e-4 and clipped_any  # non-trivial steps, and the global clip was exercised
