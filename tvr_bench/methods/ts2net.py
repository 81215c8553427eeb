"""TS2-Net (Liu et al., ECCV 2022): token shift in the last visual blocks, top-k token selection (card: docs/methods/ts2net.md).

The math is in `tvr_bench/functional/ts2net.py`; the backbone change goes through the CLIP wrapper's
`wrap_visual_blocks` hook (the self-attention input of the chosen blocks is token-shifted), the patch tokens come
from `encode_patches`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tvr_bench.backbones.clip import VisualBlockWrapper
from tvr_bench.functional.losses import symmetric_infonce
from tvr_bench.functional.temporal import temporal_for_backbone
from tvr_bench.functional.ts2net import (
    PERTURBED_SAMPLES,
    PERTURBED_SIGMA,
    SHIFT_DIV,
    TokenScorer,
    class_positions,
    frame_weighted_similarity,
    frame_weighted_similarity_blocked,
    hard_topk,
    item_noise,
    item_seed,
    pair_bytes,
    perturbed_topk,
    reference_token_mask,
    select_tokens,
    token_mask,
    token_shift,
)
from tvr_bench.methods.base import Features, RetrievalModule

#: `eval_selection`: the noise-free top-k at test time (default) or the reference's perturbed one.
EVAL_SELECTIONS = ("hard", "perturbed")
#: `mask_layout`: each frame's mask over its own tokens (default) or the reference's tiled layout.
MASK_LAYOUTS = ("per_frame", "reference")


class TokenShift(VisualBlockWrapper):
    """Token-shifts the input of a wrapped visual sub-module across the frames of each video (`token_shift`)."""

    def __init__(self, inner: nn.Module, n_div: int = SHIFT_DIV):
        super().__init__(inner)
        self.n_div = n_div
        #: frames per video of the images in the current call; set by TS2Net.encode_video before each forward
        self.frames = 1

    def transform(self, hidden: Tensor) -> Tensor:
        """Shifted hidden states [B * F, L, W]."""
        return token_shift(hidden, self.frames, self.n_div)


class TS2Net(RetrievalModule):
    """Frame-weighted cosine of the text with frames built from the class token and k selected patch tokens.

    Per frame the class token and `topk` patch tokens, chosen by a learned score through the perturbed top-k
    (training; at test time `eval_selection`), pass with all frames' tokens through the seqTransf temporal module;
    its class-token outputs are the frames that the text scores. `shift_layers` are the visual blocks whose
    attention input is token-shifted (default the last two: blocks 10 and 11 of ViT-B/32, as the reference).

    Random draws come from per-video seeds (`noise_seed`, the training step, the video key), so a video's selection
    never depends on the other videos of its batch, the batch size or the number of processes.
    """

    DATA_PROTOCOL = {"sampling": "fps1_uniform", "train_stream": "pairs", "augment": "none", "last_batch": "drop"}  # docs/methods/ts2net.md, 'Reproducing the paper'
    REFERENCE_OPTIMIZER = "bertadam"  # `optimizer: reference`: ts2_net modules/optimization.py BertAdam (docs/methods/ts2net.md, Optimiser)
    SCORING_OPTIONS: ClassVar[dict[str, tuple[Any, ...]]] = {"eval_selection": EVAL_SELECTIONS, "mask_layout": MASK_LAYOUTS}

    def __init__(
        self,
        *args,
        shift_layers: Sequence[int] = (-2, -1),
        shift_div: int = SHIFT_DIV,
        topk: int = 3,
        perturbed_samples: int = PERTURBED_SAMPLES,
        perturbed_sigma: float = PERTURBED_SIGMA,
        temporal_layers: int = 4,
        temporal_heads: int | None = None,
        eval_selection: str = "hard",
        mask_layout: str = "per_frame",
        noise_seed: int = 0,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if eval_selection not in EVAL_SELECTIONS:
            raise ValueError(f"eval_selection must be one of {EVAL_SELECTIONS}, got {eval_selection!r}")
        if mask_layout not in MASK_LAYOUTS:
            raise ValueError(f"mask_layout must be one of {MASK_LAYOUTS}, got {mask_layout!r}")
        patches = self.backbone.num_patches
        if not 0 < topk <= patches:
            raise ValueError(f"topk must be in 1..{patches} (patches per frame of {self.backbone.name!r}), got {topk}")
        if perturbed_samples < 1 or perturbed_sigma <= 0:
            raise ValueError(f"the perturbed top-k needs samples >= 1 and sigma > 0, got {perturbed_samples}, {perturbed_sigma}")
        self.topk, self.samples, self.sigma = topk, perturbed_samples, perturbed_sigma
        self.eval_selection, self.mask_layout, self.noise_seed = eval_selection, mask_layout, noise_seed
        # a plain list: the wrappers are registered once, inside the backbone (no duplicate state-dict entries)
        self.shifts: list[TokenShift] = self.backbone.wrap_visual_blocks(
            list(shift_layers), lambda inner: TokenShift(inner, shift_div), part="self_attn"
        )
        self.token_scorer = TokenScorer(self.backbone.embed_dim)
        self.temporal = temporal_for_backbone(self.backbone, temporal_layers, temporal_heads)
        self._eval_keys: list[str] | None = None

    @property
    def tokens_per_frame(self) -> int:
        """Tokens each frame keeps: its class token and `topk` patches."""
        return 1 + self.topk

    # ------------------------------------------------------------------ features
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Features:
        """Normalised end-token embedding per caption."""
        embeds = self.backbone.encode_text(input_ids, attention_mask)["embeds"]
        return {"embeds": F.normalize(embeds, dim=-1)}

    def visual_tokens(self, frames: Tensor) -> Tensor:
        """Projected class and patch tokens [B * F, 1 + P, D] of frames [B, F, 3, H, W], token shift inside."""
        if frames.ndim != 5:
            raise ValueError(
                "TS2-Net changes the visual encoder (token shift) and selects patch tokens: it needs pixels "
                f"[B, F, 3, H, W], got a {frames.ndim}-D input (cached CLIP features cannot be used)"
            )
        for shift in self.shifts:
            shift.frames = frames.shape[1]
        out = self.backbone.encode_patches(frames.flatten(0, 1))
        return torch.cat([out["cls"].unsqueeze(1), out["patches"]], dim=1)

    def selection_noise(self, n_videos: int, frames: int, video_keys: Sequence[str] | None, device: torch.device) -> Tensor:
        """N(0, 1) perturbations [n_videos * frames, samples, patches]: per video from (noise_seed, stage, key), or
        from torch's global generator when no keys are given."""
        patches = self.backbone.num_patches
        if video_keys is None:
            return torch.randn(n_videos * frames, self.samples, patches, device=device)
        if len(video_keys) != n_videos:
            raise ValueError(f"{len(video_keys)} video keys for {n_videos} videos")
        stage = ("train", int(self.global_step)) if self.training else ("eval",)
        seeds = [item_seed(self.noise_seed, *stage, key) for key in video_keys]
        return item_noise(seeds, frames, self.samples, patches, device=device)

    def select(self, tokens: Tensor, n_videos: int, noise: Tensor | None = None,
               video_keys: Sequence[str] | None = None) -> Tensor:  # fmt: skip
        """Class token + `topk` selected patches per frame: tokens [B * F, 1 + P, D] -> [B, F * (1 + k), D].

        Training (and `eval_selection: perturbed`): the perturbed top-k under `noise` (drawn by `selection_noise`
        when None); otherwise the hard top-k of the scores.
        """
        scores = self.token_scorer(tokens)[:, 1:]
        frames = tokens.shape[0] // n_videos
        if self.training or self.eval_selection == "perturbed":
            if noise is None:
                noise = self.selection_noise(n_videos, frames, video_keys, tokens.device)
            indicator = perturbed_topk(scores, self.topk, noise, self.sigma)
        else:
            indicator = hard_topk(scores, self.topk)
        return select_tokens(tokens, indicator).reshape(n_videos, frames * self.tokens_per_frame, -1)

    def aggregate(self, selected: Tensor, frame_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The temporal transformer over all selected tokens; the class-token outputs [B, F, D] and their mask."""
        per = self.tokens_per_frame
        n_tokens = selected.shape[1]
        if n_tokens > self.temporal.max_positions:
            raise ValueError(
                f"TS2-Net's temporal transformer sees frames x {per} tokens = {n_tokens}, more than its "
                f"{self.temporal.max_positions} position embeddings (the reference's nn.Embedding(77), modeling.py "
                f"L244/L253): use at most {self.temporal.max_positions // per} frames"
            )
        layout = reference_token_mask if self.mask_layout == "reference" else token_mask
        mask = layout(frame_mask.bool(), per)
        out = self.temporal(selected, mask)
        return class_positions(out, per), class_positions(mask, per)

    def encode_video(self, frames: Tensor, frame_mask: Tensor, video_keys: Sequence[str] | None = None) -> Features:
        """Frame features [B, F, D] (class-token outputs of the temporal module over the selected tokens) and mask."""
        keys = video_keys if video_keys is not None else self._eval_keys
        selected = self.select(self.visual_tokens(frames), frames.shape[0], video_keys=keys)
        out, mask = self.aggregate(selected, frame_mask)
        return {"frames": out, "frame_mask": mask}

    def training_features(self, batch: dict[str, Any]) -> tuple[Features, Features]:
        """Text and video features of a training batch; the selection noise of each video comes from its key."""
        text = self.encode_batch_text(batch)
        return text, self.encode_video(batch["frames"], batch["frame_mask"], video_keys=batch.get("video_key"))

    def _eval_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The base evaluation step, with the batch's video keys at hand for per-video draws."""
        self._eval_keys = list(batch["video_key"]) if batch.get("video_key") is not None else None
        try:
            return super()._eval_step(batch)
        finally:
            self._eval_keys = None

    # ------------------------------------------------------------------ scores
    def similarity(self, text: Features, video: Features) -> Tensor:
        """Unscaled frame-weighted cosine [n_text, n_video] of any text slice x video slice (memory-bounded chunks)."""
        return frame_weighted_similarity_blocked(
            text["embeds"], video["frames"], video["frame_mask"], max_bytes=int(self.hparams.eval_memory_mb * 2**20)
        )

    def pair_cost_bytes(self, text: Features, video: Features) -> int:
        """The [frames] cosines, weights and their product plus the score, per pair."""
        return pair_bytes(video["frames"].shape[1], video["frames"].element_size())

    def training_loss(self, text: Features, video: Features) -> tuple[Tensor, dict[str, Tensor]]:
        """Symmetric InfoNCE on exp(logit_scale) * score over the global batch (the reference's CrossEn both ways)."""
        sims = frame_weighted_similarity(text["embeds"], video["frames"], video["frame_mask"])
        return symmetric_infonce(sims, self.backbone.logit_scale), {}
