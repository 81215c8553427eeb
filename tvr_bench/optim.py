"""Optimisers and learning-rate schedules of the reference implementations (pure PyTorch, no Lightning).

Two update rules and two schedules cover every method of the suite (sources in docs/methods/<m>.md,
section "Optimiser"):

* `BertAdam` + `warmup_cosine_overall`: CLIP4Clip (`modules/optimization.py`) and DRL
  (`tvr/models/optimization.py`) - Adam **without** bias correction, each tensor's gradient clipped
  to norm `max_grad_norm` inside the step, weight decay added to the update (so scaled by the learning
  rate), and a schedule that warms up over the first `warmup` fraction of training and then follows a
  half cosine of the *overall* progress (it drops from 1 to cos-value at the end of warm-up).
* `LegacyAdamW` + `warmup_cosine`: X-Pool and T-MASS (`modules/optimization.py`, the AdamW of older
  HuggingFace transformers releases) - bias correction folded into the step size with ε added to the
  *uncorrected* sqrt(v), and the weight decay applied after the Adam update; the schedule warms up for
  `int(ratio · total)` steps and then follows a half cosine of the post-warm-up progress.

Both schedules are multipliers of a group's base learning rate for `torch.optim.lr_scheduler.LambdaLR`,
indexed by the number of optimiser steps already taken: the first step uses factor 0 in every reference
(a zero learning rate; Adam's moments still take the first gradient).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils import clip_grad_norm_

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]

#: Names of the reference update rules a method can declare (`RetrievalModule.REFERENCE_OPTIMIZER`).
REFERENCE_OPTIMIZERS = ("bertadam", "legacy_adamw")
#: (betas, eps) each reference uses: BertAdam(b1=0.9, b2=0.98, e=1e-6) in CLIP4Clip main_task_retrieval.py:209-212
#: and DRL main.py:204-207; X-Pool / T-MASS construct their AdamW with its defaults (modules/optimization.py:113-115).
REFERENCE_ADAM_ARGS = {"bertadam": ((0.9, 0.98), 1e-6), "legacy_adamw": ((0.9, 0.999), 1e-6)}


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up from 0 over `warmup_steps`, then a half cosine of the post-warm-up progress.

    `step` is the number of optimiser steps already taken (0 for the first). Past `total_steps` the
    factor stays 0. This is X-Pool / T-MASS's `get_cosine_schedule_with_warmup` (num_cycles 0.5) and the
    suite's default schedule.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_overall(step: int, total_steps: int, warmup: float) -> float:
    """Learning-rate factor of BertAdam's `warmup_cosine`: x = step / total; x / warmup while x < warmup, else 0.5 (1 + cos(pi x)).

    The cosine runs over the overall progress x (not the post-warm-up part), so the factor falls from
    about 1 to 0.5 (1 + cos(pi warmup)) (0.976 for warmup 0.1) when warm-up ends and reaches 0 at the
    last step. `warmup` is a fraction of training, not a number of steps.
    """
    x = step / total_steps
    if x < warmup:
        return x / warmup
    return 0.5 * (1.0 + math.cos(math.pi * x))


def schedule_lambda(kind: str, total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """The LambdaLR multiplier for a schedule `kind` ('cosine': `warmup_cosine`; 'cosine_overall': `warmup_cosine_overall`)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    if kind == "cosine":
        warmup_steps = int(warmup_ratio * total_steps)
        return lambda step: warmup_cosine(step, warmup_steps, total_steps)
    if kind == "cosine_overall":
        return lambda step: warmup_cosine_overall(step, total_steps, warmup_ratio)
    raise ValueError(f"unknown schedule {kind!r}; choose 'cosine' or 'cosine_overall'")


class _MomentAdam(torch.optim.Optimizer):
    """The loop both reference rules share: every parameter with a dense gradient, its step count and two
    moment buffers; a subclass gives the update of one parameter (`_update`)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient; returns the closure's loss (if any)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                self._update(p, state, group)
        return loss

    def _update(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        raise NotImplementedError


class BertAdam(_MomentAdam):
    """Adam without bias correction, per-tensor gradient-norm clipping and learning-rate-scaled weight decay.

    Per parameter p with gradient g, each step: g <- g · min(1, max_grad_norm / (||g|| + 1e-6)) (in
    place, as `clip_grad_norm_` on that tensor alone; skipped when max_grad_norm <= 0);
    m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g²; p <- p - lr (m / (sqrt(v) + eps) + wd p).
    The schedule is not part of the optimiser: drive `lr` with a LambdaLR of `warmup_cosine_overall`.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
    ) -> None:
        _check_adam_args(lr, betas, eps, weight_decay)
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "max_grad_norm": max_grad_norm}
        super().__init__(params, defaults)

    def _update(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Clip this tensor's gradient, update the raw moments, step without bias correction."""
        beta1, beta2 = group["betas"]
        if group["max_grad_norm"] > 0:
            clip_grad_norm_(p, group["max_grad_norm"])
        grad = p.grad
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        update = exp_avg / (exp_avg_sq.sqrt() + group["eps"])
        if group["weight_decay"] > 0.0:
            update += group["weight_decay"] * p
        p.add_(-(group["lr"] * update))
        state["step"] += 1


class LegacyAdamW(_MomentAdam):
    """AdamW of older HuggingFace transformers releases (vendored by X-Pool and T-MASS).

    Per parameter, at step t (1-based): m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g²;
    p <- p - lr · sqrt(1 - b2^t) / (1 - b1^t) · m / (sqrt(v) + eps) (eps on the *uncorrected* sqrt(v);
    without bias correction when `correct_bias` is False); then p <- p - lr · wd · p (decay after the
    update). `torch.optim.AdamW` instead decays first and adds eps to the corrected sqrt(v).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
    ) -> None:
        _check_adam_args(lr, betas, eps, weight_decay)
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "correct_bias": correct_bias}
        super().__init__(params, defaults)

    def _update(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        """Update the moments, step with the bias correction folded into the step size, then decay."""
        beta1, beta2 = group["betas"]
        grad = p.grad
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        state["step"] += 1
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        step_size = group["lr"]
        if group["correct_bias"]:
            step = state["step"]
            step_size = step_size * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
        p.addcdiv_(exp_avg, denom, value=-step_size)
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])


def _check_adam_args(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if lr < 0.0:
        raise ValueError(f"learning rate must be >= 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    if eps < 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if weight_decay < 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
