"""Contrastive losses shared by every method."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_LOGIT_SCALE = math.log(100.0)


def symmetric_infonce(sims: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Mean of text->video and video->text cross-entropy of `exp(logit_scale) * sims` with diagonal targets.

    `sims` is `[B, B]` with rows = texts and columns = videos; `logit_scale` is the log of the
    temperature (CLIP's parameter), exponentiated here as X-Pool's CLIPLoss does. CLIP4Clip's
    CrossEn(S) + CrossEn(S^T) over the scaled logits gives the same number.
    """
    scale = logit_scale.exp() if isinstance(logit_scale, Tensor) else math.exp(logit_scale)
    logits = sims * scale
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def clamp_logit_scale_(logit_scale: Tensor, max_value: float = MAX_LOGIT_SCALE) -> None:
    """Clamp CLIP's log temperature in place to at most ln(100), as every reference does after a step."""
    with torch.no_grad():
        logit_scale.clamp_(max=max_value)
