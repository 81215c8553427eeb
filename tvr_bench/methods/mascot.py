"""MASCOT (Fang et al., ACM MM 2023) on a CLIP4Clip meanP dual encoder. Follows the paper without reference code.

Training, per batch (the math lives in `tvr_bench/functional/mascot.py`):

1. one full vision pass with gradients over the real frames; its class-token attention (last layer,
   head mean, detached) ranks each frame's patches, so ranking costs no extra pass;
2. a high-informed and a low-informed masked view, each one more vision pass over the *kept*
   patches only (cost ≈ (1 - mask_ratio) of a full pass or less);
3. loss = InfoNCE(full) + masked_nce_weight · Σ_views InfoNCE(view)
          + completion_weight · Σ_views w_view · L_isc(view) + colearn_weight · L_co.

Inference is CLIP4Clip meanP on the unmasked frames: no masking, no predictor, one pass.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tvr_bench.functional.losses import symmetric_infonce
from tvr_bench.functional.mascot import (
    ATTENTION_SOURCES,
    COMPLETION_DISTANCES,
    INFORMED,
    CompletionPredictor,
    gather_patches,
    informed_mask,
    mutual_colearning_loss,
    num_masked,
    random_patch_scores,
    semantic_completion_loss,
    text_patch_scores,
)
from tvr_bench.functional.pooling import mean_pool_normalised
from tvr_bench.methods.base import Features, RetrievalModule

COMPLETION_LEVELS = ("patch", "frame")
COLEARN_MODES = ("mutual", "full")


class MASCOT(RetrievalModule):
    """Attention-based masking, informed semantics completion and dual-mask co-learning around meanP.

    Every switch is a constructor argument so that the paper's ablations can be rerun:

    * `use_high_mask` / `use_low_mask`: build the high-informed (hide the most attended patches) and
      the low-informed (hide the least attended) masked views;
    * `mask_ratio`: fraction of each frame's patches a mask hides;
    * `attention_source`: `cls` (visual encoder's class-token attention), `text` (cosine of patch
      features with the paired caption) or `random` (random masking, the baseline);
    * `masked_nce_weight`: weight of each masked view's own InfoNCE;
    * `completion_weight` (λ) with per-view weights `completion_high_weight` / `completion_low_weight`
      (0 = background is not reconstructed), `completion_level` (`patch`: a predictor recovers the
      hidden patches; `frame`: the masked view's class token recovers the full view's),
      `completion_distance`, `completion_text_weight` (patch-text alignment term),
      `completion_text_context` (the predictor also attends to the caption's tokens), `predictor_depth`;
    * `colearn_weight` and `colearn_mode` (`mutual`: high ↔ low views; `full`: each masked view ↔ full view).
    """

    REFERENCE_OPTIMIZER = "bertadam"  # no MASCOT code: CLIP4Clip's BertAdam, the base it builds on (docs/methods/mascot.md, Optimiser)
    SEARCH_SCORING = "two_tower"  # inference is CLIP4Clip meanP: similarity = text embeds @ video embeds

    def __init__(
        self,
        *args: Any,
        use_high_mask: bool = True,
        use_low_mask: bool = True,
        mask_ratio: float = 0.5,
        attention_source: str = "cls",
        masked_nce_weight: float = 1.0,
        completion_weight: float = 1.0,
        completion_high_weight: float = 1.0,
        completion_low_weight: float = 0.0,
        completion_level: str = "patch",
        completion_distance: str = "cosine",
        completion_text_weight: float = 1.0,
        completion_text_context: bool = True,
        predictor_depth: int = 1,
        colearn_weight: float = 1.0,
        colearn_mode: str = "mutual",
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        if attention_source not in ATTENTION_SOURCES:
            raise ValueError(f"attention_source must be one of {ATTENTION_SOURCES}, got {attention_source!r}")
        if completion_level not in COMPLETION_LEVELS:
            raise ValueError(f"completion_level must be one of {COMPLETION_LEVELS}, got {completion_level!r}")
        if completion_distance not in COMPLETION_DISTANCES:
            raise ValueError(f"completion_distance must be one of {COMPLETION_DISTANCES}, got {completion_distance!r}")
        if colearn_mode not in COLEARN_MODES:
            raise ValueError(f"colearn_mode must be one of {COLEARN_MODES}, got {colearn_mode!r}")
        for name, value in (
            ("masked_nce_weight", masked_nce_weight),
            ("completion_weight", completion_weight),
            ("completion_high_weight", completion_high_weight),
            ("completion_low_weight", completion_low_weight),
            ("colearn_weight", colearn_weight),
        ):
            if value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}")
        num_masked(self.backbone.num_patches, mask_ratio)  # validates the ratio
        self.use_high_mask = use_high_mask
        self.use_low_mask = use_low_mask
        self.mask_ratio = mask_ratio
        self.attention_source = attention_source
        self.masked_nce_weight = masked_nce_weight
        self.completion_weight = completion_weight
        self.completion_view_weights = {"high": completion_high_weight, "low": completion_low_weight}
        self.completion_level = completion_level
        self.completion_distance = completion_distance
        self.completion_text_weight = completion_text_weight
        self.completion_text_context = completion_text_context
        self.colearn_weight = colearn_weight
        self.colearn_mode = colearn_mode
        needs_predictor = completion_level == "patch" and completion_weight > 0 and any(
            self.completion_view_weights[v] > 0 for v in self.active_views
        )
        self.predictor = (
            CompletionPredictor(self.backbone.embed_dim, self.backbone.num_patches, depth=predictor_depth)
            if needs_predictor
            else None
        )

    # ------------------------------------------------------------------ switches
    @property
    def method_name(self) -> str:
        """Short name of the method, used in logs and leaderboards."""
        return "mascot"

    @property
    def active_views(self) -> tuple[str, ...]:
        """Masked views built in training: a subset of ('high', 'low')."""
        return tuple(v for v, on in zip(INFORMED, (self.use_high_mask, self.use_low_mask)) if on)

    def completes(self, view: str) -> bool:
        """Whether the completion loss is computed for a masked view (its weight and λ are non-zero)."""
        return self.completion_weight > 0 and self.completion_view_weights[view] > 0

    # ------------------------------------------------------------------ inference features
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Features:
        """Normalised end-token embedding per caption."""
        embeds = self.backbone.encode_text(input_ids, attention_mask)["embeds"]
        return {"embeds": F.normalize(embeds, dim=-1)}

    def encode_video(self, frames: Tensor, frame_mask: Tensor) -> Features:
        """Normalised meanP embedding of the unmasked real frames (padded frames are never encoded)."""
        valid = frame_mask.bool()
        pixels, _ = _real_frames(frames, valid)
        return {"embeds": _pool(self.backbone.encode_frames(pixels), valid)}

    def similarity(self, text: Features, video: Features) -> Tensor:
        """Cosine similarity of the text and video embeddings (plain dual encoder, as CLIP4Clip)."""
        return text["embeds"] @ video["embeds"].t()

    def pair_cost_bytes(self, text: Features, video: Features) -> int:
        """One float per pair."""
        return 4

    # ------------------------------------------------------------------ training views
    def patch_scores(self, full: dict[str, Tensor], text_embeds: Tensor) -> Tensor:
        """Per-frame patch ranking scores [N, P] (no gradient) from the full pass, by `attention_source`."""
        with torch.no_grad():
            if self.attention_source == "cls":
                return full["cls_attention"].detach()
            if self.attention_source == "text":
                return text_patch_scores(full["patches"].detach(), text_embeds.detach())
            n, p = full["patches"].shape[:2]
            return random_patch_scores(n, p, device=full["patches"].device)

    def training_views(
        self,
        frames: Tensor,
        frame_mask: Tensor,
        text_embeds: Tensor,
        text_tokens: Tensor | None = None,
        token_mask: Tensor | None = None,
    ) -> Features:
        """Training features of a local batch (text i pairs with video i).

        Returns `embeds` (full view), `embeds_high` / `embeds_low` (masked views, when enabled) [B, D]
        and `completion_high` / `completion_low` [B] (completion loss averaged over each video's real
        frames, when computed). `text_tokens` / `token_mask` feed the predictor's text context.
        """
        valid = frame_mask.bool()
        pixels, owner = _real_frames(frames, valid)
        views = self.active_views
        full = self.backbone.encode_patches(pixels, output_attentions=bool(views) and self.attention_source == "cls")
        out: Features = {"embeds": _pool(full["cls"], valid)}
        if not views:
            return out
        scores = self.patch_scores(full, text_embeds[owner])
        frames_per_video = valid.sum(1).clamp_min(1).to(full["cls"].dtype)
        for view_name in views:
            keep, hidden = informed_mask(scores, self.mask_ratio, view_name)
            view = self.backbone.encode_patches(pixels, keep_index=keep)
            out[f"embeds_{view_name}"] = _pool(view["cls"], valid)
            if self.completes(view_name):
                per_frame = self._completion(full, view, keep, hidden, owner, text_embeds, text_tokens, token_mask)
                per_video = per_frame.new_zeros(valid.shape[0]).index_add(0, owner, per_frame)
                out[f"completion_{view_name}"] = per_video / frames_per_video
        return out

    def _completion(
        self,
        full: dict[str, Tensor],
        view: dict[str, Tensor],
        keep: Tensor,
        hidden: Tensor,
        owner: Tensor,
        text_embeds: Tensor,
        text_tokens: Tensor | None,
        token_mask: Tensor | None,
    ) -> Tensor:
        """Per-frame completion loss of one masked view against the full view (stop-gradient target)."""
        if self.completion_level == "frame":
            pred, target = view["cls"].unsqueeze(1), full["cls"].unsqueeze(1)
        else:
            assert self.predictor is not None
            context = text_tokens[owner] if self.completion_text_context and text_tokens is not None else None
            context_mask = token_mask[owner] if context is not None and token_mask is not None else None
            pred = self.predictor(view["cls"], view["patches"], keep, hidden, context, context_mask)
            target = gather_patches(full["patches"], hidden)
        text = text_embeds[owner] if self.completion_text_weight != 0 else None
        return semantic_completion_loss(
            pred, target.detach(), text, self.completion_text_weight, self.completion_distance
        )

    # ------------------------------------------------------------------ loss
    def training_loss(self, text: Features, video: Features) -> tuple[Tensor, dict[str, Tensor]]:
        """Full-view InfoNCE plus whichever masked-view, completion and co-learning terms `video` carries."""
        scale = self.backbone.logit_scale
        t = text["embeds"]
        sims = {"full": self.similarity(text, video)}
        parts: dict[str, Tensor] = {"nce_full": symmetric_infonce(sims["full"], scale)}
        loss = parts["nce_full"]
        for view_name in INFORMED:
            key = f"embeds_{view_name}"
            if key in video:
                sims[view_name] = t @ video[key].t()
                parts[f"nce_{view_name}"] = symmetric_infonce(sims[view_name], scale)
                loss = loss + self.masked_nce_weight * parts[f"nce_{view_name}"]
        completion = [
            self.completion_view_weights[v] * video[f"completion_{v}"].mean()
            for v in INFORMED
            if f"completion_{v}" in video
        ]
        if completion:
            parts["completion"] = torch.stack(completion).sum()
            loss = loss + self.completion_weight * parts["completion"]
        colearn = self._colearn(sims, scale.detach())
        if colearn is not None:
            parts["colearn"] = colearn
            loss = loss + self.colearn_weight * colearn
        return loss, {k: v.detach() for k, v in parts.items()}

    def _colearn(self, sims: dict[str, Tensor], scale: Tensor) -> Tensor | None:
        """Co-learning term over the views present, or None (weight 0, or fewer than two views)."""
        if self.colearn_weight == 0:
            return None
        if self.colearn_mode == "mutual":
            if "high" in sims and "low" in sims:
                return mutual_colearning_loss(sims["high"], sims["low"], scale)
            return None
        masked = [v for v in INFORMED if v in sims]
        if not masked:
            return None
        return torch.stack([mutual_colearning_loss(sims["full"], sims[v], scale) for v in masked]).mean()

    # ------------------------------------------------------------------ Lightning
    def training_features(self, batch: dict[str, Any]) -> tuple[Features, Features]:
        """Encode the text, then the full and masked views built with the paired captions.

        The views need the local text (text-guided ranking and the completion terms), so MASCOT
        builds its video features here; the gathering, checks and logging are the base's.
        """
        raw = self.backbone.encode_text(**self.tokenize(batch["captions"]))
        text = {"embeds": F.normalize(raw["embeds"], dim=-1)}
        video = self.training_views(
            batch["frames"], batch["frame_mask"], text["embeds"], raw["tokens"], raw["token_mask"]
        )
        return text, video


def _real_frames(frames: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Pixels of the real frames [N, 3, H, W] (row-major) and the video index of each [N]."""
    owner = valid.nonzero()[:, 0]
    if bool(valid.all()):
        return frames.flatten(0, 1), owner
    return frames[valid], owner


def _pool(per_frame: Tensor, valid: Tensor) -> Tensor:
    """Normalised meanP embedding [B, D] from the real frames' embeddings [N, D] and the frame mask [B, F]."""
    b, f = valid.shape
    if bool(valid.all()):
        grid = per_frame.view(b, f, -1)
    else:
        grid = per_frame.new_zeros(b, f, per_frame.shape[-1]).index_put(tuple(valid.nonzero().t()), per_frame)
    return F.normalize(mean_pool_normalised(grid, valid), dim=-1)
