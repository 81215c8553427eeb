"""Test-time post-processing of a score matrix that the field reports beside plain retrieval numbers.

    QB-Norm (Bogolin et al., CVPR 2022, dynamic inverted softmax; ioanacroi/qb-norm @ 76d4d90
    `dynamic_inverted_softmax.py`): with a query bank B of training captions scored against the test videos,
        R   = the videos among the top-k of some bank row                         (`get_retrieved_videos`)
        s'(t, v) = exp(beta s(t, v)) / sum_b exp(beta s(b, v))   if argmax_v' s(t, v') is in R   (`qb_norm`)
        s'(t, v) = s(t, v)                                       otherwise
    Rows end up on two scales (normalised vs raw), so only text->video ranking is meaningful.

    Sinkhorn-Knopp (as UCoFiA uses it at test time, "SK-norm"; Ziyang412/UCoFiA @ 6098be2
    `eval_t2v/main_ucofia.py` L342-358 and L459-485): on K = exp(L - max L) of a log-score matrix L
    (logits = scores / temperature),
        b = 1 / colsum(K);  repeat n times: a = 1 / (K b),  b = 1 / (a K)
        video bias = log_softmax(log b)           s'(t, v) = s(t, v) / temperature + bias(v)
    UCoFiA computes the bias on the training captions x test videos; computed on the test matrix itself it
    is the transductive Sinkhorn normalisation.

Both are pure functions of score matrices (in the scores' floating dtype, at least float32); nothing here knows a
method or a dataset.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tvr_bench.metrics import dual_softmax

__all__ = [
    "dual_softmax",
    "qbnorm",
    "qbnorm_gated_rows",
    "qbnorm_retrieved_videos",
    "sinkhorn_biases",
    "sinkhorn_normalise",
]

#: QB-Norm's defaults: inverse temperature 20 and the top-1 bank video (dynamic_inverted_softmax.py L19-20,
#: README "The value used for the inverse temperature is 20").
QBNORM_BETA, QBNORM_K = 20.0, 1
#: UCoFiA's Sinkhorn iterations (`sinkhorn_knopp(..., n_iters=4)`, main_ucofia.py L342) and the temperature of its
#: logits (CLIP's logit scale, clamped at 100: modeling_ucofia.py L383-395 multiply the cosines by it).
SINKHORN_ITERS, SINKHORN_TEMPERATURE = 4, 0.01


def _matrix(sim: Tensor, name: str) -> Tensor:
    if not isinstance(sim, Tensor) or sim.dim() != 2 or not sim.is_floating_point():
        raise ValueError(f"{name} must be a floating-point matrix [n_text, n_video], got {getattr(sim, 'shape', type(sim))}")
    return sim


def _best_columns(sim: Tensor) -> Tensor:
    """argmax over each row, NaN scores treated as the worst (as numpy's argsort of -sims puts NaN last)."""
    return sim.nan_to_num(nan=float("-inf")).argmax(dim=1)


def qbnorm_retrieved_videos(bank_sim: Tensor, k: int = QBNORM_K) -> Tensor:
    """Sorted video columns that appear among the top-`k` of at least one query-bank row (`get_retrieved_videos`)."""
    bank_sim = _matrix(bank_sim, "bank_sim")
    k = min(int(k), bank_sim.shape[1])
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if k == 1:
        return torch.unique(_best_columns(bank_sim))
    top = torch.topk(bank_sim.nan_to_num(nan=float("-inf")), k, dim=1).indices
    return torch.unique(top.reshape(-1))


def qbnorm_gated_rows(sim: Tensor, videos: Tensor) -> Tensor:
    """Rows whose best video (over the whole gallery) is one of `videos` (`get_index_to_normalize`), sorted."""
    best = _best_columns(_matrix(sim, "sim"))
    return torch.nonzero(torch.isin(best, videos.to(best.device))).flatten()


def qbnorm(sim: Tensor, bank_sim: Tensor, beta: float = QBNORM_BETA, k: int = QBNORM_K) -> Tensor:
    """Querybank normalisation with the dynamic inverted softmax; a new tensor (the reference overwrites its input).

    `sim` [T, V] test scores, `bank_sim` [B, V] the query bank's scores against the same videos. Gated rows become
    exp(beta s) / sum_b exp(beta s_b), computed as exp(beta s - logsumexp_b(beta s_b)); other rows are unchanged.
    """
    sim, bank_sim = _matrix(sim, "sim"), _matrix(bank_sim, "bank_sim")
    if sim.shape[1] != bank_sim.shape[1]:
        raise ValueError(f"sim and bank_sim must score the same videos, got {sim.shape[1]} and {bank_sim.shape[1]} columns")
    dtype = torch.promote_types(sim.dtype, torch.float32)
    out = sim.to(dtype).clone()
    rows = qbnorm_gated_rows(sim, qbnorm_retrieved_videos(bank_sim, k))
    if rows.numel() == 0:
        return out
    bank_dtype = torch.promote_types(bank_sim.dtype, torch.float32)
    log_norm = torch.logsumexp(beta * bank_sim.to(bank_dtype), dim=0).to(dtype)  # [V]
    gated = out[rows].mul_(beta).sub_(log_norm).exp_()  # exp(beta s - log sum_b exp(beta s_b)) in the scores' dtype
    out[rows] = gated
    return out


def sinkhorn_biases(log_sim: Tensor, iters: int = SINKHORN_ITERS) -> tuple[Tensor, Tensor]:
    """UCoFiA's `sinkhorn_knopp`: (row log-weights, column log-weights), each log-softmax normalised, in the input's
    floating dtype (at least float32, as the reference's torch tensors).

    K = exp(L - max L); b = 1 / colsum(K); then `iters` times a = 1 / (K b), b = 1 / (a K). Non-finite entries of
    L (NaN scores) get weight 0.
    """
    log_sim = _matrix(log_sim, "log_sim")
    log_sim = log_sim.to(torch.promote_types(log_sim.dtype, torch.float32))
    if iters < 1:
        raise ValueError(f"iters must be at least 1, got {iters}")
    finite = torch.isfinite(log_sim)
    every = bool(finite.all())
    if not every and not bool(finite.any()):
        raise ValueError("log_sim has no finite entry")
    m = log_sim.max() if every else log_sim.masked_fill(~finite, float("-inf")).max()
    kernel = (log_sim - m).exp_()
    if not every:
        kernel.masked_fill_(~finite, 0.0)
    b = 1.0 / kernel.sum(0)
    for _ in range(int(iters)):
        a = 1.0 / (kernel @ b)
        b = 1.0 / (a @ kernel)
    return torch.log_softmax(a.log(), dim=0), torch.log_softmax(b.log() - m, dim=0)


def sinkhorn_normalise(
    sim: Tensor, bank_sim: Tensor | None = None, temperature: float = SINKHORN_TEMPERATURE, iters: int = SINKHORN_ITERS
) -> Tensor:
    """sim / temperature + the Sinkhorn video bias of `bank_sim` / temperature (UCoFiA's SK-norm, t2v).

    `bank_sim` [B, V]: training captions x test videos (UCoFiA; gallery-normalised); None: the test matrix itself
    (the transductive Sinkhorn normalisation).
    """
    sim = _matrix(sim, "sim")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    source = sim if bank_sim is None else _matrix(bank_sim, "bank_sim")
    if source.shape[1] != sim.shape[1]:
        raise ValueError(f"sim and bank_sim must score the same videos, got {sim.shape[1]} and {source.shape[1]} columns")
    dtype = torch.promote_types(sim.dtype, torch.float32)
    _, video_bias = sinkhorn_biases(source.to(dtype) / temperature, iters)
    return (sim.to(dtype) / temperature).add_(video_bias.to(dtype))
