"""MASCOT (Fang et al., ACM MM 2023): attention-based video masking, informed semantics completion, co-learning.

No reference code exists and only the paper's abstract could be read; everything below that the
abstract does not pin down is a named argument (see docs/methods/mascot.md for every choice).

Notation: a frame has P patch tokens; its encoder gives projected class token c and patch features
z_1..P. A score s_j per patch (class-token attention of the visual encoder by default) ranks them;
with K = round(r·P) masked patches,

* high-informed mask: hide the K highest-scored (discriminative) patches, keep the rest;
* low-informed mask: hide the K lowest-scored (background) patches, keep the rest.

A masked view runs the encoder on the kept patches only. Informed semantics completion predicts the
features of the hidden patches, ẑ_j, from the masked view (and, optionally, the caption's tokens) and
aligns them with the unmasked view's features z_j (stop-gradient) and with the paired text t:

    L_isc = mean_j (1 - cos(ẑ_j, z_j)) + λ_t · mean_j (cos(ẑ_j, t) - cos(z_j, t))²,

which is zero exactly when ẑ = z. Co-learning makes the in-batch retrieval distributions of two views
agree, each learning from the other (deep mutual learning):

    L_co = ½ Σ_{axis ∈ {t2v, v2t}} [KL(sg(p_b) ‖ p_a) + KL(sg(p_a) ‖ p_b)],  p = softmax(τ·S).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTENTION_SOURCES = ("cls", "text", "random")
INFORMED = ("high", "low")
COMPLETION_DISTANCES = ("cosine", "mse")


# ---------------------------------------------------------------------------------------- masking
def num_masked(num_patches: int, mask_ratio: float) -> int:
    """Patches a mask hides per frame: round(ratio · P), capped at P - 1 so one patch always stays visible."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return min(int(round(mask_ratio * num_patches)), num_patches - 1)


def text_patch_scores(patches: Tensor, text: Tensor) -> Tensor:
    """Text-guided patch relevance [N, P]: cosine of each patch feature [N, P, D] with its paired text [N, D]."""
    return (F.normalize(patches, dim=-1) * F.normalize(text, dim=-1).unsqueeze(1)).sum(-1)


def random_patch_scores(
    n: int, num_patches: int, generator: torch.Generator | None = None, device: torch.device | None = None
) -> Tensor:
    """Uniform random patch scores [N, P]: plain random masking, the baseline MASCOT replaces."""
    return torch.rand(n, num_patches, generator=generator, device=device)


def informed_mask(scores: Tensor, mask_ratio: float, informed: str = "high") -> tuple[Tensor, Tensor]:
    """Keep and mask indices [N, P-K], [N, K] (each ascending) of a high- or low-informed mask over `scores` [N, P].

    `high` hides the K top-scored patches (the discriminative ones), `low` the K bottom-scored ones
    (background). Ties are broken by position (a stable sort, lower position ranks higher).
    """
    if informed not in INFORMED:
        raise ValueError(f"informed must be one of {INFORMED}, got {informed!r}")
    p = scores.shape[-1]
    k = num_masked(p, mask_ratio)
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    if informed == "high":
        masked, keep = order[:, :k], order[:, k:]
    else:
        masked, keep = order[:, p - k :], order[:, : p - k]
    return keep.sort(dim=-1).values, masked.sort(dim=-1).values


def gather_patches(patches: Tensor, index: Tensor) -> Tensor:
    """Rows of `patches` [N, P, D] at `index` [N, K] -> [N, K, D]."""
    return torch.gather(patches, 1, index.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))


