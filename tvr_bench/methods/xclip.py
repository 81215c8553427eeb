"""X-CLIP (Ma et al., ACM MM 2022): multi-grained contrast with attention over similarity matrices (method card:
docs/methods/xclip.md)."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from tvr_bench.functional.losses import symmetric_infonce
from tvr_bench.functional.xclip import (
    PADDINGS,
    AOSMWeights,
    normalise,
    video_level,
    xclip_pair_bytes,
    xclip_similarity,
    xclip_similarity_blocked,
)
from tvr_bench.functional.temporal import temporal_for_backbone
from tvr_bench.methods.base import Features, RetrievalModule

TEMPORAL = ("seqTransf", "meanP")


class XCLIP(RetrievalModule):
    """Mean of video-sentence, video-word, sentence-frame and frame-word scores, each reduced by AOSM.

    The video-level feature comes from the seqTransf frames, the frame-level features from the raw CLIP frames
    (the reference's `use_original_clip_for_frame_features = True`). `padding='masked'` (default, the paper)
    keeps padded words and frames out of every term; `padding='reference'` reproduces the reference code, which
    never uses the text mask and lets padded frames into the sentence-frame and frame-word terms.
    `num_frames` and `max_words` fix the sizes of the position matrices: the data must give that many frame
    slots, and captions are padded to `max_words` tokens (at most CLIP's 77).
    """

    REFERENCE_OPTIMIZER = "bertadam"  # `optimizer: reference`: X-CLIP modules/optimization.py BertAdam (docs/methods/xclip.md, Optimiser)
    #: CLIP4Clip's data protocol (X-CLIP's loaders are CLIP4Clip's; `drop_last=True`: dataloaders/data_dataloaders.py
    #: L32, L79, L127, L175, L223): docs/methods/xclip.md, 'Reproducing the paper'
    DATA_PROTOCOL = {"sampling": "fps1_uniform", "train_stream": "pairs", "augment": "none", "last_batch": "drop"}
    #: init args that change the test-time scores, with the values a scoring audit must try (the default first)
    SCORING_OPTIONS: ClassVar[dict[str, tuple[Any, ...]]] = {"padding": PADDINGS}

    def __init__(
        self,
        *args,
        num_frames: int = 12,
        padding: str = "masked",
        temporal: str = "seqTransf",
        temporal_layers: int = 4,
        temporal_heads: int | None = None,
        temporal_init_from_clip: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if padding not in PADDINGS:
            raise ValueError(f"unknown X-CLIP padding {padding!r}; choose one of {PADDINGS}")
        if temporal not in TEMPORAL:
            raise ValueError(f"unknown temporal module {temporal!r}; choose one of {TEMPORAL}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be positive, got {num_frames}")
        self.padding = padding
        positions = int(self.backbone.clip.config.text_config.max_position_embeddings)
        words = min(int(self.hparams.max_words), positions)  # the tokenizer pads every caption to this many tokens
        self.aosm = AOSMWeights(self.backbone.embed_dim, words, num_frames)
        self.temporal = (
            temporal_for_backbone(self.backbone, temporal_layers, temporal_heads, temporal_init_from_clip)
            if temporal == "seqTransf"
            else None
        )

    @property
    def method_name(self) -> str:
        """'xclip' (seqTransf, the paper's setting), 'xclip_meanP' without the temporal module."""
        return "xclip" if self.temporal is not None else "xclip_meanP"

    # ------------------------------------------------------------------ features
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Features:
        """Unit-length sentence (EOT) feature, unit-length states of every token position and the token mask."""
        out = self.backbone.encode_text(input_ids, attention_mask)
        self.aosm.check(n_words=out["tokens"].shape[1])
        return {"sentence": normalise(out["embeds"]), "words": normalise(out["tokens"]), "word_mask": out["token_mask"].bool()}

    def encode_video(self, frames: Tensor, frame_mask: Tensor) -> Features:
        """Video-level feature (seqTransf frames, masked mean) and unit-length raw frame features with their mask."""
        mask = frame_mask.bool()
        raw = self.encode_frames(frames)
        self.aosm.check(n_frames=raw.shape[1])
        contextual = raw if self.temporal is None else self.temporal(raw, mask)
        return {"video": video_level(contextual, mask), "frames": normalise(raw), "frame_mask": mask}

    def _inputs(self, text: Features, video: Features) -> tuple[Tensor, ...]:
        return (text["sentence"], text["words"], text["word_mask"], video["video"], video["frames"], video["frame_mask"])

    def search_vectors(self, feats: Features, side: str) -> Tensor:
        """The search index's first stage (`SEARCH_SCORING = "rerank"`): the unit sentence feature of a text and the
        unit video-level feature of a video, whose inner product is the video-sentence term at G = I; the full
        four-term score reranks the candidates (docs/search.md)."""
        if side not in ("text", "video"):
            raise ValueError(f"side must be 'text' or 'video', got {side!r}")
        return (feats["sentence"] if side == "text" else feats["video"]).float()

    # ------------------------------------------------------------------ scores
    def similarity(self, text: Features, video: Features) -> Tensor:
        """Unscaled X-CLIP score of any text slice x video slice, in memory-bounded steps."""
        return xclip_similarity_blocked(
            *self._inputs(text, video), self.aosm, self.padding, max_bytes=int(self.hparams.eval_memory_mb * 2**20)
        )

    def pair_cost_bytes(self, text: Features, video: Features) -> int:
        """The word-frame block of a pair and its AOSM working copies, plus the cross-grained vectors."""
        return xclip_pair_bytes(text["words"].shape[1], video["frames"].shape[1], text["words"].element_size())

    def training_loss(self, text: Features, video: Features) -> tuple[Tensor, dict[str, Tensor]]:
        """Symmetric InfoNCE on exp(logit_scale) * score over the global batch (modeling_xclip.py L163-170)."""
        sims = xclip_similarity(*self._inputs(text, video), self.aosm, self.padding)
        return symmetric_infonce(sims, self.backbone.logit_scale), {}
