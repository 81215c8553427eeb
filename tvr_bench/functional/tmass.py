"""T-MASS (Wang et al., CVPR 2024): stochastic text embeddings around X-Pool's text-conditioned pooling.

    s_tv[f]   = cos(t, f_vf)                       the F text-frame cosines of a (text, video) pair
    R_tv      = exp(W s_tv + b)                    radius, W [D, F] initialised with eye_ (R_d = e^{s_d} for d < F)
    t_s       = t + eps ⊙ R_tv                     eps ~ U[0, 1)^D (default prior) or N(0, std²)
    training:   S_s[i, j]   = cos(t_s,i, z_{v_j|t_i}),  R_i from the paired video v_i, one eps_i per text
                t_sup,i     = t_i + R_i ⊙ (vbar_i - t_i) / |vbar_i - t_i|,  vbar_i = mean_j z_{v_i|t_j}
                L           = InfoNCE(S_s) + lambda_sup · InfoNCE(S_sup)
    inference:  score(t, v) = max_{m <= M} cos(t + eps_m ⊙ R_tv, z_{v|t})      (M = 20 trials)

z_{v|t} is X-Pool's pooled video (`tvr_bench.functional.xpool`). The reference code scores the
selected sample against the candidate video pooled with *its own* caption at the query's caption
position instead of with the query (`own_text`/`text_pos` below, the model's `pairing="reference"`); the
two differ on negatives even with one caption per video (docs/methods/tmass.md, 'Scoring protocol').

Fast inference. cos(t + eps ⊙ R, z) = (<t, z> + <eps, R ⊙ z>) / (|z| sqrt(|t|² + 2<t ⊙ eps, R> + <eps², R²>)),
so with eps shared by all videos of a text (`eps` of shape [T, M, D]) the M trials of a text against
every video are three [M, D] x [D, V] matmuls. z comes from X-Pool's folded scorer at O(K·D) per pair.

Randomness. Evaluation draws eps from a counter-based hash of (seed, global text index, trial, dim)
[and the global video index when eps is per pair], so a score never depends on the block, the rank
or the order in which pairs are computed. Training draws from torch's RNG like dropout does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tvr_bench.functional.losses import symmetric_infonce
from tvr_bench.functional.steps import step_bytes
from tvr_bench.functional.xpool import (
    TextConditionedPool,
    _autocast_type,
    cosine,
    fold_weights,
    pair_statistics,
    prepare_text,
    prepare_video,
    slice_video,
)

PRIORS = ("uniform01", "normal")
PAIRINGS = ("query", "reference")
EPS_MODES = ("text", "pair")

# reference (`modules/stochastic_module.py::StochasticText`) parameter names -> ours; None = dropped
REFERENCE_KEY_MAP: dict[str, str | None] = {
    "std_branch.linear_proj.weight": "proj.weight",
    "std_branch.linear_proj.bias": "proj.bias",
    "std_branch.learnable_scalar": None,  # allocated but never used by the reference forward
}


class RadiusHead(nn.Module):
    """log R = W s + b over the F text-frame cosines s (W initialised with `eye_`, b = 0)."""

    def __init__(self, frames: int = 12, dim: int = 512):
        super().__init__()
        self.proj = nn.Linear(frames, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference init: `eye_` on the [D, F] weight and a zero bias."""
        nn.init.eye_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, cosines: Tensor) -> Tensor:
        """log-radius [..., D] from text-frame cosines [..., F]."""
        return self.proj(cosines)

    def load_reference_state_dict(self, state: dict[str, Tensor], prefix: str = "") -> None:
        """Load the reference `StochasticText` state dict (keys under `prefix`), dropping the unused scalar."""
        out = {}
        for key, value in state.items():
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix) :]
            if rest not in REFERENCE_KEY_MAP:
                raise KeyError(f"unexpected T-MASS parameter {key!r}")
            if REFERENCE_KEY_MAP[rest] is not None:
                out[REFERENCE_KEY_MAP[rest]] = value
        self.load_state_dict(out)


# ------------------------------------------------------------------------------------ cosines
def _unit_frames(frames: Tensor, frame_mask: Tensor | None) -> Tensor:
    """Frames divided by their norm; padded frames set to zero so their cosines are 0."""
    unit = frames / frames.norm(dim=-1, keepdim=True)
    if frame_mask is None:
        return unit
    return torch.where(frame_mask.bool().unsqueeze(-1), unit, unit.new_zeros(()))


