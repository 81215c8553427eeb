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

from tvr_bench.functional.steps import step_bytes

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
    w: Tensor  # folded items w_k [V, K, D] (T-MASS and pooled vectors use them)
    quad: Tensor  # [V, 3K + 3, K]: G_u, G_w, G_g stacked, then the rows <w, c>, <g3 w, g3 c>, <w, g3 b3>
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
    nv, nf, d = frames.shape
    if h == 1:  # keys = values = LN1(frames); W_k, W_v live on the text side (see prepare_text)
        k = v = fn.unsqueeze(2)
        wv, bv = pool.v_proj.weight, pool.v_proj.bias
        maps = torch.cat([fw.P @ wv, fw.R @ wv], 0)  # u and w from one [V·F, D] x [D, 2D] product
        shift = torch.cat([fw.P @ bv + fw.beta_o, fw.R @ bv + fw.rho])
        uw = torch.addmm(shift, fn.reshape(nv * nf, d), maps.T).view(nv, nf, 2 * d)
        u, w = uw[..., :d], uw[..., d:]
    else:
        k, v = pool._split(pool.k_proj(fn)), pool._split(pool.v_proj(fn))
        u = torch.einsum("dhc,vfhc->vhfd", fw.P.view(-1, h, dh), v).reshape(nv, h * nf, -1) + fw.beta_o / h
        w = torch.einsum("dhc,vfhc->vhfd", fw.R.view(-1, h, dh), v).reshape(nv, h * nf, -1) + fw.rho / h
    ua, wa = u.to(acc_dtype), w.to(acc_dtype)
    g3, c, b3 = fw.g3.to(acc_dtype), fw.c.to(acc_dtype), fw.b3.to(acc_dtype)
    gw = wa * g3
    lin = wa @ torch.stack([c, g3 * g3 * c, g3 * b3], 1)  # [V, K, 3]
    quad = torch.cat([ua @ ua.mT, wa @ wa.mT, gw @ gw.mT, lin.mT], dim=1)
    mask = None if frame_mask is None else frame_mask.bool()
    return VideoSide(k=k, v=v, w=w, quad=quad, mask=mask)


def _item_products(ts: TextSide, vs: VideoSide, with_e: bool = True) -> tuple[Tensor, Tensor | None]:
    """Attention logits and e_k = <g, v_k> (None without `with_e`), video-major [V, H, F, T]: [V·F, D] x [D, T]
    products (one head)."""
    nv, nf, h, dh = vs.k.shape
    nt = ts.q.shape[0]
    if h == 1:
        x = vs.k.reshape(nv * nf, dh)
        e = (x @ ts.g[:, 0].T).view(nv, 1, nf, nt) if with_e else None
        return (x @ ts.q[:, 0].T).view(nv, 1, nf, nt), e
    return torch.einsum("vfhc,thc->vhft", vs.k, ts.q), torch.einsum("vfhc,thc->vhft", vs.v, ts.g) if with_e else None


def _softmax_frames_(logits: Tensor, mask: Tensor | None) -> Tensor:
    """In-place softmax over the frame axis of [V, H, F, T] logits (padded frames get weight 0)."""
    if mask is not None:
        logits.masked_fill_(~mask[:, None, :, None], float("-inf"))
    logits.sub_(logits.amax(2, keepdim=True)).exp_()
    return logits.div_(logits.sum(2, keepdim=True))


def attention_weights(ts: TextSide, vs: VideoSide) -> Tensor:
    """Softmax attention weights [V, K, T] (video-major; K = heads x frames, head-major)."""
    logits, _ = _item_products(ts, vs, with_e=False)
    nv, h, nf, nt = logits.shape
    return _softmax_frames_(logits, vs.mask).reshape(nv, h * nf, nt)


