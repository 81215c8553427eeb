"""DRL (Wang et al. 2022): token-wise interaction (WTI / TI / dp) and channel decorrelation (CDCR).

Notation: text tokens T_i [L, D] with mask m^t_i, frames V_j [F, D] with mask m^v_j, hats = unit
length. The token-frame cosine matrix is A_ij[a, b] = <T̂_ia, V̂_jb> m^t_ia m^v_jb, so padded
positions are 0 and *take part in the max* (reference behaviour). With token weights w (a masked
softmax of a Linear-ReLU-Linear MLP on the un-normalised features, or mask/length for TI):

    t2v_ij = sum_a w^t_ia max_b A_ij[a, b],   v2t_ij = sum_b w^v_jb max_a A_ij[a, b],
    s_ij = (t2v_ij + v2t_ij) / 2.

CDCR standardises matched (token, best frame) and (frame, best token) feature pairs channel-wise
and pushes their cross-correlation towards the identity:
L = alpha1 * sum_d (c_dd - 1)^2 + alpha2 * sum_{d != e} c_de^2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tvr_bench.functional.steps import step_bytes

INTERACTIONS = ("wti", "ti", "dp")
CDCR_MODES = (0, 1, 2, 3)


# --------------------------------------------------------------------------------------- weights
def weight_mlp(width: int) -> nn.Sequential:
    """DRL's token-weight MLP (`wti_arch=2`): Linear(D, D) - ReLU - Linear(D, 1)."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))


def masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last dim with masked-out positions set to -inf first (they get weight 0)."""
    return torch.softmax(logits.masked_fill(~mask.bool(), float("-inf")), dim=-1)


def uniform_weights(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """TI weights: 1/length on real positions, 0 on padding."""
    m = mask.to(dtype)
    return m / m.sum(-1, keepdim=True)


def token_weights(feats: Tensor, mask: Tensor, mlp: nn.Module | None) -> Tensor:
    """Per-token weights [N, L]: masked softmax of `mlp(feats)` (WTI), or uniform when `mlp` is None (TI)."""
    if mlp is None:
        return uniform_weights(mask, feats.dtype)
    return masked_softmax(mlp(feats).squeeze(-1), mask)


# ------------------------------------------------------------------------------ normalisation
def normalise(feats: Tensor) -> Tensor:
    """Unit-length rows (zero rows stay zero)."""
    return F.normalize(feats, dim=-1)


def normalise_masked(feats: Tensor, mask: Tensor) -> Tensor:
    """Unit-length rows with padded positions set to exactly zero, so their cosines are 0."""
    return torch.where(mask.bool().unsqueeze(-1), normalise(feats), feats.new_zeros(()))


# ------------------------------------------------------------------------------ token-wise score
def token_cosine(text_n: Tensor, video_n: Tensor) -> Tensor:
    """Cosine tensor [Nt, L, Nv, F] of (masked, normalised) tokens and frames as one [Nt·L, D] x [D, Nv·F] matmul."""
    nt, nl, d = text_n.shape
    nv, nf, _ = video_n.shape
    return (text_n.reshape(nt * nl, d) @ video_n.reshape(nv * nf, d).t()).view(nt, nl, nv, nf)


def wti_halves(text_n: Tensor, text_w: Tensor, video_n: Tensor, video_w: Tensor) -> tuple[Tensor, Tensor]:
    """Token-wise t2v and v2t scores [Nt, Nv] from masked normalised features and token weights (one shot)."""
    cos = token_cosine(text_n, video_n)
    t2v = torch.einsum("tlv,tl->tv", cos.amax(dim=3), text_w)
    v2t = torch.einsum("tvf,vf->tv", cos.amax(dim=1), video_w)
    return t2v, v2t


def wti_similarity(
    text_feats: Tensor,
    text_mask: Tensor,
    video_feats: Tensor,
    video_mask: Tensor,
    text_weights: Tensor,
    video_weights: Tensor,
) -> Tensor:
    """One-shot DRL token-wise score s = (t2v + v2t) / 2, [Nt, Nv], from raw features and precomputed weights."""
    t2v, v2t = wti_halves(
        normalise_masked(text_feats, text_mask), text_weights, normalise_masked(video_feats, video_mask), video_weights
    )
    return 0.5 * (t2v + v2t)


def _inverse_norms(feats: Tensor, mask: Tensor) -> Tensor:
    """1 / max(|x|, 1e-12) per row (F.normalize's rule), 0 at padded positions: [N, L]."""
    inv = feats.norm(dim=-1).clamp_min(1e-12).reciprocal()
    return torch.where(mask.bool(), inv, inv.new_zeros(()))


def _extent(mask: Tensor) -> Tensor:
    """Per row, one past the last real position (0 for an empty row)."""
    pos = torch.arange(1, mask.shape[-1] + 1, device=mask.device)
    return (mask.bool() * pos).amax(-1)


def _chunk_sizes(n_text: int, n_video: int, pair_elems: int, max_elems: int) -> tuple[int, int]:
    """Text and video chunk sizes whose cosine block holds at most `max_elems` elements (at least 1 x 1)."""
    pairs = max(1, max_elems // max(1, pair_elems))
    bt = min(n_text, max(1, math.isqrt(pairs)))
    bv = min(n_video, max(1, pairs // bt))
    if bv == n_video:
        bt = min(n_text, max(1, pairs // bv))
    return bt, bv


#: Cosine block of one step of `wti_similarity_blocked`. Chosen from the work, not from the memory budget: each
#: block is one [bt·L, D] x [D, F·bv] product followed by two max-reductions that read it back, so the block
#: should stay near cache size (4 MiB ~ 1 M cosines, e.g. 50 texts x 32 tokens x 50 videos x 12 frames, a
#: ~0.5 G multiply-add product per step: large enough to run at the full product rate and few enough steps
#: that a busy 2-core machine does not stall on thread hand-offs; measured 2/8/32 MiB: docs/results/perf.md).
WTI_CHUNK_BYTES = 4 * 2**20


def wti_similarity_blocked(
    text_n: Tensor,
    text_w: Tensor,
    text_mask: Tensor,
    video_n: Tensor,
    video_w: Tensor,
    video_mask: Tensor,
    max_bytes: int = 256 * 2**20,
    chunk_bytes: int | None = None,
) -> Tensor:
    """Memory-bounded token-wise score [Nt, Nv] equal to the one-shot result.

    Takes raw (or already `normalise_masked`) features and weights computed once per item; each chunk
    is normalised when it is used. Items are sorted by length so each chunk is cut to its longest
    member; the 0 that padding contributes to the max is restored for items with any padding.
    Each chunk is one [bt·L, D] x [D, F·bv] matmul whose result, with its two maxima, stays
    under about min(`max_bytes`, `chunk_bytes`) (default: cache-sized WTI_CHUNK_BYTES on CPU, `max_bytes` on
    accelerators; see `tvr_bench.functional.steps`). Inputs are
    cast to float32 and autocast is off inside (scores stay float32 under bf16-mixed).
    """
    kind = text_n.device.type if text_n.device.type in ("cpu", "cuda", "xpu", "mps") else "cpu"
    chunk_bytes = step_bytes(text_n.device, WTI_CHUNK_BYTES, max_bytes, chunk_bytes)
    with torch.autocast(device_type=kind, enabled=False):
        return _wti_blocked(
            text_n.float(), text_w.float(), text_mask, video_n.float(), video_w.float(), video_mask, max_bytes, chunk_bytes
        )


def _wti_blocked(
    text: Tensor, text_w: Tensor, text_mask: Tensor, video: Tensor, video_w: Tensor, video_mask: Tensor,
    max_bytes: int, chunk_bytes: int,
) -> Tensor:  # fmt: skip
    nt, nl, d = text.shape
    nv, nf, _ = video.shape
    out = text.new_empty(nt, nv)
    if nt == 0 or nv == 0:
        return out
    t_ext, v_ext = _extent(text_mask), _extent(video_mask)
    neg_inf = torch.tensor(float("-inf"), dtype=text.dtype, device=text.device)
    zero = text.new_zeros(())
    # the max over a padded item's positions includes a 0 from its padding
    t_floor = torch.where(text_mask.bool().all(-1), neg_inf, zero)
    v_floor = torch.where(video_mask.bool().all(-1), neg_inf, zero)
    t_order = torch.argsort(t_ext, descending=True, stable=True)
    v_order = torch.argsort(v_ext, descending=True, stable=True)
    itemsize = text.element_size()
    # cosine block plus the two max-reduced copies
    pair_elems = nl * nf + nl + nf
    bt, bv = _chunk_sizes(nt, nv, pair_elems, max(1, min(max_bytes, chunk_bytes) // itemsize))
    # each chunk is gathered and scaled by its inverse norms (0 at padding) when used: no normalised copy of
    # the whole set is held, and a chunk's copy costs 1 / (the other chunk's rows) of its product
    inv_t = _inverse_norms(text, text_mask).unsqueeze(-1)  # [Nt, L, 1]
    video_fm, inv_v = video.transpose(0, 1), _inverse_norms(video, video_mask).T.unsqueeze(-1)  # frame-major views
    v_chunks = []
    for vs in range(0, nv, bv):
        vi = v_order[vs : vs + bv]
        v_chunks.append((vi, max(1, int(v_ext[vi[0]]))))
    for ts in range(0, nt, bt):
        ti = t_order[ts : ts + bt]
        lb = max(1, int(t_ext[ti[0]]))
        tw, tf = text_w[ti, :lb], t_floor[ti]
        flat_t = text[ti, :lb].mul_(inv_t[ti, :lb]).reshape(-1, d)
        for vi, fb in v_chunks:
            # frame-major ([F·bv, D]) so both maxima reduce over outer dimensions
            flat_v = video_fm[:fb, vi].mul_(inv_v[:fb, vi]).reshape(fb * len(vi), d)
            cos = (flat_t @ flat_v.t()).view(len(ti), lb, fb, len(vi))
            best_frame = cos.amax(dim=2)  # [bt, lb, bv]
            torch.maximum(best_frame, v_floor[vi], out=best_frame)
            best_token = cos.amax(dim=1)  # [bt, fb, bv]
            torch.maximum(best_token, tf[:, None, None], out=best_token)
            t2v = torch.einsum("tlv,tl->tv", best_frame, tw)
            v2t = torch.einsum("tfv,vf->tv", best_token, video_w[vi, :fb])
            out[ti[:, None], vi[None, :]] = t2v.add_(v2t).mul_(0.5)
            del cos, best_frame, best_token, flat_v  # free before the next chunk's matmul allocates
    return out


def wti_pair_bytes(n_tokens: int, n_frames: int, itemsize: int = 4) -> int:
    """Memory one (text, video) pair costs in the blocked scorer: its cosine block and two max copies."""
    return itemsize * (n_tokens * n_frames + n_tokens + n_frames)


# ------------------------------------------------------------------------------ dot-product (dp)
def eot_token(tokens: Tensor, mask: Tensor) -> Tensor:
    """The end-of-text token [N, D] at index sum(mask) - 1, as the reference picks it."""
    idx = mask.long().sum(-1).clamp_min(1) - 1
    return tokens[torch.arange(tokens.shape[0], device=tokens.device), idx]


def mean_of_normalised(frames: Tensor, mask: Tensor) -> Tensor:
    """Masked mean of unit-length frames, normalised again (the meanP video embedding), [N, D]."""
    m = mask.to(frames.dtype).unsqueeze(-1)
    mean = (normalise(frames) * m).sum(1) / m.sum(1).clamp_min(1.0)
    return normalise(mean)


def dp_similarity(text_tokens: Tensor, text_mask: Tensor, video_feats: Tensor, video_mask: Tensor) -> Tensor:
    """DRL 'dp' score [Nt, Nv]: cosine of the EOT token with the meanP video embedding."""
    t = normalise(eot_token(text_tokens, text_mask))
    return t @ mean_of_normalised(video_feats, video_mask).t()


# ------------------------------------------------------------------------------------- CDCR
#: Variance floor of `standardise`: channels constant over the rows get z ~ 0 instead of NaN.
STD_FLOOR = 1e-6


def standardise(x: Tensor) -> Tensor:
    """Channel-wise z-score over rows with the unbiased std, `(x - x.mean(0)) / x.std(0)`, NaN-free.

    A channel that is constant over the rows (e.g. every frame's best token is the start token,
    whose state is the same in every caption) makes the reference divide 0 by 0; here its std is
    floored at STD_FLOOR, which leaves every other channel, and its gradient, unchanged.
    """
    centred = x - x.mean(0)
    var = centred.pow(2).sum(0) / max(1, x.shape[0] - 1)
    return centred / var.clamp_min(STD_FLOOR**2).sqrt()


def decorrelation(c: Tensor, alpha1: float, alpha2: float) -> Tensor:
    """alpha1 * sum_d (c_dd - 1)^2 + alpha2 * sum_{d != e} c_de^2 for a [D, D] cross-correlation."""
    diag = torch.diagonal(c)
    on = (diag - 1.0).pow(2).sum()
    off = c.pow(2).sum() - diag.pow(2).sum()
    return alpha1 * on + alpha2 * off


def paired_best_matches(
    text_feats: Tensor, text_mask: Tensor, video_feats: Tensor, video_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """For each pair (i, i): index of the best frame per token [B, L] and of the best token per frame [B, F].

    Maxima run over the masked cosine matrix, so padded positions (value 0) can win when every
    real one is negative; ties go to the first index (torch.max semantics), as in the reference.
    """
    a = torch.einsum("bld,bfd->blf", normalise_masked(text_feats, text_mask), normalise_masked(video_feats, video_mask))
    return a.max(dim=2).indices, a.max(dim=1).indices


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """x[b, index[b, k]] for every b, k: [B, K, D]."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def random_valid_index(mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One uniformly drawn real position per row of `mask` [B, L] (drawn on the generator's device)."""
    m = mask.bool()
    count = m.sum(-1)
    dev = generator.device if generator is not None else m.device
    u = torch.rand(m.shape[0], generator=generator, device=dev).to(m.device)
    k = (u * count).floor().long().clamp_max(count - 1)
    hit = (m.long().cumsum(-1) == (k + 1).unsqueeze(-1)) & m
    return hit.long().argmax(-1)


def cdcr_random_pairs(
    text_feats: Tensor,
    video_feats: Tensor,
    text_index: Tensor,
    video_index: Tensor,
    alpha1: float,
    alpha2: float,
) -> Tensor:
    """CDCR mode 1 for given indices: one token and one frame per sample, cross-correlation / B."""
    b = text_feats.shape[0]
    ar = torch.arange(b, device=text_feats.device)
    za = standardise(normalise(text_feats[ar, text_index]))
    zb = standardise(normalise(video_feats[ar, video_index]))
    return decorrelation(za.t() @ zb / b, alpha1, alpha2)


def cdcr_loss(
    mode: int,
    text_feats: Tensor,
    text_mask: Tensor,
    video_feats: Tensor,
    video_mask: Tensor,
    alpha1: float,
    alpha2: float,
    text_weights: Tensor | None = None,
    video_weights: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DRL channel decorrelation on paired (text i, video i) token/frame features; modes 0-3 as the reference.

    0: none; 1: one random token and frame per sample (draws from `generator`), / B;
    2: every real token with its best frame and every real frame with its best token, unweighted,
    / row count; 3: as 2 but each row weighted by its token weight, / B (needs the weights).
    """
    if mode not in CDCR_MODES:
        raise ValueError(f"cdcr mode must be one of {CDCR_MODES}, got {mode}")
    if mode == 0:
        return text_feats.new_zeros(())
    if mode == 1:
        return cdcr_random_pairs(
            text_feats, video_feats, random_valid_index(text_mask, generator), random_valid_index(video_mask, generator),
            alpha1, alpha2,
        )
    b = text_feats.shape[0]
    tm, vm = text_mask.bool(), video_mask.bool()
    tn, vn = normalise(text_feats), normalise(video_feats)
    best_frame, best_token = paired_best_matches(text_feats, text_mask, video_feats, video_mask)
    tok, frame_of_tok = tn[tm], _rows(vn, best_frame)[tm]
    frm, tok_of_frame = vn[vm], _rows(tn, best_token)[vm]
    za, zb = standardise(tok), standardise(frame_of_tok)
    xa, xb = standardise(frm), standardise(tok_of_frame)
    if mode == 2:
        c1 = za.t() @ zb / za.shape[0]
        c2 = xa.t() @ xb / xa.shape[0]
    else:
        if text_weights is None or video_weights is None:
            raise ValueError("cdcr mode 3 weights rows by the token weights; pass text_weights and video_weights")
        c1 = za.t() @ (zb * text_weights[tm].unsqueeze(-1)) / b
        c2 = xa.t() @ (xb * video_weights[vm].unsqueeze(-1)) / b
    return decorrelation(0.5 * (c1 + c2), alpha1, alpha2)


def cdcr_dp(text_tokens: Tensor, text_mask: Tensor, video_feats: Tensor, video_mask: Tensor, alpha1: float, alpha2: float) -> Tensor:
    """CDCR for the dp variant (any mode != 0 in the reference): EOT text vs meanP video, / B."""
    b = text_tokens.shape[0]
    za = standardise(normalise(eot_token(text_tokens, text_mask)))
    zb = standardise(mean_of_normalised(video_feats, video_mask))
    return decorrelation(za.t() @ zb / b, alpha1, alpha2)


# ------------------------------------------------------------------------------ training terms
def drl_training_terms(
    text_tokens: Tensor,
    text_mask: Tensor,
    video_feats: Tensor,
    video_mask: Tensor,
    interaction: str = "wti",
    cdcr: int = 3,
    alpha1: float = 0.11,
    alpha2: float = 0.0,
    text_weights: Tensor | None = None,
    video_weights: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Unscaled similarity [B, B] of a paired batch and its CDCR loss, for `interaction` in wti/ti/dp.

    For 'wti' pass the MLP weights; for 'ti' they default to uniform. CDCR mode 3 with 'ti' (which
    crashes in the reference) uses the uniform weights.
    """
    if interaction not in INTERACTIONS:
        raise ValueError(f"interaction must be one of {INTERACTIONS}, got {interaction!r}")
    if interaction == "dp":
        sims = dp_similarity(text_tokens, text_mask, video_feats, video_mask)
        loss = (
            cdcr_dp(text_tokens, text_mask, video_feats, video_mask, alpha1, alpha2)
            if cdcr != 0
            else sims.new_zeros(())
        )
        return sims, loss
    if interaction == "ti":
        text_weights = uniform_weights(text_mask, text_tokens.dtype)
        video_weights = uniform_weights(video_mask, video_feats.dtype)
    elif text_weights is None or video_weights is None:
        raise ValueError("interaction 'wti' needs text_weights and video_weights")
    sims = wti_similarity(text_tokens, text_mask, video_feats, video_mask, text_weights, video_weights)
    loss = cdcr_loss(
        cdcr, text_tokens, text_mask, video_feats, video_mask, alpha1, alpha2, text_weights, video_weights, generator
    )
    return sims, loss
