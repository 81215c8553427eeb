"""TS2-Net (Liu et al., ECCV 2022): token shift, differentiable top-k token selection, frame-weighted score.

The math of yuqi657/ts2_net @ 1d9d4d5 as pure functions (method card: docs/methods/ts2net.md):

* **token shift** (`token_shift`; `until_module.py` L346-390): inside the last visual blocks, the input of the
  self-attention (after `ln_1`) of every `fold`-th token (fold = tokens // 7) is replaced by the same token of the
  previous frame (tokens 1, 1+fold, ...) or of the next frame (tokens 4, 4+fold, ...), whole channels; the first /
  last frame keeps its own. The residual stream is not shifted.
* **token selection** (`differential_topk.py` L9-130): a small MLP scores every token of a frame from its own
  features and the frame's class token (`TokenScorer`, Tanh output); the `k` best patch tokens are chosen by the
  perturbed-maximum top-k (`perturbed_topk`: the mean over `samples` Gaussian perturbations, sigma 0.05, of the
  sorted one-hot top-k; its gradient is the perturbed-optimiser estimate E[onehot * noise] / sigma) and kept beside
  the class token: per frame 1 + k tokens. `hard_topk` is the noise-free selection.
* **temporal transformer** over all F * (1 + k) tokens (CLIP4Clip's seqTransf, `modeling.py` L423-438), then the
  class-token positions are the frame features (`class_positions`, L443-447).
* **score** (`frame_weighted_similarity`, `modeling.py` L575-607): s_f = cos(t, v_f); the frames are weighted by
  softmax_f(4 * s_f / ||s * m||) over real frames, score = sum_f w_f s_f (the reference multiplies by exp(logit
  scale); ranks do not change). The loss is the symmetric InfoNCE of exp(logit_scale) * score.

`reference_token_mask` reproduces how the reference lays the frame mask over the F * (1 + k) tokens (tiled instead of
repeated per frame, `modeling.py` L403-405); `token_mask` is the layout the paper describes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tvr_bench.functional.steps import step_bytes

#: Tokens are shifted in groups of tokens // SHIFT_DIV (`make_patch_shift(..., n_div=7)`, modeling.py L142).
SHIFT_DIV = 7
#: The right-shifted tokens start this many positions after the left-shifted ones (`start=1+3`, until_module.py L384).
RIGHT_SHIFT_OFFSET = 3
#: Gaussian samples and their scale in the perturbed top-k (`PerturbedTopK(k, num_samples=500, sigma=0.05)`, L10).
PERTURBED_SAMPLES = 500
PERTURBED_SIGMA = 0.05
#: The frame weights are softmax(FRAME_SOFTMAX_SCALE * normalised cosines) (`torch.softmax(4*...)`, modeling.py L597).
FRAME_SOFTMAX_SCALE = 4.0
#: The reference fills padded frames' weights with this before the softmax (modeling.py L596).
PADDED_WEIGHT = -1.0e18
#: Per-chunk temporaries of the blocked scorer on CPU (cache-sized steps; see tvr_bench/functional/steps.py).
TS2NET_CHUNK_BYTES = 4 * 2**20
#: Live [texts, videos, frames] float arrays when scoring without gradients (cosines and weights).
PAIR_ARRAYS = 2


# ------------------------------------------------------------------------------------------- token shift
def shift_indices(n_tokens: int, n_div: int = SHIFT_DIV) -> tuple[Tensor, Tensor]:
    """Token positions that take the previous frame's token (left) and the next frame's token (right)."""
    fold = n_tokens // n_div
    if fold < 1:
        raise ValueError(f"token shift needs at least n_div={n_div} tokens per frame, got {n_tokens}")
    left = torch.arange(1, n_tokens, fold)
    right = torch.arange(1 + RIGHT_SHIFT_OFFSET, n_tokens, fold)
    return left, right


def token_shift(hidden: Tensor, frames: int, n_div: int = SHIFT_DIV) -> Tensor:
    """Shift whole tokens across adjacent frames: [N = B * F, L, W] -> [N, L, W] (frames of a video consecutive).

    Token l of frame t becomes token l of frame t - 1 for the left group and of frame t + 1 for the right group
    (the right group wins where both apply, as in the reference); frames without a neighbour keep their own token.
    Padded frames are shifted like real ones (the reference has no mask here).
    """
    n, length, width = hidden.shape
    if frames < 1 or n % frames:
        raise ValueError(f"token shift: {n} images are not a whole number of videos of {frames} frames")
    left, right = (i.to(hidden.device) for i in shift_indices(length, n_div))
    x = hidden.view(n // frames, frames, length, width)
    out = x.clone()
    if frames > 1:
        out[:, 1:, left] = x[:, :-1, left]
        out[:, :-1, right] = x[:, 1:, right]
    return out.view(n, length, width)


# --------------------------------------------------------------------------------------- token scores
class TokenScorer(nn.Module):
    """Importance of every token of a frame in (-1, 1), from the token and the frame's class token.

    The layout of the reference's `PredictorLG` (differential_topk.py L61-94), so its weights load by name:
    `in_conv` = LayerNorm, Linear(D, D/2, no bias), GELU on every token; `out_conv` on [token, class token] =
    Linear(D, D/2, no bias), GELU, Linear(D/2, 1, no bias), Tanh.
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"the token scorer needs an even width, got {dim}")
        half = dim // 2
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, half, bias=False), nn.GELU())
        self.out_conv = nn.Sequential(nn.Linear(dim, half, bias=False), nn.GELU(), nn.Linear(half, 1, bias=False), nn.Tanh())
        for m in self.modules():  # the reference's init_weights (until_module.py L69-72): N(0, 0.02) linear weights
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        """Scores [N, L] of tokens [N, L, D] (token 0 is the class token)."""
        x = self.in_conv(tokens)
        x = torch.cat([x, x[:, :1].expand_as(x)], dim=-1)
        return self.out_conv(x).squeeze(-1)


