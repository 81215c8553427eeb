"""Pooling and cosine-similarity helpers shared by the methods."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor, dim: int = 1) -> Tensor:
    """Mean of `x` over `dim` counting only positions where `mask` is true (at least one assumed)."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


def mean_pool_normalised(frames: Tensor, frame_mask: Tensor) -> Tensor:
    """CLIP4Clip meanP: masked mean of L2-normalised frame embeddings, [N, F, D] -> [N, D]."""
    return masked_mean(F.normalize(frames, dim=-1), frame_mask)


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of every row of `a` [n, D] with every row of `b` [m, D]."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t()


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Normalise the last dimension to unit length."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)

