"""X-Pool (Gorti et al., CVPR 2022): text-conditioned attention pooling of the frames (method card: docs/methods/xpool.md)."""

from __future__ import annotations

from torch import Tensor

from tvr_bench.functional.losses import symmetric_infonce
from tvr_bench.functional.xpool import (
    POOLINGS,
    TextConditionedPool,
    baseline_similarity,
    cosine,
    fast_pair_bytes,
    xpool_similarity_fast,
    xpool_similarity_reference,
)
from tvr_bench.methods.base import Features, RetrievalModule


class XPool(RetrievalModule):
    """cos(t, z_{v|t}) with z the frames pooled by cross-attention from the raw text embedding t.

    `pooling` selects the paper's method ('transformer') or one of its ablations ('mean', 'topk',
    'attention' = softmax over text-frame cosines with `attention_temperature`). Evaluation uses the
    exact folded scorer (`fast_eval`); the reference math (materialising z) is used in training mode.
    """

    DATA_PROTOCOL = {"sampling": "segment_middle", "train_stream": "pairs", "augment": "clip_train", "last_batch": "keep"}  # docs/methods/xpool.md, 'Reproducing the paper'
    REFERENCE_OPTIMIZER = "legacy_adamw"  # `optimizer: reference`: X-Pool modules/optimization.py AdamW (docs/methods/xpool.md, Optimiser)

    def __init__(
        self,
        *args,
        heads: int = 1,
        dropout: float = 0.3,
        pooling: str = "transformer",
        topk: int = 3,
        attention_temperature: float = 0.01,
        fast_eval: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if pooling not in POOLINGS:
            raise ValueError(f"unknown X-Pool pooling {pooling!r}; choose one of {POOLINGS}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.pooling, self.topk, self.attention_temperature, self.fast_eval = pooling, topk, attention_temperature, fast_eval
        self.pool = TextConditionedPool(self.backbone.embed_dim, heads, dropout) if pooling == "transformer" else None

    @property
    def method_name(self) -> str:
        """'xpool', or 'xpool_<pooling>' for an ablation pooling."""
        return "xpool" if self.pooling == "transformer" else f"xpool_{self.pooling}"

    # ------------------------------------------------------------------ features
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Features:
        """The raw (un-normalised) projected end-token embedding, as HF `get_text_features`."""
        return {"embeds": self.backbone.encode_text(input_ids, attention_mask)["embeds"]}

    def encode_video(self, frames: Tensor, frame_mask: Tensor) -> Features:
        """Raw per-frame CLIP embeddings [B, F, D] and the frame mask."""
        return {"frames": self.encode_frames(frames), "frame_mask": frame_mask.bool()}

    # ------------------------------------------------------------------ scores
    def similarity(self, text: Features, video: Features) -> Tensor:
        """cos(t, z_{v|t}) [n_text, n_video] for any slice of texts and videos."""
        t, f, m = text["embeds"], video["frames"], video["frame_mask"]
        if self.pool is None:
            return baseline_similarity(self.pooling, t, f, m, self.topk, self.attention_temperature)
        if self.fast_eval and not (self.pool.training and self.pool.dropout.p > 0):
            return xpool_similarity_fast(self.pool, t, f, m, max_bytes=int(self.hparams.eval_memory_mb * 2**20))
        return xpool_similarity_reference(self.pool, t, f, m)

    def pair_cost_bytes(self, text: Features, video: Features) -> int:
        """Folded scorer: a few K = heads x frames vectors per pair; reference math: a few D-vectors."""
        frames, dim = video["frames"].shape[1], video["frames"].shape[2]
        if self.pool is None:
            return 4 * 4 * frames
        if self.fast_eval:
            return fast_pair_bytes(self.pool.heads, frames)
        return 4 * 6 * dim

    def training_loss(self, text: Features, video: Features) -> tuple[Tensor, dict[str, Tensor]]:
        """Symmetric InfoNCE on S[i, j] = cos(t_i, z_{v_j|t_i}) over the global batch (reference math, with dropout)."""
        t, f, m = text["embeds"], video["frames"], video["frame_mask"]
        if self.pool is None:
            sims = baseline_similarity(self.pooling, t, f, m, self.topk, self.attention_temperature)
        else:
            sims = cosine(t.unsqueeze(1), self.pool(t, f, m))
        return symmetric_infonce(sims, self.backbone.logit_scale), {}