# ------------------------------------------------------------------------------------------ top-k
class _PerturbedTopK(torch.autograd.Function):
    """Mean one-hot top-k over Gaussian perturbations; backward: the perturbed-optimiser gradient estimate."""

    @staticmethod
    def forward(ctx: Any, scores: Tensor, noise: Tensor, k: int, sigma: float) -> Tensor:
        samples = noise.shape[1]
        perturbed = scores.unsqueeze(1) + noise * sigma  # [N, S, P]
        index = perturbed.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values  # [N, S, k], ascending
        counts = scores.new_zeros(scores.shape[0], k, scores.shape[1])
        counts.scatter_add_(2, index.transpose(1, 2), scores.new_ones(()).expand(index.shape[0], k, samples))
        ctx.save_for_backward(index, noise)
        ctx.sigma = sigma
        return counts / samples

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        index, noise = ctx.saved_tensors
        samples = noise.shape[1]
        # sum_k grad[n, k, d] * 1[index[n, s, k] = d]: the k indices of a sample are distinct, so scatter suffices
        picked = grad.gather(2, index.transpose(1, 2)).transpose(1, 2)  # [N, S, k]
        weight = torch.zeros_like(noise).scatter_(2, index, picked)
        return (weight * noise).sum(1) / (samples * ctx.sigma), None, None, None


def perturbed_topk(scores: Tensor, k: int, noise: Tensor, sigma: float = PERTURBED_SIGMA) -> Tensor:
    """Differentiable top-k indicator [N, k, P] of scores [N, P] under the perturbations `noise` [N, S, P] ~ N(0, 1).

    Row j of an item is the fraction of the S perturbed score vectors whose j-th smallest selected index is p
    (`PerturbedTopKFuntion`, differential_topk.py L19-55); the gradient is E[one-hot * noise] / sigma.
    """
    if not 0 < k <= scores.shape[-1]:
        raise ValueError(f"top-k: k={k} with {scores.shape[-1]} candidates")
    if noise.dim() != 3 or noise.shape[0] != scores.shape[0] or noise.shape[2] != scores.shape[1]:
        raise ValueError(f"top-k noise {tuple(noise.shape)} does not match scores {tuple(scores.shape)} as [N, S, P]")
    return _PerturbedTopK.apply(scores, noise.to(scores.dtype), k, sigma)


def hard_topk(scores: Tensor, k: int) -> Tensor:
    """The noise-free selection: one-hot rows [N, k, P] of the k best scores, in ascending index order."""
    if not 0 < k <= scores.shape[-1]:
        raise ValueError(f"top-k: k={k} with {scores.shape[-1]} candidates")
    index = scores.topk(k, dim=-1).indices.sort(dim=-1).values
    return F.one_hot(index, scores.shape[-1]).to(scores.dtype)


def item_seed(*parts: Any) -> int:
    """A stable 63-bit seed from the parts (e.g. a base seed, a step and a video key); the same in every process."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def item_noise(seeds: Sequence[int], frames: int, samples: int, candidates: int, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> Tensor:  # fmt: skip
    """N(0, 1) perturbations [len(seeds) * frames, samples, candidates], each item's block from its own seed, so an
    item's draw never depends on the other items of its batch, the batch size or the process."""
    out = torch.empty(len(seeds), frames, samples, candidates, dtype=dtype, device=device)
    for i, seed in enumerate(seeds):
        generator = torch.Generator(device=device).manual_seed(int(seed))
        out[i].normal_(generator=generator)
    return out.view(len(seeds) * frames, samples, candidates)


def select_tokens(tokens: Tensor, indicator: Tensor) -> Tensor:
    """Class token plus the (soft-)selected patch tokens: tokens [N, 1 + P, D], indicator [N, k, P] -> [N, 1 + k, D]."""
    selected = torch.einsum("nkp,npd->nkd", indicator, tokens[:, 1:])
    return torch.cat([tokens[:, :1], selected], dim=1)