def paired_frame_cosines(text: Tensor, frames: Tensor, frame_mask: Tensor | None = None) -> Tensor:
    """cos(t_i, f_ij) [B, F] for text i paired with video i (padded frames give 0)."""
    return torch.einsum("bd,bfd->bf", text / text.norm(dim=-1, keepdim=True), _unit_frames(frames, frame_mask))


def frame_cosines(text: Tensor, frames: Tensor, frame_mask: Tensor | None = None) -> Tensor:
    """cos(t, f_vj) [T, V, F] for every text and every frame of every video (padded frames give 0)."""
    return torch.einsum("td,vfd->tvf", text / text.norm(dim=-1, keepdim=True), _unit_frames(frames, frame_mask))


def stochastic_text(text: Tensor, log_radius: Tensor, eps: Tensor) -> Tensor:
    """t + eps ⊙ exp(log R) (broadcasting)."""
    return text + eps * log_radius.exp()


# ------------------------------------------------------------------------------------ randomness
def sample_prior(
    prior: str, std: float, shape: tuple[int, ...], *, device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None,
) -> Tensor:  # fmt: skip
    """Draw eps from torch's RNG: U[0, 1) for 'uniform01', N(0, std²) for 'normal'."""
    if prior == "uniform01":
        return torch.rand(shape, device=device, dtype=dtype, generator=generator)
    if prior == "normal":
        return torch.randn(shape, device=device, dtype=dtype, generator=generator) * std
    raise ValueError(f"unknown prior {prior!r}; choose one of {PRIORS}")


_M32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit avalanche hash (lowbias32) on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def hash_bits(seed: int, *keys: Tensor) -> Tensor:
    """32-bit hashes (int64) of (seed, key_1, ..., key_n), the keys broadcast against each other."""
    device = keys[0].device if keys else None
    h = torch.tensor([seed & _M32, (seed >> 32) & _M32], dtype=torch.int64, device=device)
    h = _mix32(_mix32(h[0]) ^ h[1])
    for i, key in enumerate(keys):
        key = key.long()
        if key.numel() and (int(key.min()) < 0 or int(key.max()) > _M32):
            raise ValueError("hash keys must lie in [0, 2^32)")
        h = _mix32(h ^ _mix32((key + 0x9E3779B9 * (i + 1)) & _M32))
    return h


def hash_uniform(seed: int, *keys: Tensor) -> Tensor:
    """Uniform floats in [0, 1) (24 random bits) from the counter hash of (seed, keys...)."""
    return (hash_bits(seed, *keys) >> 8).to(torch.float32) * 2.0**-24


def counter_prior(
    prior: str, std: float, seed: int, text_index: Tensor, trials: int, dim: int,
    video_index: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """Evaluation eps from the counter hash: [T, M, D] per (text, trial), or [T, V, M, D] per pair."""
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}; choose one of {PRIORS}")
    dev = text_index.device
    ti = text_index.long().view(-1, 1, 1)
    mi = torch.arange(trials, device=dev).view(1, -1, 1)
    di = torch.arange(dim, device=dev).view(1, 1, -1)
    if video_index is not None:
        ti, mi, di = ti.unsqueeze(1), mi.unsqueeze(1), di.unsqueeze(1)
        keys: tuple[Tensor, ...] = (ti, video_index.long().view(1, -1, 1, 1), mi, di)
    else:
        keys = (ti, mi, di)
    if prior == "uniform01":
        return hash_uniform(seed, *keys)
    u1 = hash_uniform(seed, *keys, torch.zeros((), dtype=torch.long, device=dev))
    u2 = hash_uniform(seed, *keys, torch.ones((), dtype=torch.long, device=dev))
    return std * (-2.0 * torch.log1p(-u1)).sqrt() * torch.cos(2 * math.pi * u2)


