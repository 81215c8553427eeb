"""EMCL (Jin et al., NeurIPS 2022): expectation-maximisation over bases shared by both modalities.

Reference: jpthu17/EMCL @ 3af1794, `video_retrieval/EMCL-Net` (`tvr/models/modeling.py::EMCL.get_logits`,
`tvr/models/until_module.py::Emcl`, `main_retrieval.py::_run_on_single_gpu`). Method card: docs/methods/emcl.md.

One scoring call takes a *block* of T texts (raw end-token embeddings t_a) and V videos (frames f_b1..bF
after seqTransf, mask m_b):

    w_abf = softmax_f(<t_a, f_bf> / temperature) · m_bf          (the mask after the softmax, no renormalisation)
    p_ab  = sum_f w_abf f_bf                                     (text-conditioned video, [T, V, D])
    X     = [p_11 … p_1V, p_21 … p_TV, t_1 … t_T]                 (N = T·V + T rows, D columns)

EM treats the **D feature dimensions as data points** and the K bases as vectors over the N rows:
mu⁰ = 1_N cᵀ (c = the running bases, [1, K]), then `steps` times (no gradient)

    z   = softmax_K(Xᵀ mu / lambda),  z_dk /= 1e-6 + sum_d z_dk    (responsibilities [D, K])
    mu  = X z,                        mu_nk /= 1e-6 + ||mu_·k||   (bases [N, K], unit columns over the rows)

and X' = X + beta · mu zᵀ (the reconstruction carries no gradient). The score of (a, b) is the cosine of
the rows of t_a and p_ab in X'. Every row's reconstruction depends on every row of the block (through the
column norms and z), so the score of a pair depends on the other texts and videos of its block
(`emcl_block_scores`). `emcl_pair_scores` runs the same EM on each pair alone (N = 2: the reference's
own loop with blocks of one text and one video), so its scores depend on the pair only.

Training (`emcl_block_scores` on the batch, T = V = B) also returns the final bases; the running bases
follow c <- momentum·c + (1 - momentum)·mean_n mu_n (`momentum_update`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tvr_bench.functional.steps import step_bytes

#: EM defaults of the reference (EMCL-Net `main_retrieval.py` L69-75 argparse defaults, kept by every README command).
BASES, EM_STEPS, MOMENTUM, EM_LAMBDA, BETA, POOL_TEMPERATURE = 32, 9, 0.9, 1.0, 3.0, 3.0
#: Small constant of the reference's normalisations (`until_module.py` L82, L94, L96).
EM_EPS = 1e-6
#: Values of the EMCL `grouping` option: each pair scored alone, or the reference's evaluation blocks.
GROUPINGS = ("pair", "reference")
#: The reference's evaluation block: `_run_on_single_gpu(..., mini_batch=32)` (main_retrieval.py L336, L472).
REFERENCE_BLOCK = 32
#: CPU step of the pair scorer (bytes of its [pairs, D, K] temporaries per step); a larger one elsewhere (functional/steps.py).
PAIR_STEP_BYTES = 8 * 2**20


def init_bases(k: int = BASES, generator: torch.Generator | None = None) -> Tensor:
    """The reference's initial bases [1, k]: N(0, 2/k) divided by (1e-6 + its norm over the size-1 row axis), i.e. ≈ ±1."""
    if k < 1:
        raise ValueError(f"the number of EM bases must be positive, got {k}")
    mu = torch.randn(1, k, generator=generator) * math.sqrt(2.0 / k)
    return mu / (EM_EPS + mu.norm(dim=0, keepdim=True))


def _no_autocast(x: Tensor) -> torch.autocast:
    kind = x.device.type
    return torch.autocast(device_type=kind if kind in ("cpu", "cuda", "xpu", "mps") else "cpu", enabled=False)


@torch.no_grad()
def em_bases(x: Tensor, bases: Tensor, steps: int = EM_STEPS, lamd: float = EM_LAMBDA) -> tuple[Tensor, Tensor]:
    """EM over the D columns of `x` [N, D] from the running `bases` [1, K]: final bases mu [N, K] and responsibilities z [D, K]."""
    if steps < 1:
        raise ValueError(f"EM needs at least one step, got {steps}")
    with _no_autocast(x):
        x = x.float()
        mu = bases.to(x).expand(x.shape[0], -1)
        for _ in range(steps):
            z = torch.softmax((x.t() @ mu) / lamd, dim=1)
            z = z / (EM_EPS + z.sum(dim=0, keepdim=True))
            mu = x @ z
            mu = mu / (EM_EPS + mu.norm(dim=0, keepdim=True))
    return mu, z


