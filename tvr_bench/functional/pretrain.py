"""Image-text contrastive pretraining with several matching texts per image (the synthetic backbone stage).

CLIP's loss (Radford et al. 2021) pairs image i with text i only. On single frames of the synthetic videos
many texts of a batch are true of one image ("a red circle" fits every red circle on any background), so
the targets are the whole set of matching pairs: each image should pick any text that is true of it, and
each text any image it is true of.
"""

from __future__ import annotations

import torch
from torch import Tensor


def multi_positive_log_likelihood(logits: Tensor, positives: Tensor) -> Tensor:
    """Mean over rows of -log(sum of the softmax probability over the row's positive columns).

    `logits` `[N, M]`, `positives` bool `[N, M]` with at least one True per row. With exactly one positive
    per row this is cross-entropy with those targets."""
    if positives.shape != logits.shape:
        raise ValueError(f"positives {tuple(positives.shape)} must have the shape of logits {tuple(logits.shape)}")
    if not bool(positives.any(dim=1).all()):
        raise ValueError("every row needs at least one positive column")
    log_all = torch.logsumexp(logits, dim=1)
    log_pos = torch.logsumexp(logits.masked_fill(~positives, float("-inf")), dim=1)
    return (log_all - log_pos).mean()


def multi_positive_infonce(image: Tensor, text: Tensor, positives: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric contrastive loss of L2-normalised `image` `[N, D]` and `text` `[M, D]` embeddings.

    `positives[i, j]` says whether text j is true of image i; `logit_scale` is CLIP's log temperature.
    The mean of the image->text and text->image multi-positive terms (CLIP's loss when `positives` is
    the identity)."""
    image = torch.nn.functional.normalize(image, dim=-1)
    text = torch.nn.functional.normalize(text, dim=-1)
    logits = logit_scale.exp() * image @ text.t()
    return 0.5 * (multi_positive_log_likelihood(logits, positives)
                  + multi_positive_log_likelihood(logits.t(), positives.t()))