# --------------------------------------------------------------------------------------- token masks
def token_mask(frame_mask: Tensor, per_frame: int) -> Tensor:
    """Mask of the F * per_frame tokens of a video: each frame's value repeated for its own tokens ([B, F] -> [B, F * n])."""
    return frame_mask.repeat_interleave(per_frame, dim=1)


def reference_token_mask(frame_mask: Tensor, per_frame: int) -> Tensor:
    """The reference's layout (`video_mask.unsqueeze(1).repeat(1, 1, n).view(B, -1)`, modeling.py L405): the frame
    mask tiled n times, so token position p takes frame p % F's value instead of frame p // n's."""
    return frame_mask.repeat(1, per_frame)


def class_positions(tokens: Tensor, per_frame: int) -> Tensor:
    """Every frame's class-token position of [B, F * n, D] -> [B, F, D] (`frame_embedding_index`, modeling.py L443)."""
    return tokens[:, ::per_frame]


# ------------------------------------------------------------------------------------------- score
def frame_weighted_similarity(text: Tensor, frames: Tensor, frame_mask: Tensor,
                              scale: float = FRAME_SOFTMAX_SCALE) -> Tensor:  # fmt: skip
    """Score [T, V] of text embeddings [T, D] and frame features [V, F, D] (mask [V, F]), unscaled.

    s_f = cos(t, v_f); w = softmax_f(scale * s_f m_f / ||s m||) over real frames; score = sum_f w_f s_f
    (`get_frame_selectedcls_similarity`, modeling.py L575-607, whose per-frame softmax over a single text token is
    the identity; `get_frame_similarity`, L546-573, is the same formula). Inputs need not be normalised.
    """
    return _weighted_cosines(F.normalize(text, dim=-1), F.normalize(frames, dim=-1), frame_mask.bool(), scale)


def _weighted_cosines(t: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """`frame_weighted_similarity` of unit-norm texts [T, D] and frames [V, F, D] with a boolean mask [V, F]."""
    n_text, n_video = t.shape[0], v.shape[0]
    if n_text == 0 or n_video == 0:
        return t.new_zeros(n_text, n_video)
    cos = (t @ v.reshape(-1, v.shape[-1]).t()).view(n_text, n_video, -1)  # [T, V, F]
    weight = cos * mask
    if cos.requires_grad:  # the reference's op sequence, out-of-place: autograd keeps what it needs
        weight = (weight / weight.norm(dim=-1, keepdim=True)).masked_fill(~mask, PADDED_WEIGHT) * scale
        return (weight.softmax(dim=-1) * cos).sum(-1)
    # the same softmax in fewer passes over [T, V, F]: |scale * w| <= scale, so exp needs no max shift, and
    # exp(0) * m = 0 at padded frames plays the reference's -1e18 fill
    weight.mul_((scale / weight.norm(dim=-1, keepdim=True))).exp_().mul_(mask)
    return torch.linalg.vecdot(weight, cos).div_(weight.sum(-1))


def frame_weighted_similarity_blocked(text: Tensor, frames: Tensor, frame_mask: Tensor, max_bytes: int = 256 * 2**20,
                                      chunk_bytes: int | None = None, scale: float = FRAME_SOFTMAX_SCALE) -> Tensor:  # fmt: skip
    """`frame_weighted_similarity` in chunks whose temporaries stay under min(`max_bytes`, `chunk_bytes`) (default:
    cache-sized TS2NET_CHUNK_BYTES on CPU, `max_bytes` on accelerators); same scores, float32.

    A chunk is every text against as many videos as fit (one [T, D] x [D, F * bv] product), or a text slice against
    one video when a single video's column does not fit. Texts are normalised once, each video chunk when it is
    used (no normalised copy of all frames).
    """
    n_text, n_video, n_frames = text.shape[0], frames.shape[0], frames.shape[1]
    step = step_bytes(text.device, TS2NET_CHUNK_BYTES, max_bytes, chunk_bytes)
    kind = text.device.type if text.device.type in ("cpu", "cuda", "xpu", "mps") else "cpu"
    with torch.autocast(device_type=kind, enabled=False):
        t = F.normalize(text.float(), dim=-1)
        mask = frame_mask.bool()
        out = t.new_empty(n_text, n_video)
        if n_text == 0 or n_video == 0:
            return out
        pairs = max(1, step // pair_bytes(n_frames))
        cols = max(1, min(n_video, pairs // n_text))
        rows = n_text if cols > 1 or pairs >= n_text else pairs
        for j in range(0, n_video, cols):
            vj, mj = F.normalize(frames[j : j + cols].float(), dim=-1), mask[j : j + cols]
            for i in range(0, n_text, rows):
                out[i : i + rows, j : j + cols] = _weighted_cosines(t[i : i + rows], vj, mj, scale)
    return out


def pair_bytes(n_frames: int, itemsize: int = 4) -> int:
    """Bytes one (text, video) pair costs in `frame_weighted_similarity`: its live [F] arrays and its score."""
    return itemsize * (PAIR_ARRAYS * n_frames + 1)
