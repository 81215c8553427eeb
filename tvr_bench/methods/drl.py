"""DRL (Wang et al. 2022): weighted token-wise interaction + channel decorrelation regulariser."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tvr_bench.functional.drl import (
    CDCR_MODES,
    INTERACTIONS,
    dp_similarity,
    drl_training_terms,
    token_weights,
    uniform_weights,
    weight_mlp,
    wti_pair_bytes,
    wti_similarity_blocked,
)
from tvr_bench.functional.losses import symmetric_infonce
from tvr_bench.functional.temporal import temporal_for_backbone
from tvr_bench.methods.base import Features, RetrievalModule

TEMPORAL = ("seqTransf", "meanP")


class DRL(RetrievalModule):
    """Token-wise text-video score (WTI, TI or dp) over seqTransf frames, InfoNCE + λ·CDCR."""

    REFERENCE_OPTIMIZER = "bertadam"  # `optimizer: reference`: DRL tvr/models/optimization.py BertAdam (docs/methods/drl.md, Optimiser)

    def __init__(
        self,
        *args,
        interaction: str = "wti",
        cdcr: int = 3,
        cdcr_alpha1: float = 0.11,
        cdcr_alpha2: float = 0.0,
        cdcr_lambda: float = 0.001,
        cdcr_seed: int = 0,
        temporal: str = "seqTransf",
        temporal_layers: int = 4,
        temporal_heads: int | None = None,
        temporal_init_from_clip: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if interaction not in INTERACTIONS:
            raise ValueError(f"unknown DRL interaction {interaction!r}; choose one of {INTERACTIONS}")
        if cdcr not in CDCR_MODES:
            raise ValueError(f"cdcr must be one of {CDCR_MODES}, got {cdcr}")
        if temporal not in TEMPORAL:
            raise ValueError(f"unknown temporal module {temporal!r}; choose one of {TEMPORAL}")
        self.interaction, self.cdcr = interaction, cdcr
        self.cdcr_alpha1, self.cdcr_alpha2, self.cdcr_lambda, self.cdcr_seed = cdcr_alpha1, cdcr_alpha2, cdcr_lambda, cdcr_seed
        width = self.backbone.embed_dim
        self.temporal = (
            temporal_for_backbone(self.backbone, temporal_layers, temporal_heads, temporal_init_from_clip)
            if temporal == "seqTransf"
            else None
        )
        if interaction == "wti":
            self.text_weight_fc = weight_mlp(width)
            self.video_weight_fc = weight_mlp(width)
            for mlp in (self.text_weight_fc, self.video_weight_fc):
                for layer in mlp:
                    if isinstance(layer, nn.Linear):
                        nn.init.normal_(layer.weight, std=0.02)
                        nn.init.zeros_(layer.bias)

    @property
    def method_name(self) -> str:
        """`drl` for the paper's setting (WTI + CDCR + seqTransf); ablations get suffixes, e.g. `drl_ti_nocdcr`."""
        name = "drl" if self.interaction == "wti" else f"drl_{self.interaction}"
        if self.cdcr == 0:
            name += "_nocdcr"
        if self.temporal is None:
            name += "_meanP"
        return name

    # ------------------------------------------------------------------ features
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Features:
        """All projected token states with their mask, plus WTI token weights (computed once per text)."""
        out = self.backbone.encode_text(input_ids, attention_mask)
        feats = {"tokens": out["tokens"], "token_mask": out["token_mask"]}
        if self.interaction == "wti":
            feats["token_weights"] = token_weights(out["tokens"], out["token_mask"], self.text_weight_fc)
        return feats

    def encode_video(self, frames: Tensor, frame_mask: Tensor) -> Features:
        """Per-frame CLIP embeddings through the temporal module, mask, and WTI frame weights."""
        mask = frame_mask.bool()
        per_frame = self.encode_frames(frames)
        if self.temporal is not None:
            per_frame = self.temporal(per_frame, mask)
        feats = {"frames": per_frame, "frame_mask": mask}
        if self.interaction == "wti":
            feats["frame_weights"] = token_weights(per_frame, mask, self.video_weight_fc)
        return feats

    def _weights(self, text: Features, video: Features) -> tuple[Tensor, Tensor]:
        if self.interaction == "wti":
            return text["token_weights"], video["frame_weights"]
        return uniform_weights(text["token_mask"], text["tokens"].dtype), uniform_weights(video["frame_mask"], video["frames"].dtype)

    # ------------------------------------------------------------------ scores
    def similarity(self, text: Features, video: Features) -> Tensor:
        """Unscaled DRL score of any text slice x video slice, computed in memory-bounded chunks."""
        if self.interaction == "dp":
            return dp_similarity(text["tokens"], text["token_mask"], video["frames"], video["frame_mask"])
        tw, vw = self._weights(text, video)
        return wti_similarity_blocked(
            text["tokens"], tw, text["token_mask"],
            video["frames"], vw, video["frame_mask"],
            max_bytes=int(self.hparams.eval_memory_mb * 2**20),
        )

    def pair_cost_bytes(self, text: Features, video: Features) -> int:
        """Token-wise: one L x F cosine block (plus its two maxima) per pair; dp: one float."""
        if self.interaction == "dp":
            return 4
        return wti_pair_bytes(text["tokens"].shape[1], video["frames"].shape[1], text["tokens"].element_size())

    def training_loss(self, text: Features, video: Features) -> tuple[Tensor, dict[str, Tensor]]:
        """Symmetric InfoNCE on exp(logit_scale)·s over the global batch plus λ·CDCR on its paired items."""
        generator = None
        if self.cdcr == 1 and self.interaction != "dp":
            # same draw on every rank, new each step, reproducible from the seed
            device = text["tokens"].device
            generator = torch.Generator(device=device)
            generator.manual_seed(self.cdcr_seed * 1_000_003 + int(self.global_step))
        tw, vw = (text["token_weights"], video["frame_weights"]) if self.interaction == "wti" else (None, None)
        sims, reg = drl_training_terms(
            text["tokens"], text["token_mask"], video["frames"], video["frame_mask"],
            self.interaction, self.cdcr, self.cdcr_alpha1, self.cdcr_alpha2, tw, vw, generator,
        )
        contrastive = symmetric_infonce(sims, self.backbone.logit_scale)
        loss = contrastive + self.cdcr_lambda * reg
        return loss, {"infonce": contrastive.detach(), "cdcr": reg.detach()}
