"""X-Pool (Gorti et al., CVPR 2022): text-conditioned attention pooling, its exact fast scorer, ablations.

Reference math for one (text t, video with frames f_1..F) pair, H heads of width D/H:

    t' = LN1(t),  f'_j = LN1(f_j)                       (one LayerNorm shared by text and frames)
    q = W_q t' + b_q,  k_j = W_k f'_j + b_k,  v_j = W_v f'_j + b_v
    alpha_hj = softmax_j(<k_jh, q_h> / sqrt(D/H)),  a = concat_h sum_j alpha_hj v_jh
    o = W_o a + b_o,  r = LN2(o),  z = LN3(r + Dropout(W_p r + b_p))
    sim(t, v) = cos(t, z)                               (the *original* t, not t')

Fast scorer (eval, no dropout). Everything after the softmax is affine in the attention weights, and
the weights of each head sum to 1, so with items k = (h, j) (K = H·F per video) and C = I - 11ᵀ/D:

    o - mean(o) = sum_k alpha_k u_k,        u_k = C W_o[:, h] v_jh + C b_o / H
    y - mean(y) = (sum_k alpha_k w_k) / s2 + c,  w_k = Q u_k,  Q = C (I + W_p) diag(g2),
                                                 c = C((I + W_p) b2 + b_p),  s2 = std(o)
    D·var(o) = alphaᵀ G_u alpha,  D·var(y) = alphaᵀ G_w alpha / s2² + 2 alpha·(W c) / s2 + |c|²

with per-video Gram matrices G_u = U Uᵀ, G_w = W Wᵀ, G_g = (g3 W)(g3 W)ᵀ. The numerator <t, z> and
|z|² of the final cosine need alphaᵀ G_g alpha, three per-item linear terms, and the per-(text, item)
inner products e_k = <g3 ⊙ t, w_k> = <(Rᵀ (g3 ⊙ t))_h, v_jh> + const with R = Q C W_o, i.e. the same
head-sliced [T, D] x [D, V·F] product as the attention logits. Per pair the work is two F·D dot
products (logits, e) and three K x K quadratic forms instead of the reference's two D x D mat-vecs,
and nothing of size D is stored per pair. With one head, W_k and W_v move to the text side too, so a
video needs only LN1(frames) and its items (`prepare_text`). Grams and quadratic forms run in float32 by default
(`acc_dtype=torch.float64` is available): in every case tried, including near-cancelling frames, the
error is dominated by the float32 items, as in the reference math, not by the accumulation.

Ablation poolings (the reference's `baseline_pooling.py`, on L2-normalised text and frames): mean of
frames, top-k frames by text-frame similarity, softmax attention with temperature 0.01. Their cosine
is again (sum_j w_j <t, f_j>) / sqrt(wᵀ G w) with the per-video frame Gram G, which the fast path uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# reference (layer6ai-labs/xpool `modules/transformer.py::Transformer`) parameter prefixes -> ours
REFERENCE_KEY_MAP: dict[str, str] = {
    "layer_norm1.": "norm_in.",
    "cross_attn.q_proj.": "q_proj.",
    "cross_attn.k_proj.": "k_proj.",
    "cross_attn.v_proj.": "v_proj.",
    "cross_attn.out_proj.": "out_proj.",
    "layer_norm2.": "norm_attn.",
    "linear_proj.": "linear_proj.",
    "layer_norm3.": "norm_out.",
}

POOLINGS = ("transformer", "mean", "topk", "attention")


def map_reference_state_dict(state: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Rename the reference X-Pool `Transformer` keys (optionally under `prefix`) to `TextConditionedPool` keys."""
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        for old, new in REFERENCE_KEY_MAP.items():
            if rest.startswith(old):
                out[new + rest[len(old) :]] = value
                break
        else:
            raise KeyError(f"unexpected X-Pool parameter {key!r}")
    return out


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine along the last dim with the reference's plain x/|x| normalisation (no epsilon)."""
    return ((a / a.norm(dim=-1, keepdim=True)) * (b / b.norm(dim=-1, keepdim=True))).sum(-1)


