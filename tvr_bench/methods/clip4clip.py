"""CLIP4Clip (Luo et al. 2022): the parameter-free meanP baseline and the seqTransf head."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from tvr_bench.functional.losses import symmetric_infonce
from tvr_bench.functional.pooling import mean_pool_normalised
from tvr_bench.functional.temporal import temporal_for_backbone
from tvr_bench.methods.base import Features, RetrievalModule


class CLIP4Clip(RetrievalModule):
    """Cosine of the text embedding with the masked mean of normalised frame embeddings."""

    REFERENCE_OPTIMIZER = "bertadam"  # `optimizer: reference`: CLIP4Clip modules/optimization.py BertAdam (docs/methods/clip4clip.md, Optimiser)
    SEARCH_SCORING = "two_tower"  # similarity = text embeds @ video embeds (meanP and seqTransf: the frame transformer sees only the video)

    def __init__(self, *args, head: str = "meanP", temporal_layers: int = 4, **kwargs):
        super().__init__(*args, **kwargs)
        if head not in {"meanP", "seqTransf"}:
            raise ValueError(f"unknown CLIP4Clip head {head!r}; choose 'meanP' or 'seqTransf'")
        self.head = head
        # seqTransf: frame transformer initialised from CLIP's text layers 0..temporal_layers-1
        self.temporal = temporal_for_backbone(self.backbone, temporal_layers) if head == "seqTransf" else None

    @property
    def method_name(self) -> str:
        """Short name of the method, used in logs and leaderboards."""
        return "clip4clip" if self.head == "meanP" else f"clip4clip_{self.head.lower()}"

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Features:
        """Normalised end-token embedding per caption."""
        embeds = self.backbone.encode_text(input_ids, attention_mask)["embeds"]
        return {"embeds": F.normalize(embeds, dim=-1)}

    def aggregate_frames(self, frames: Tensor, frame_mask: Tensor) -> Tensor:
        """Temporal aggregation before pooling (identity for meanP, the frame transformer for seqTransf)."""
        return frames if self.temporal is None else self.temporal(frames, frame_mask.bool())

    def encode_video(self, frames: Tensor, frame_mask: Tensor) -> Features:
        """Normalised masked mean of normalised frame embeddings per video."""
        per_frame = self.aggregate_frames(self.encode_frames(frames), frame_mask)
        return {"embeds": F.normalize(mean_pool_normalised(per_frame, frame_mask), dim=-1)}

    def similarity(self, text: Features, video: Features) -> Tensor:
        """Cosine similarity (the reference also multiplies by the temperature; ranks are unchanged)."""
        return text["embeds"] @ video["embeds"].t()

    def training_loss(self, text: Features, video: Features) -> tuple[Tensor, dict[str, Tensor]]:
        """Symmetric InfoNCE over the in-batch (globally gathered) pairs."""
        return symmetric_infonce(self.similarity(text, video), self.backbone.logit_scale), {}

    def pair_cost_bytes(self, text: Features, video: Features) -> int:
        """One float per pair."""
        return 4