def pair_statistics(
    fw: FoldedWeights, ts: TextSide, vs: VideoSide, with_tz: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:  # fmt: skip
    """Per-pair alpha [V, K, T], std(o) s2, std(y) s3, <t, z> and |z|² ([V, T] each, accumulation dtype).

    Video-major: the two item products come out as [V·F, T] blocks, so the softmax, alpha·e and the
    K x K quadratic forms (one [3K + 3, K] x [K, T] product per video) all run over contiguous memory.
    Without `with_tz` the e-product (one of the two) is skipped and <t, z> is None: callers that build
    z anyway (`pooled_prepared`) do not need <t, z> from the statistics. (T-MASS keeps the e-product: taking
    <t, z> from its z was measured as costly as the product it saves, docs/results/perf.md.)
    """
    acc = vs.quad.dtype
    d = fw.c.shape[0]
    logits, e = _item_products(ts, vs, with_e=with_tz)
    nv, h, nf, nt = logits.shape
    nk = h * nf
    alpha = _softmax_frames_(logits, vs.mask).reshape(nv, nk, nt)
    a = alpha.to(acc)
    forms = torch.bmm(vs.quad, a)  # [V, 3K + 3, T]
    quad = forms[:, : 3 * nk].view(nv, 3, nk, nt).mul_(a.unsqueeze(1)).sum(2)  # [V, 3, T]
    lin = forms[:, 3 * nk :]
    c, g3, b3 = fw.c.to(acc), fw.g3.to(acc), fw.b3.to(acc)
    s2 = (quad[:, 0] / d + fw.eps2).sqrt()
    yy = quad[:, 1] / s2**2 + 2 * lin[:, 0] / s2 + c @ c
    s3 = (yy / d + fw.eps3).sqrt()
    tz = None
    if e is not None:
        ae = e.reshape(nv, nk, nt).mul_(alpha).sum(1).to(acc) + ts.kappa.to(acc)
        tz = (ae / s2 + ts.tc.to(acc)) / s3 + ts.tb.to(acc)
    gy = quad[:, 2] / s2**2 + 2 * lin[:, 1] / s2 + (g3 * c) @ (g3 * c)
    by = lin[:, 2] / s2 + (g3 * b3) @ c
    zz = gy / s3**2 + 2 * by / s3 + b3 @ b3
    return alpha, s2, s3, tz, zz


def score_prepared(fw: FoldedWeights, ts: TextSide, vs: VideoSide) -> Tensor:
    """cos(t, z_{v|t}) [T, V] from prepared text and video sides, without any per-pair D-vector."""
    _, _, _, tz, zz = pair_statistics(fw, ts, vs)
    return (tz / (ts.tn.to(tz.dtype) * zz.sqrt())).to(ts.q.dtype).T


def pooled_prepared(fw: FoldedWeights, ts: TextSide, vs: VideoSide) -> Tensor:
    """Pooled vectors z_{v|t} [T, V, D] from prepared sides (O(K·D) per pair instead of O(D²))."""
    alpha, s2, s3, _, _ = pair_statistics(fw, ts, vs, with_tz=False)
    y = torch.bmm(alpha.mT.to(vs.w.dtype), vs.w) / s2.to(vs.w.dtype).unsqueeze(-1) + fw.c  # [V, T, D]
    return (fw.g3 * y / s3.to(y.dtype).unsqueeze(-1) + fw.b3).transpose(0, 1)


def fast_pair_bytes(heads: int, frames: int) -> int:
    """Approximate bytes one (text, video) pair costs inside `xpool_similarity_fast` (float32 temporaries)."""
    k = heads * frames
    return 4 * (6 * k + 24)


#: Temporaries of one (text chunk x video block) step of the fast scorers. Small steps stay in cache, but each
#: op is a parallel region and on a busy 2-core machine every region waits for a descheduled thread. At
#: 1000 x 1000 with 2 threads: quiet (load < 1) 8 / 16 / 32 / 128 MiB took 4.1 / 4.2 / 4.3 / 4.7 products of
#: [1000, 512] x [512, 12000]; busy (load 6) 16 / 64 / 256 MiB took 20 / 12 / 9. Each tensor of a 32 MiB step
#: stays under glibc's 32 MiB mmap threshold, so its memory is reused rather than page-faulted again.
BLOCK_BYTES = 32 * 2**20


def slice_video(vs: VideoSide, start: int, stop: int) -> VideoSide:
    """Videos `start:stop` of a prepared video side (views)."""
    mask = None if vs.mask is None else vs.mask[start:stop]
    return VideoSide(k=vs.k[start:stop], v=vs.v[start:stop], w=vs.w[start:stop], quad=vs.quad[start:stop], mask=mask)


def video_block(n_text: int, pair_bytes: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Videos per step so that one step's temporaries for `n_text` texts stay near `block_bytes`."""
    return max(1, block_bytes // max(1, pair_bytes * max(1, n_text)))


def xpool_similarity_fast(
    pool: TextConditionedPool, text: Tensor, frames: Tensor, frame_mask: Tensor | None = None,
    max_bytes: int = 256 * 2**20, acc_dtype: torch.dtype = torch.float32, block_bytes: int | None = None,
) -> Tensor:  # fmt: skip
    """cos(t, z_{v|t}) [T, V] with the folded algebra, in text chunks x video blocks of small temporaries.

    `max_bytes` bounds the text chunk (all videos), `block_bytes` the temporaries of one step (default: BLOCK_BYTES
    on CPU, `max_bytes` on accelerators; `tvr_bench.functional.steps`). Inputs are
    cast to float32 and autocast is off inside (scores stay float32 under bf16-mixed).
    """
    if pool.training and pool.dropout.p > 0:
        raise RuntimeError("the fast X-Pool scorer is exact only without dropout: call pool.eval() first")
    with torch.autocast(device_type=_autocast_type(text), enabled=False):
        text, frames = text.float(), frames.float()
        fw = fold_weights(pool)
        vs = prepare_video(pool, fw, frames, frame_mask, acc_dtype)
        nt, nv = text.shape[0], frames.shape[0]
        block_bytes = step_bytes(text.device, BLOCK_BYTES, max_bytes, block_bytes)
        pair = fast_pair_bytes(pool.heads, frames.shape[1])
        rows = max(1, max_bytes // (pair * max(1, nv)))
        out = text.new_empty(nt, nv)
        for i in range(0, nt, rows):
            ts = prepare_text(pool, fw, text[i : i + rows])
            cols = video_block(ts.q.shape[0], pair, block_bytes)
            for j in range(0, nv, cols):
                out[i : i + rows, j : j + cols] = score_prepared(fw, ts, slice_video(vs, j, j + cols))
        return out


def _autocast_type(x: Tensor) -> str:
    """The autocast device type of a tensor ('cpu' for device types autocast does not know)."""
    return x.device.type if x.device.type in ("cpu", "cuda", "xpu", "mps") else "cpu"


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
    wv = w.transpose(0, 1)  # [V, T, F]
    norm2 = (torch.bmm(wv, gram) * wv).sum(-1).T  # wᵀ G w per pair, [T, V]
    return (w * sims).sum(-1) / norm2.clamp_min(0).sqrt()