class TextConditionedPool(nn.Module):
    """X-Pool's pooling transformer: one cross-attention block from a text to the frames of a video."""

    def __init__(self, dim: int = 512, heads: int = 1, dropout: float = 0.3, eps: float = 1e-5):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.norm_in = nn.LayerNorm(dim, eps=eps)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm_attn = nn.LayerNorm(dim, eps=eps)
        self.linear_proj = nn.Linear(dim, dim)
        self.norm_out = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference init: identity weights and zero biases for every projection, default LayerNorms."""
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj, self.linear_proj):
            nn.init.eye_(lin.weight)
            nn.init.zeros_(lin.bias)
        for ln in (self.norm_in, self.norm_attn, self.norm_out):
            ln.reset_parameters()

    def load_reference_state_dict(self, state: dict[str, Tensor], prefix: str = "") -> None:
        """Load a state dict saved from the reference `Transformer` (original key names)."""
        self.load_state_dict(map_reference_state_dict(state, prefix))

    # ---------------------------------------------------------------------- reference math
    def _split(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.heads, self.head_dim))

    def _finish(self, attn: Tensor) -> Tensor:
        o = self.out_proj(attn.flatten(-2))
        r = self.norm_attn(o)
        return self.norm_out(r + self.dropout(self.linear_proj(r)))

    def forward(self, text: Tensor, frames: Tensor, frame_mask: Tensor | None = None) -> Tensor:
        """Pooled video per (text, video): text [T, D], frames [V, F, D] -> [T, V, D] (the reference's [V, T, D]ᵀ)."""
        q = self._split(self.q_proj(self.norm_in(text))) / math.sqrt(self.head_dim)
        fn = self.norm_in(frames)
        k, v = self._split(self.k_proj(fn)), self._split(self.v_proj(fn))
        logits = torch.einsum("thc,vfhc->tvhf", q, k)
        if frame_mask is not None:
            logits = logits.masked_fill(~frame_mask.bool()[None, :, None, :], float("-inf"))
        attn = torch.einsum("tvhf,vfhc->tvhc", logits.softmax(-1), v)
        return self._finish(attn)

    def forward_paired(self, text: Tensor, frames: Tensor, frame_mask: Tensor | None = None) -> Tensor:
        """Each video pooled by its own texts: text [V, P, D], frames [V, F, D] -> [V, P, D]."""
        q = self._split(self.q_proj(self.norm_in(text))) / math.sqrt(self.head_dim)
        fn = self.norm_in(frames)
        k, v = self._split(self.k_proj(fn)), self._split(self.v_proj(fn))
        logits = torch.einsum("vphc,vfhc->vphf", q, k)
        if frame_mask is not None:
            logits = logits.masked_fill(~frame_mask.bool()[:, None, None, :], float("-inf"))
        attn = torch.einsum("vphf,vfhc->vphc", logits.softmax(-1), v)
        return self._finish(attn)


def xpool_similarity_reference(
    pool: TextConditionedPool, text: Tensor, frames: Tensor, frame_mask: Tensor | None = None
) -> Tensor:
    """cos(t, z_{v|t}) [T, V] by materialising every pooled vector (the oracle and one-shot baseline)."""
    return cosine(text.unsqueeze(1), pool(text, frames, frame_mask))


# -------------------------------------------------------------------------- fast exact scorer
@dataclass
class FoldedWeights:
    """Weight products of one `TextConditionedPool` that the fast scorer needs (see module docstring)."""

    P: Tensor  # C W_o                                  [D, D]
    beta_o: Tensor  # C b_o                             [D]
    R: Tensor  # C (I + W_p) diag(g2) C W_o             [D, D]
    rho: Tensor  # C (I + W_p) diag(g2) C b_o           [D]
    c: Tensor  # C ((I + W_p) b2 + b_p)                 [D]
    g3: Tensor
    b3: Tensor
    eps2: float
    eps3: float


def _centre_rows(m: Tensor) -> Tensor:
    """C m: subtract the mean over the first (output) dimension."""
    return m - m.mean(0, keepdim=True)


def fold_weights(pool: TextConditionedPool) -> FoldedWeights:
    """Fold out_proj, LN2's affine part and (I + linear_proj) into the per-item vector maps."""
    d = pool.dim
    eye = torch.eye(d, dtype=pool.out_proj.weight.dtype, device=pool.out_proj.weight.device)
    P = _centre_rows(pool.out_proj.weight)
    beta_o = _centre_rows(pool.out_proj.bias[:, None])[:, 0]
    ip = eye + pool.linear_proj.weight
    Q = _centre_rows(ip * pool.norm_attn.weight[None, :])
    c = _centre_rows((ip @ pool.norm_attn.bias + pool.linear_proj.bias)[:, None])[:, 0]
    return FoldedWeights(
        P=P, beta_o=beta_o, R=Q @ P, rho=Q @ beta_o, c=c,
        g3=pool.norm_out.weight, b3=pool.norm_out.bias,
        eps2=pool.norm_attn.eps, eps3=pool.norm_out.eps,
    )  # fmt: skip


@dataclass
class TextSide:
    """Per-text pieces of the fast scorer."""

    q: Tensor  # scaled queries [T, H, dh]
    g: Tensor  # Rᵀ (g3 ⊙ t) split by head [T, H, dh]
    kappa: Tensor  # <g3 ⊙ t, rho>   [T]
    tc: Tensor  # <g3 ⊙ t, c>        [T]
    tb: Tensor  # <t, b3>            [T]
    tn: Tensor  # |t|                [T]


@dataclass
class VideoSide:
    """Per-video pieces of the fast scorer; items are ordered (head, frame)."""

    k: Tensor  # keys [V, F, H, dh] (one head: LN1(frames) [V, F, 1, D])
    v: Tensor  # values [V, F, H, dh] (one head: LN1(frames) [V, F, 1, D])
    w: Tensor  # folded items w_k [V, K, D] (used to build pooled vectors when asked)
    grams: Tensor  # [V, 3, K, K] (G_u, G_w, G_g), accumulation dtype
    lin: Tensor  # [V, 3, K] (<w, c>, <g3 w, g3 c>, <w, g3 b3>), accumulation dtype
    mask: Tensor | None  # [V, F] bool


def prepare_text(pool: TextConditionedPool, fw: FoldedWeights, text: Tensor) -> TextSide:
    """Per-text quantities: queries, the folded text vector for e_k and a few scalars.

    With one head, W_k and W_v move to the text side (logits <W_kᵀ q, f'_j>, the per-text constant
    <q, b_k> dropped as softmax ignores it; e_j = <W_vᵀ g, f'_j> + <g, b_v>), so videos need no k/v.
    """
    q = pool._split(pool.q_proj(pool.norm_in(text))) / math.sqrt(pool.head_dim)
    gt = text * fw.g3
    g = pool._split(gt @ fw.R)
    kappa = gt @ fw.rho
    if pool.heads == 1:
        kappa = kappa + g[:, 0] @ pool.v_proj.bias
        q, g = q @ pool.k_proj.weight, g @ pool.v_proj.weight
    return TextSide(q=q, g=g, kappa=kappa, tc=gt @ fw.c, tb=text @ fw.b3, tn=text.norm(dim=-1))


def prepare_video(
    pool: TextConditionedPool, fw: FoldedWeights, frames: Tensor, frame_mask: Tensor | None = None,
    acc_dtype: torch.dtype = torch.float32,
) -> VideoSide:  # fmt: skip
    """Per-video quantities: keys, values, folded items and their Gram matrices and linear terms."""
    h, dh = pool.heads, pool.head_dim
    fn = pool.norm_in(frames)
    nv, nf = frames.shape[:2]
    if h == 1:  # keys = values = LN1(frames); W_k, W_v live on the text side (see prepare_text)
        k = v = fn.unsqueeze(2)
        wv, bv = pool.v_proj.weight, pool.v_proj.bias
        u = fn @ (fw.P @ wv).T + (fw.P @ bv + fw.beta_o)
        w = fn @ (fw.R @ wv).T + (fw.R @ bv + fw.rho)
    else:
        k, v = pool._split(pool.k_proj(fn)), pool._split(pool.v_proj(fn))
        u = torch.einsum("dhc,vfhc->vhfd", fw.P.view(-1, h, dh), v).reshape(nv, h * nf, -1) + fw.beta_o / h
        w = torch.einsum("dhc,vfhc->vhfd", fw.R.view(-1, h, dh), v).reshape(nv, h * nf, -1) + fw.rho / h
    u64, w64 = u.to(acc_dtype), w.to(acc_dtype)
    g3, c, b3 = fw.g3.to(acc_dtype), fw.c.to(acc_dtype), fw.b3.to(acc_dtype)
    gw = w64 * g3
    grams = torch.stack([u64 @ u64.mT, w64 @ w64.mT, gw @ gw.mT], dim=1)
    lin = torch.stack([w64 @ c, gw @ (g3 * c), w64 @ (g3 * b3)], dim=1)
    mask = None if frame_mask is None else frame_mask.bool()
    return VideoSide(k=k, v=v, w=w, grams=grams, lin=lin, mask=mask)


def _softmax_last(x: Tensor) -> Tensor:
    """Softmax over a short last dimension (faster than the generic kernel for 12 frames)."""
    e = (x - x.amax(-1, keepdim=True)).exp_()
    return e.div_(e.sum(-1, keepdim=True))


def attention_weights(ts: TextSide, vs: VideoSide) -> Tensor:
    """Softmax attention weights [T, V, K] (K = heads x frames, head-major)."""
    logits = torch.einsum("thc,vfhc->tvhf", ts.q, vs.k)
    if vs.mask is not None:
        logits = logits.masked_fill(~vs.mask[None, :, None, :], float("-inf"))
    return _softmax_last(logits).flatten(2)


def _quad(alpha: Tensor, grams: Tensor, lin: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """alphaᵀ G_s alpha [T, V, S] (and alpha·l_s) for every pair: [T, V, K] x [V, S, K, K] (x [V, S, K])."""
    nt, nv, nk = alpha.shape
    ns = grams.shape[1]
    a = alpha.transpose(0, 1).to(grams.dtype).contiguous()  # [V, T, K]
    rhs = grams.transpose(1, 2).reshape(nv, nk, ns * nk)
    if lin is not None:
        rhs = torch.cat([rhs, lin.transpose(1, 2)], dim=2)
    out = torch.bmm(a, rhs)  # [V, T, S·K (+ S)]
    quad = torch.matmul(out[..., : ns * nk].reshape(nv, nt, ns, nk), a.unsqueeze(-1)).squeeze(-1)
    return quad.transpose(0, 1), (None if lin is None else out[..., ns * nk :].transpose(0, 1))


def pair_statistics(fw: FoldedWeights, ts: TextSide, vs: VideoSide) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-pair alpha [T, V, K], std(o) s2, std(y) s3, <t, z> and |z|² ([T, V] each, accumulation dtype)."""
    acc = vs.grams.dtype
    d = fw.c.shape[0]
    alpha = attention_weights(ts, vs)  # [T, V, K]
    e = torch.einsum("thc,vfhc->tvhf", ts.g, vs.v).flatten(2)
    ae = (alpha * e).sum(-1).to(acc) + ts.kappa.to(acc)[:, None]
    quad, lin = _quad(alpha, vs.grams, vs.lin)
    c, g3, b3 = fw.c.to(acc), fw.g3.to(acc), fw.b3.to(acc)
    s2 = (quad[..., 0] / d + fw.eps2).sqrt()
    yy = quad[..., 1] / s2**2 + 2 * lin[..., 0] / s2 + c @ c
    s3 = (yy / d + fw.eps3).sqrt()
    tz = (ae / s2 + ts.tc.to(acc)[:, None]) / s3 + ts.tb.to(acc)[:, None]
    gy = quad[..., 2] / s2**2 + 2 * lin[..., 1] / s2 + (g3 * c) @ (g3 * c)
    by = lin[..., 2] / s2 + (g3 * b3) @ c
    zz = gy / s3**2 + 2 * by / s3 + b3 @ b3
    return alpha, s2, s3, tz, zz


def score_prepared(fw: FoldedWeights, ts: TextSide, vs: VideoSide) -> Tensor:
    """cos(t, z_{v|t}) [T, V] from prepared text and video sides, without any per-pair D-vector."""
    _, _, _, tz, zz = pair_statistics(fw, ts, vs)
    return (tz / (ts.tn.to(tz.dtype)[:, None] * zz.sqrt())).to(ts.q.dtype)


def pooled_prepared(fw: FoldedWeights, ts: TextSide, vs: VideoSide) -> Tensor:
    """Pooled vectors z_{v|t} [T, V, D] from prepared sides (O(K·D) per pair instead of O(D²))."""
    alpha = attention_weights(ts, vs)
    d = fw.c.shape[0]
    s2 = (_quad(alpha, vs.grams[:, :1])[0][..., 0] / d + fw.eps2).sqrt().to(alpha.dtype)
    y = torch.bmm(alpha.transpose(0, 1), vs.w).transpose(0, 1) / s2.unsqueeze(-1) + fw.c
    s3 = (y.pow(2).mean(-1, keepdim=True) + fw.eps3).sqrt()
    return y / s3 * fw.g3 + fw.b3


def fast_pair_bytes(heads: int, frames: int) -> int:
    """Approximate bytes one (text, video) pair costs inside `xpool_similarity_fast`."""
    k = heads * frames
    return 8 * (12 * k + 16)


def xpool_similarity_fast(
    pool: TextConditionedPool, text: Tensor, frames: Tensor, frame_mask: Tensor | None = None,
    max_bytes: int = 256 * 2**20, acc_dtype: torch.dtype = torch.float32,
) -> Tensor:  # fmt: skip
    """cos(t, z_{v|t}) [T, V] with the folded algebra, in text chunks of at most `max_bytes` temporaries."""
    if pool.training and pool.dropout.p > 0:
        raise RuntimeError("the fast X-Pool scorer is exact only without dropout: call pool.eval() first")
    fw = fold_weights(pool)
    vs = prepare_video(pool, fw, frames, frame_mask, acc_dtype)
    nt, nv = text.shape[0], frames.shape[0]
    rows = max(1, max_bytes // (fast_pair_bytes(pool.heads, frames.shape[1]) * max(1, nv)))
    out = [score_prepared(fw, prepare_text(pool, fw, text[i : i + rows]), vs) for i in range(0, nt, rows)]
    return torch.cat(out, 0) if out else text.new_zeros(0, nv)


# ------------------------------------------------------------------------------ ablation poolings
def frame_weights(
    kind: str, sims: Tensor, frame_mask: Tensor | None = None, k: int = 3, temperature: float = 0.01
) -> Tensor:
    """Per-frame pooling weights [T, V, F] for 'mean', 'topk' (sum of the k best frames) or 'attention'."""
    valid = torch.ones_like(sims, dtype=torch.bool) if frame_mask is None else frame_mask.bool()[None].expand_as(sims)
    if kind == "mean":
        return valid.to(sims.dtype) / valid.sum(-1, keepdim=True).clamp_min(1)
    masked = sims.masked_fill(~valid, float("-inf"))
    if kind == "topk":
        if k < 1:
            raise ValueError(f"top-k pooling needs k >= 1, got {k}")
        idx = masked.topk(min(k, sims.shape[-1]), dim=-1).indices
        return torch.zeros_like(sims).scatter_(-1, idx, 1.0) * valid
    if kind == "attention":
        if temperature <= 0:
            raise ValueError(f"attention pooling needs a positive temperature, got {temperature}")
        return (masked / temperature).softmax(-1)
    raise ValueError(f"unknown pooling {kind!r}; choose one of {POOLINGS[1:]}")


def baseline_pool_reference(
    kind: str, text: Tensor, frames: Tensor, frame_mask: Tensor | None = None, k: int = 3, temperature: float = 0.01
) -> Tensor:
    """Reference ablation pooling on L2-normalised inputs, materialised: [T, V, D]."""
    tn, fn = F.normalize(text, dim=-1), F.normalize(frames, dim=-1)
    w = frame_weights(kind, torch.einsum("td,vfd->tvf", tn, fn), frame_mask, k, temperature)
    return torch.einsum("tvf,vfd->tvd", w, fn)


def baseline_similarity(
    kind: str, text: Tensor, frames: Tensor, frame_mask: Tensor | None = None, k: int = 3, temperature: float = 0.01
) -> Tensor:
    """cos(t, pooled) [T, V] of an ablation pooling via the per-video frame Gram (no [T, V, D] tensor)."""
    tn, fn = F.normalize(text, dim=-1), F.normalize(frames, dim=-1)
    sims = torch.einsum("td,vfd->tvf", tn, fn)
    w = frame_weights(kind, sims, frame_mask, k, temperature)
    gram = fn @ fn.mT  # [V, F, F]
    norm2 = _quad(w, gram.unsqueeze(1))[0][..., 0]
    return (w * sims).sum(-1) / norm2.clamp_min(0).sqrt()