# ------------------------------------------------------------------------------------ completion
class CompletionPredictor(nn.Module):
    """A light MAE-style decoder: predicts the features of a masked view's hidden patches.

    The sequence is [class token of the masked view, P patch slots (the visible features at their
    positions, a learned mask token elsewhere), optionally the caption's token states]; learned position
    embeddings mark the patch slots and a learned type embedding the text tokens. `depth` pre-norm
    transformer layers run over it; the outputs at the hidden positions, after LayerNorm and a linear
    layer, are the predictions. Used only in training: inference never masks.
    """

    def __init__(self, dim: int, num_patches: int, depth: int = 1, heads: int | None = None, mlp_ratio: float = 2.0):
        super().__init__()
        if depth < 1:
            raise ValueError(f"predictor depth must be at least 1, got {depth}")
        heads = heads or max(1, dim // 64)
        if dim % heads:
            raise ValueError(f"predictor width {dim} is not divisible by {heads} heads")
        self.num_patches = num_patches
        self.mask_token = nn.Parameter(torch.randn(dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(num_patches + 1, dim) * 0.02)
        self.text_type = nn.Parameter(torch.randn(dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, heads, int(mlp_ratio * dim), dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, dim)

    def forward(
        self,
        cls: Tensor,
        visible: Tensor,
        keep_index: Tensor,
        mask_index: Tensor,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
    ) -> Tensor:
        """Predicted features [N, K, D] at `mask_index` from the masked view (`cls` [N, D], `visible` [N, P-K, D])."""
        n, _, d = visible.shape
        slots = self.mask_token.to(visible.dtype).expand(n, self.num_patches, d).contiguous()
        slots = slots.scatter(1, keep_index.unsqueeze(-1).expand(-1, -1, d), visible)
        x = torch.cat([cls.unsqueeze(1), slots], dim=1) + self.pos
        pad = None
        if text_tokens is not None:
            x = torch.cat([x, text_tokens + self.text_type], dim=1)
            if text_mask is not None:
                pad = torch.cat([text_mask.new_zeros(n, self.num_patches + 1), ~text_mask.bool()], dim=1)
        for block in self.blocks:
            x = block(x, src_key_padding_mask=pad)
        out = self.head(self.norm(x[:, 1 : self.num_patches + 1]))
        return gather_patches(out, mask_index)


def semantic_completion_loss(
    pred: Tensor,
    target: Tensor,
    text: Tensor | None = None,
    text_weight: float = 1.0,
    distance: str = "cosine",
    stop_grad_target: bool = True,
    detach_text: bool = True,
) -> Tensor:
    """Per-row informed semantics completion loss [N] of predictions `pred` [N, K, D] against `target` [N, K, D].

    Visual term: mean over the K hidden patches of 1 - cos (`cosine`) or the squared error (`mse`).
    Text term (when `text` [N, D] is given): `text_weight` · mean of (cos(ẑ, t) - cos(z, t))², i.e. the
    completed patches must relate to the caption as the real ones do. Zero when pred equals target;
    zero rows when K = 0.
    """
    if distance not in COMPLETION_DISTANCES:
        raise ValueError(f"distance must be one of {COMPLETION_DISTANCES}, got {distance!r}")
    if pred.shape[1] == 0:
        return pred.sum(dim=(1, 2)) * 0.0
    tgt = target.detach() if stop_grad_target else target
    if distance == "cosine":
        visual = 1.0 - F.cosine_similarity(pred, tgt, dim=-1)
    else:
        visual = (pred - tgt).pow(2).mean(-1)
    loss = visual.mean(-1)
    if text is not None and text_weight != 0.0:
        t = text.detach() if detach_text else text
        gap = text_patch_scores(pred, t) - text_patch_scores(tgt, t)
        loss = loss + text_weight * gap.pow(2).mean(-1)
    return loss


# ------------------------------------------------------------------------------------- co-learning
def _kl_rows(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Mean over rows of KL(softmax(teacher) ‖ softmax(student))."""
    return F.kl_div(
        F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1), log_target=True, reduction="batchmean"
    )


def mutual_colearning_loss(
    sims_a: Tensor, sims_b: Tensor, logit_scale: Tensor | float, detach_peer: bool = True
) -> Tensor:
    """Co-learning of two views' [B, B] text-video similarities: each view's t2v and v2t distributions learn the other's.

    ½ Σ over the two axes of KL(p_b ‖ p_a) + KL(p_a ‖ p_b) with p = softmax(exp(logit_scale)·S); with
    `detach_peer` the teacher side of each KL is a constant (deep mutual learning). Zero when the
    views agree.
    """
    scale = logit_scale.exp() if isinstance(logit_scale, Tensor) else math.exp(logit_scale)
    la, lb = sims_a * scale, sims_b * scale
    ta, tb = (la.detach(), lb.detach()) if detach_peer else (la, lb)
    rows = _kl_rows(tb, la) + _kl_rows(ta, lb)
    cols = _kl_rows(tb.t(), la.t()) + _kl_rows(ta.t(), lb.t())
    return 0.5 * (rows + cols)