def em_reconstruct(
    x: Tensor, bases: Tensor, steps: int = EM_STEPS, lamd: float = EM_LAMBDA, beta: float = BETA
) -> tuple[Tensor, Tensor]:
    """x + beta · mu zᵀ (gradient through `x` only, as the reference) and the final bases mu [N, K]."""
    mu, z = em_bases(x, bases, steps, lamd)
    return x + beta * (mu @ z.t()).to(x.dtype), mu


def pool_weights(text: Tensor, frames: Tensor, frame_mask: Tensor, temperature: float = POOL_TEMPERATURE) -> Tensor:
    """w [T, V, F] = softmax over frames of <t, f> / temperature, then times the mask (padded frames 0, no renormalisation)."""
    logits = torch.einsum("td,vfd->tvf", text, frames) / temperature
    return torch.softmax(logits, dim=-1) * frame_mask.to(logits.dtype)[None]


def pool_videos(text: Tensor, frames: Tensor, frame_mask: Tensor, temperature: float = POOL_TEMPERATURE) -> Tensor:
    """Text-conditioned videos p [T, V, D] = sum_f w_tvf f_vf."""
    return torch.einsum("tvf,vfd->tvd", pool_weights(text, frames, frame_mask, temperature), frames)


def emcl_block_scores(
    text: Tensor, frames: Tensor, frame_mask: Tensor, bases: Tensor, steps: int = EM_STEPS, lamd: float = EM_LAMBDA,
    beta: float = BETA, temperature: float = POOL_TEMPERATURE,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Scores [T, V] of one block (EM over all its T·V pooled videos and T texts) and the final bases [T·V + T, K].

    `text` [T, D] are raw end-token embeddings, `frames` [V, F, D] the seqTransf outputs with `frame_mask` [V, F].
    Differentiable in `text` and `frames` (the training similarity)."""
    t, v = text.shape[0], frames.shape[0]
    pooled = pool_videos(text, frames, frame_mask, temperature)
    x = torch.cat([pooled.reshape(t * v, -1), text], dim=0)
    out, mu = em_reconstruct(x, bases, steps, lamd, beta)
    text_out = out[t * v :]
    video_out = out[: t * v].view(t, v, -1)
    text_out = text_out / text_out.norm(dim=-1, keepdim=True)
    video_out = video_out / video_out.norm(dim=-1, keepdim=True)
    return torch.einsum("td,tvd->tv", text_out, video_out), mu


@torch.no_grad()
def em_pairs(video: Tensor, text: Tensor, bases: Tensor, steps: int = EM_STEPS, lamd: float = EM_LAMBDA, beta: float = BETA) -> Tensor:
    """EM on each pair alone: cos(t', p') of X = [p; t] (N = 2) for P pairs (`video`, `text` [P, D]); [P] scores.

    The same arithmetic as `em_reconstruct` on a block of one text and one video, batched over pairs."""
    if steps < 1:
        raise ValueError(f"EM needs at least one step, got {steps}")
    with _no_autocast(video):
        p, t = video.float(), text.float()
        c = bases.to(p).reshape(1, 1, -1)
        mu_p = mu_t = c.expand(p.shape[0], 1, -1)  # [P, 1, K]: both rows start at the running bases
        for i in range(steps):
            if i == 0:  # both rows of mu equal the running bases: Xᵀ mu = (p + t) cᵀ
                logits = (p + t)[:, :, None] * c
            else:
                logits = torch.addcmul(p[:, :, None] * mu_p, t[:, :, None], mu_t)  # [P, D, K] = Xᵀ mu
            if lamd != 1.0:  # x / 1 is x: skipping it changes no bit
                logits.div_(lamd)
            z = torch.softmax(logits, dim=2)
            del logits
            z.div_(EM_EPS + z.sum(dim=1, keepdim=True))
            mu_p = torch.bmm(p[:, None, :], z)  # [P, 1, K]
            mu_t = torch.bmm(t[:, None, :], z)
            norm = EM_EPS + torch.sqrt(mu_p * mu_p + mu_t * mu_t)
            mu_p, mu_t = mu_p / norm, mu_t / norm
        p_out = p + beta * torch.bmm(z, mu_p.transpose(1, 2)).squeeze(2)
        t_out = t + beta * torch.bmm(z, mu_t.transpose(1, 2)).squeeze(2)
        return (p_out * t_out).sum(-1) / (p_out.norm(dim=-1) * t_out.norm(dim=-1))


def pair_bytes(dim: int, bases: int, frames: int) -> int:
    """Bytes one (text, video) pair costs in `emcl_pair_scores`: three [D, K] temporaries, its pooled video and weights."""
    return 4 * (3 * dim * bases + 4 * dim + frames + 4 * bases)


def emcl_pair_scores(
    text: Tensor, frames: Tensor, frame_mask: Tensor, bases: Tensor, steps: int = EM_STEPS, lamd: float = EM_LAMBDA,
    beta: float = BETA, temperature: float = POOL_TEMPERATURE, max_bytes: int = 1 << 30, step: int | None = None,
) -> Tensor:  # fmt: skip
    """Scores [T, V] with EM run on every pair alone (any slice of texts x videos is exactly that block of the matrix).

    Pairs are processed in steps whose [pairs, D, K] temporaries fit `step` bytes (default: cache-sized on CPU,
    `max_bytes` elsewhere)."""
    t, v = text.shape[0], frames.shape[0]
    out = torch.empty(t, v, dtype=torch.float32, device=text.device)
    if t == 0 or v == 0:
        return out
    dim, k = text.shape[1], bases.shape[-1]
    per_pair = pair_bytes(dim, k, frames.shape[1])
    chunk = max(1, step_bytes(text.device, PAIR_STEP_BYTES, max_bytes, step) // per_pair)
    rows = max(1, chunk // v)  # whole rows of texts per step when they fit, else slices of one row
    cols = v if rows > 1 or chunk >= v else chunk
    with torch.no_grad():
        for i in range(0, t, rows):
            tb = text[i : i + rows]
            for j in range(0, v, cols):
                pooled = pool_videos(tb, frames[j : j + cols], frame_mask[j : j + cols], temperature)
                n_t, n_v = pooled.shape[:2]
                pairs_text = tb[:, None, :].expand(n_t, n_v, dim).reshape(-1, dim)
                out[i : i + n_t, j : j + n_v] = em_pairs(pooled.reshape(-1, dim), pairs_text, bases, steps, lamd, beta).view(n_t, n_v)
    return out


def momentum_update(bases: Tensor, final_mu: Tensor, momentum: float = MOMENTUM) -> Tensor:
    """The reference's running bases after a training step: momentum·c + (1 - momentum)·mean over rows of mu."""
    return momentum * bases + (1.0 - momentum) * final_mu.detach().mean(dim=0, keepdim=True).to(bases)


def emcl_block_grid_scores(
    text: Tensor, frames: Tensor, frame_mask: Tensor, bases: Tensor, block: tuple[int, int] = (REFERENCE_BLOCK, REFERENCE_BLOCK),
    steps: int = EM_STEPS, lamd: float = EM_LAMBDA, beta: float = BETA, temperature: float = POOL_TEMPERATURE,
) -> Tensor:  # fmt: skip
    """Every reference block of the [T, V] matrix at once (one-shot oracle of the evaluator's blocked loop).

    Texts and videos are cut into consecutive blocks of `block` = (texts, videos), the last ones smaller, as
    `torch.split` in the reference loop; ragged blocks are padded with zero rows, which change no column sum,
    no basis and no norm of the EM. Materialises [T, V, D] twice (the pooled videos, then their blocks)."""
    bt, bv = block
    t, v, d = text.shape[0], frames.shape[0], text.shape[1]
    gt, gv = -(-t // bt), -(-v // bv)
    with torch.no_grad(), _no_autocast(text):
        pooled = pool_videos(text.float(), frames.float(), frame_mask, temperature)
        # rows of block (a, b): its bt·bv pooled videos (text-major), then its bt texts; zero rows pad ragged blocks
        x = torch.zeros(gt, gv, bt * bv + bt, d)
        for a in range(gt):
            ta = min(bt, t - a * bt)
            for b in range(gv):
                vb = min(bv, v - b * bv)
                rows = x[a, b, : bt * bv].view(bt, bv, d)
                rows[:ta, :vb] = pooled[a * bt : a * bt + ta, b * bv : b * bv + vb]
            x[a, :, bt * bv : bt * bv + ta] = text[a * bt : a * bt + ta].float()
        del pooled
        x = x.view(gt * gv, -1, d)
        mu = bases.float().reshape(1, 1, -1).expand(x.shape[0], x.shape[1], -1)
        for _ in range(steps):
            z = torch.softmax(torch.bmm(x.transpose(1, 2), mu) / lamd, dim=2)
            z = z / (EM_EPS + z.sum(dim=1, keepdim=True))
            mu = torch.bmm(x, z)
            mu = mu / (EM_EPS + mu.norm(dim=1, keepdim=True))
        out = x.baddbmm_(mu, z.transpose(1, 2), alpha=beta)  # x + beta · mu zᵀ, in place
        out.div_(out.norm(dim=-1, keepdim=True).clamp_min(1e-30))  # padded rows stay 0
        vid = out[:, : bt * bv].reshape(gt * gv, bt, bv, d)
        txt = out[:, bt * bv :]
        scores = torch.einsum("gad,gabd->gab", txt, vid).view(gt, gv, bt, bv).permute(0, 2, 1, 3).reshape(gt * bt, gv * bv)
    return scores[:t, :v]