# ------------------------------------------------------------------------------------ training
def tmass_training_loss(
    pool: TextConditionedPool, radius: RadiusHead, text: Tensor, frames: Tensor, frame_mask: Tensor | None,
    logit_scale: Tensor | float, eps: Tensor, support_weight: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """L_main + support_weight · L_support for text i paired with video i; eps [B, D] is the prior draw."""
    z = pool(text, frames, frame_mask)  # [B texts, B videos, D]
    log_r = radius(paired_frame_cosines(text, frames, frame_mask))  # [B, D]
    sims = cosine(stochastic_text(text, log_r, eps).unsqueeze(1), z)
    loss_main = symmetric_infonce(sims, logit_scale)
    parts = {"loss_main": loss_main.detach()}
    total = loss_main
    if support_weight:
        pointer = z.mean(0) - text  # mean over the batch's texts of z_{v_i|t_j}, minus t_i
        support = text + log_r.exp() * pointer / pointer.norm(dim=-1, keepdim=True)
        loss_support = symmetric_infonce(cosine(support.unsqueeze(1), z), logit_scale)
        total = total + support_weight * loss_support
        parts["loss_support"] = loss_support.detach()
    return total, parts


# ------------------------------------------------------------------------------------ inference
def _pooled_coefficients(alpha: Tensor, s2: Tensor, s3: Tensor) -> Tensor:
    """[V, K + 2, T] weights of z = sum_k (alpha_k / (s2 s3)) (g3 ⊙ w_k) + (1 / s3) (g3 ⊙ c) + 1 · b3.

    With ytil = sum_k alpha_k w_k, z = g3 ⊙ (ytil / s2 + c) / s3 + b3 is one product of these weights
    with the per-video rows `w_aug` = [g3 ⊙ w; g3 ⊙ c; b3] (two virtual items).
    """
    inv3 = 1.0 / s3
    return torch.cat([alpha * (inv3 / s2).unsqueeze(1), inv3.unsqueeze(1), torch.ones_like(inv3).unsqueeze(1)], 1)


def _trial_lhs(eps: Tensor, text: Tensor) -> Tensor:
    """[2 eps ⊙ t, eps²] along D: the text side of the two denominator dots as one operand."""
    t2 = (2.0 * text).unsqueeze(1) if eps.dim() == 3 else (2.0 * text)[:, None, None]
    return torch.cat([eps * t2, eps * eps], -1)


def _trial_ratios(
    eps: Tensor, lhs: Tensor, rz: Tensor, rr: Tensor, tz: Tensor, tn2: Tensor
) -> Tensor:  # fmt: skip
    """(<t, z> + <eps_m, R ⊙ z>) / sqrt(|t|² + 2 <eps_m ⊙ t, R> + <eps_m², R²>), [T, M, V] (times |z| = cos).

    Text-major pair vectors `rz` [T, V, D] and `rr` [T, V, 2D] = [R, R²] (the two denominator dots as one
    product over 2D with `lhs` from `_trial_lhs`); `tz` [T, 1, V] and `tn2` [T, 1, 1] ride in the products'
    accumulators. With eps [T, M, D] (shared by the videos of a text) these are two [M, ·] x [·, V] products
    per text; with eps [T, V, M, D] (per pair) M x D products per pair.
    """
    if eps.dim() == 3:
        num = torch.baddbmm(tz, eps, rz.mT)
        den = torch.baddbmm(tn2.expand(-1, eps.shape[1], 1), lhs, rr.mT)
    else:
        num = torch.einsum("tvmd,tvd->tmv", eps, rz).add_(tz)
        den = torch.einsum("tvmd,tvd->tmv", lhs, rr).add_(tn2)
    return den.rsqrt_().mul_(num)


def _own_pooled(
    pool: TextConditionedPool, frames: Tensor, frame_mask: Tensor | None, own_text: Tensor
) -> Tensor:
    """z_{v | c_vp} [V, P, D] for each video pooled with its own captions (NaN rows stay NaN)."""
    return pool.forward_paired(own_text, frames, frame_mask)


def _selected(text: Tensor, r: Tensor, eps: Tensor, best: Tensor, z_own: Tensor, text_pos: Tensor) -> Tensor:
    """Reference pairing: cos(t + eps_best ⊙ R, z_{v | own caption at the query's position}) [T, V]."""
    nt, nv = best.shape
    if eps.dim() == 3:
        e = eps.gather(1, best.unsqueeze(-1).expand(nt, nv, eps.shape[-1]))
    else:
        e = eps.gather(2, best[..., None, None].expand(nt, nv, 1, eps.shape[-1])).squeeze(2)
    p = z_own.shape[1]
    pos = text_pos.long().clamp(max=p - 1)
    zo = z_own[:, pos].transpose(0, 1)  # [T, V, D]
    zo = torch.where((text_pos.long() < p)[:, None, None], zo, zo.new_full((), float("nan")))
    return cosine(text.unsqueeze(1) + e * r, zo)


def tmass_similarity_reference(
    pool: TextConditionedPool, radius: RadiusHead, text: Tensor, frames: Tensor, frame_mask: Tensor | None,
    eps: Tensor, own_text: Tensor | None = None, text_pos: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """One-shot reference-math scores [T, V] (materialises z, R and every sample; oracle and baseline).

    Query pairing by default; with `own_text` [V, P, D] (NaN padding) and `text_pos` [T] the selected
    sample is scored against z_{v | own_text[v, text_pos[t]]} as the reference code does.
    """
    z = pool(text, frames, frame_mask)
    z = z / z.norm(dim=-1, keepdim=True)  # normalised once (in place of the per-trial normalisation)
    r = radius(frame_cosines(text, frames, frame_mask)).exp_()
    best_val = best_idx = None
    for m in range(eps.shape[-2]):
        e = eps[:, None, m] if eps.dim() == 3 else eps[:, :, m]
        sample = text.unsqueeze(1) + e * r
        val = (sample * z).sum(-1) / sample.norm(dim=-1)
        del sample
        if best_val is None:
            best_val, best_idx = val, torch.zeros_like(val, dtype=torch.long)
        else:
            better = val > best_val
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, torch.full_like(best_idx, m), best_idx)
    if own_text is None:
        return best_val
    return _selected(text, r, eps, best_idx, _own_pooled(pool, frames, frame_mask, own_text), text_pos)


def tmass_pair_bytes(dim: int, trials: int, per_pair_eps: bool = False) -> int:
    """Approximate bytes one (text, video) pair costs inside `tmass_similarity` (per-pair eps adds 3·M·D)."""
    return 4 * (4 * dim + 6 * trials + 128) + (4 * 3 * trials * dim if per_pair_eps else 0)


#: D-vectors of one step of `tmass_similarity` (four reused buffers). Small steps keep them in cache: at
#: 1000 x 1000, 2 threads, quiet machine, 16 / 32 / 64 MiB took 22 / 31 / 30 products of [1000, 512] x
#: [512, 12000]; on a busy machine (load 7) the many small parallel regions stall instead (500 x 500:
#: 16 / 64 / 128 MiB -> 113 / 74 / 68 products per 10^6 pairs).
TMASS_BLOCK_BYTES = 16 * 2**20
#: Videos per block and texts per statistics chunk (wide enough for efficient [V·F, D] x [D, T] products).
#: 1000 x 1000, 2 threads, quiet: video blocks of 64 / 128 / 256 / 512 took 2.08 / 1.79 / 2.78 / 3.85 s (the
#: trial products are [M, D] x [D, V] per text: wider V leaves fewer texts per 16 MiB step); text chunks of
#: 64-1000 changed little (2.0-2.2 s).
TMASS_VIDEO_BLOCK, TMASS_TEXT_CHUNK = 128, 256


def tmass_similarity(
    pool: TextConditionedPool, radius: RadiusHead, text: Tensor, frames: Tensor, frame_mask: Tensor | None,
    eps: Tensor, own_text: Tensor | None = None, text_pos: Tensor | None = None,
    max_bytes: int = 256 * 2**20, block_bytes: int | None = None,
) -> Tensor:  # fmt: skip
    """Fast exact M-sample scores [T, V]: folded X-Pool statistics, R ⊙ z as one batched product, trials as matmuls.

    cos(t + eps ⊙ R, z) = (<t, z> + <eps, R ⊙ z>) / (|z| sqrt(|t|² + 2 <eps ⊙ t, R> + <eps², R²>)), so per pair
    two D-vectors (R, R ⊙ z) and per trial three D-dots. `eps` is [T, M, D] (one set of M draws per text, shared
    by all videos) or [T, V, M, D] (per pair). `own_text`/`text_pos` switch to the reference code's pairing
    (see `tmass_similarity_reference`). Per (text chunk x video block) the X-Pool statistics and text-frame
    cosines come from wide products; the D-vectors are then made for a few texts at a time, within
    `block_bytes` (and `max_bytes`; default: TMASS_BLOCK_BYTES on CPU, `max_bytes` on accelerators, see
    `tvr_bench.functional.steps`). Inputs are cast to float32 and autocast is off inside.
    """
    if pool.training and pool.dropout.p > 0:
        raise RuntimeError("the fast T-MASS scorer is exact only without dropout: call pool.eval() first")
    with torch.autocast(device_type=_autocast_type(text), enabled=False):
        text, frames, eps = text.float(), frames.float(), eps.float()
        fw = fold_weights(pool)
        vs = prepare_video(pool, fw, frames, frame_mask)
        nv, nk, d = vs.w.shape
        w_aug = torch.cat([vs.w * fw.g3, (fw.g3 * fw.c).expand(nv, 1, d), fw.b3.expand(nv, 1, d)], 1)
        unit = _unit_frames(frames, frame_mask)
        z_own = None if own_text is None else _own_pooled(pool, frames, frame_mask, own_text.float())
        nt, nf = text.shape[0], frames.shape[1]
        block_bytes = step_bytes(text.device, TMASS_BLOCK_BYTES, max_bytes, block_bytes)
        pairs = max(1, min(max_bytes, block_bytes) // tmass_pair_bytes(d, eps.shape[-2], eps.dim() == 4))
        cols = min(nv, TMASS_VIDEO_BLOCK, pairs)
        sub = min(nt, max(1, pairs // cols))  # texts per D-vector step
        chunk = min(nt, max(sub, TMASS_TEXT_CHUNK // sub * sub))  # texts per statistics chunk
        buf = text.new_empty(4, sub * cols * d)  # [R, R²] (2 D per pair), R ⊙ z, scratch
        # R = exp(W s + b) = 2^(log2(e) (W s + b)): exp2 is several times cheaper than exp on CPU
        w2, b2 = radius.proj.weight.t() * math.log2(math.e), radius.proj.bias * math.log2(math.e)
        out = text.new_empty(nt, nv)
        for i in range(0, nt, chunk):
            t_chunk = text[i : i + chunk]
            ts = prepare_text(pool, fw, t_chunk)
            tu = t_chunk / t_chunk.norm(dim=-1, keepdim=True)
            tn2 = t_chunk.pow(2).sum(-1)[:, None, None]  # [T, 1, 1]
            e_chunk = eps[i : i + chunk]
            lhs_chunk = _trial_lhs(e_chunk, t_chunk) if eps.dim() == 3 else None
            for j in range(0, nv, cols):
                vsj = slice_video(vs, j, j + cols)
                nb = vsj.w.shape[0]
                alpha, s2, s3, tz, zz = pair_statistics(fw, ts, vsj)  # [V, K, T], [V, T] x 4
                coef = _pooled_coefficients(alpha, s2, s3).mT.contiguous()  # [V, T, K + 2]
                cosines = tu @ unit[j : j + cols].reshape(nb * nf, d).T  # [T, V·F], text-major
                zn, tz = zz.sqrt_().T, tz.T.unsqueeze(1)  # [T, V], [T, 1, V]
                for k in range(0, t_chunk.shape[0], sub):
                    ks = slice(k, k + sub)
                    tb = min(sub, t_chunk.shape[0] - k)
                    n = tb * nb * d
                    rr = buf[:2].view(-1)[: 2 * n].view(tb, nb, 2 * d)  # [R, R²]
                    rz, scratch = buf[2, :n].view(tb, nb, d), buf[3, :n]
                    r = rr[..., :d]
                    log_r = torch.addmm(b2, cosines[ks].reshape(tb * nb, nf), w2, out=scratch.view(-1, d))
                    torch.exp2(log_r.view(tb, nb, d), out=r)
                    z = torch.bmm(coef[:, ks], w_aug[j : j + cols], out=scratch.view(nb, tb, d))  # video-major
                    torch.mul(z.transpose(0, 1), r, out=rz)  # R ⊙ z, text-major
                    torch.mul(r, r, out=rr[..., d:])
                    if eps.dim() == 3:
                        e, lhs = e_chunk[ks], lhs_chunk[ks]
                    else:
                        e = e_chunk[ks, j : j + cols]
                        lhs = _trial_lhs(e, t_chunk[ks])
                    ratio = _trial_ratios(e, lhs, rz, rr, tz[ks], tn2[ks])  # cos · |z|: [T, M, V]
                    rows = slice(i + k, i + k + tb)
                    if z_own is None:
                        torch.amax(ratio, 1, out=out[rows, j : j + cols]).div_(zn[ks])
                    else:
                        out[rows, j : j + cols] = _selected(t_chunk[ks], r, e, ratio.argmax(1), z_own[j : j + cols], text_pos[rows])
        return out
