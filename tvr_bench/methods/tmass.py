"""T-MASS (Wang et al., CVPR 2024): stochastic text embeddings on X-Pool (method card: docs/methods/tmass.md)."""

from __future__ import annotations

import torch
from torch import Tensor

from tvr_bench.functional.tmass import (
    EPS_MODES,
    PAIRINGS,
    PRIORS,
    RadiusHead,
    counter_prior,
    sample_prior,
    tmass_pair_bytes,
    tmass_similarity,
    tmass_similarity_reference,
    tmass_training_loss,
)
from tvr_bench.functional.xpool import TextConditionedPool
from tvr_bench.methods.base import Features, RetrievalModule


class TMASS(RetrievalModule):
    """X-Pool pooling + radius R = exp(W s + b), t_s = t + eps ⊙ R, support-text loss, best-of-M inference.

    Evaluation draws `trials` samples per (text, video) from a counter hash of `eval_seed` and the
    global text index (`eps_mode='text'`: the same M draws for every video of a text) or text and video
    index (`eps_mode='pair'`: independent draws per pair, as the reference; M·D numbers per pair).
    `pairing='query'` (default) conditions every candidate on the query text;
    `pairing='reference'` reproduces the reference code (the paper's numbers), which scores the selected
    sample against the candidate video pooled with its own caption at the query's caption position (NaN
    where the candidate has fewer captions; at most `max_captions` captions per video in this mode). The
    two differ on negatives even with one caption per video (docs/methods/tmass.md, 'Scoring protocol').
    """

    DATA_PROTOCOL = {"sampling": "segment_middle", "train_stream": "pairs", "augment": "clip_train", "last_batch": "keep"}  # docs/methods/tmass.md, 'Reproducing the paper'
    REFERENCE_OPTIMIZER = "legacy_adamw"  # `optimizer: reference`: T-MASS modules/optimization.py AdamW (docs/methods/tmass.md, Optimiser)
    #: audited by tvr_bench/audit.py; `pairing: reference` is the paper's scoring (docs/methods/tmass.md, "Scoring protocol")
    SCORING_OPTIONS = {"pairing": ("query", "reference"), "eps_mode": ("text", "pair")}

    def __init__(
        self,
        *args,
        heads: int = 1,
        dropout: float = 0.3,
        num_frames: int = 12,
        prior: str = "uniform01",
        prior_std: float = 1.0,
        support_weight: float = 0.0,
        trials: int = 20,
        eval_seed: int = 0,
        eps_mode: str = "text",
        pairing: str = "query",
        max_captions: int = 100,
        fast_eval: bool = True,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if prior not in PRIORS:
            raise ValueError(f"unknown T-MASS prior {prior!r}; choose one of {PRIORS}")
        if eps_mode not in EPS_MODES:
            raise ValueError(f"unknown eps_mode {eps_mode!r}; choose one of {EPS_MODES}")
        if pairing not in PAIRINGS:
            raise ValueError(f"unknown pairing {pairing!r}; choose one of {PAIRINGS}")
        if trials < 1 or num_frames < 1 or max_captions < 1:
            raise ValueError("trials, num_frames and max_captions must be positive")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.prior, self.prior_std, self.support_weight = prior, prior_std, support_weight
        self.trials, self.eval_seed, self.eps_mode, self.pairing = trials, eval_seed, eps_mode, pairing
        self.max_captions, self.fast_eval = max_captions, fast_eval
        dim = self.backbone.embed_dim
        self.pool = TextConditionedPool(dim, heads, dropout)
        self.radius = RadiusHead(num_frames, dim)

    @property
    def method_name(self) -> str:
        """'tmass', or 'tmass_refpairing' with the reference code's pairing."""
        return "tmass" if self.pairing == "query" else "tmass_refpairing"

    # ------------------------------------------------------------------ features
    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Features:
        """The raw (un-normalised) projected end-token embedding, as HF `get_text_features`."""
        return {"embeds": self.backbone.encode_text(input_ids, attention_mask)["embeds"]}

    def encode_video(self, frames: Tensor, frame_mask: Tensor) -> Features:
        """Raw per-frame CLIP embeddings [B, F, D] and the frame mask."""
        feats = self.encode_frames(frames)
        if feats.shape[1] != self.radius.proj.in_features:
            raise ValueError(
                f"T-MASS's radius head was built for num_frames={self.radius.proj.in_features} but the data gives "
                f"{feats.shape[1]} frames; set model.init_args.num_frames to data.init_args.num_frames"
            )
        return {"frames": feats, "frame_mask": frame_mask.bool()}

    def prepare_eval_features(self, text: Features, video: Features, text_to_video: Tensor) -> tuple[Features, Features]:
        """With `pairing='reference'`, add each caption's position and each video's own captions, from the whole set.

        Called by the evaluator once every rank's batches are assembled (texts sorted by video, then by
        their `key#j` order), so a video whose captions came in several evaluation batches still gets
        positions 0, 1, ... and all of its captions (the reference groups them over the whole split).
        """
        if self.pairing != "reference":
            return text, video
        n_video = next(iter(video.values())).shape[0]
        pos, own = own_caption_layout(text["embeds"], text_to_video, n_video, self.max_captions)
        return {**text, "caption_pos": pos}, {**video, "caption_embeds": own}

    def search_refusal(self) -> str | None:
        """`pairing='reference'` scores a candidate with its own captions: a gallery of uncaptioned videos cannot."""
        if self.pairing == "reference":
            return ("T-MASS pairing='reference' pools each candidate video with its own caption (the reference code's "
                    "evaluation), which a search over uncaptioned videos does not have; index a checkpoint with "
                    "pairing='query'")
        return super().search_refusal()

    # ------------------------------------------------------------------ scores
    def eval_eps(self, text: Features, video: Features) -> Tensor:
        """Evaluation draws [T, M, D] (eps_mode 'text') or [T, V, M, D] ('pair') from the global indices."""
        t = text["embeds"]
        t_idx = text.get("index", torch.arange(t.shape[0], device=t.device))
        v_idx = None
        if self.eps_mode == "pair":
            frames = video["frames"]
            v_idx = video.get("index", torch.arange(frames.shape[0], device=frames.device))
        eps = counter_prior(self.prior, self.prior_std, self.eval_seed, t_idx.to(t.device), self.trials, t.shape[1], v_idx)
        return eps.to(t.dtype)

    def similarity(self, text: Features, video: Features) -> Tensor:
        """Best-of-M cos(t + eps_m ⊙ R_tv, z) [n_text, n_video] for any slice (block-independent draws)."""
        t, f, m = text["embeds"], video["frames"], video["frame_mask"]
        eps = self.eval_eps(text, video)
        own = pos = None
        if self.pairing == "reference":
            if "caption_embeds" not in video or "caption_pos" not in text:
                raise KeyError(
                    "pairing='reference' needs caption_pos and caption_embeds: call TMASS.prepare_eval_features on the "
                    "assembled evaluation features first (the RetrievalEvaluator does)"
                )
            own, pos = video["caption_embeds"], text["caption_pos"]
        if self.fast_eval and not (self.pool.training and self.pool.dropout.p > 0):
            budget = int(self.hparams.eval_memory_mb * 2**20)
            return tmass_similarity(self.pool, self.radius, t, f, m, eps, own, pos, max_bytes=budget)
        return tmass_similarity_reference(self.pool, self.radius, t, f, m, eps, own, pos)

    def pair_cost_bytes(self, text: Features, video: Features) -> int:
        """A few D-vectors per pair (radius, R ⊙ pooled, R²) plus the M trial scores; M·D more with per-pair eps."""
        return tmass_pair_bytes(video["frames"].shape[2], self.trials, self.eps_mode == "pair")

    def training_loss(self, text: Features, video: Features) -> tuple[Tensor, dict[str, Tensor]]:
        """InfoNCE of the stochastic text + support_weight · InfoNCE of the support text (global batch)."""
        t = text["embeds"]
        # one draw per step shared by every DDP rank (they all score the gathered batch), new each step
        generator = torch.Generator(device=t.device)
        generator.manual_seed((torch.initial_seed() * 1_000_003 + int(self.global_step)) % 2**63)
        eps = sample_prior(self.prior, self.prior_std, tuple(t.shape), device=t.device, dtype=t.dtype, generator=generator)
        return tmass_training_loss(
            self.pool, self.radius, t, video["frames"], video["frame_mask"], self.backbone.logit_scale, eps,
            self.support_weight,
        )  # fmt: skip


def caption_positions(text_to_video: Tensor, n_video: int) -> Tensor:
    """Position of each text among the texts of its video, counted in row order ([T] long)."""
    t2v = text_to_video.long()
    order = torch.argsort(t2v, stable=True)
    counts = torch.bincount(t2v, minlength=n_video)
    starts = counts.cumsum(0) - counts
    pos = torch.empty_like(t2v)
    pos[order] = torch.arange(t2v.numel(), device=t2v.device) - starts[t2v[order]]
    return pos


def own_caption_layout(text_embeds: Tensor, text_to_video: Tensor, n_video: int, max_captions: int) -> tuple[Tensor, Tensor]:
    """Each caption's position among its video's captions (row order) and the [V, P, D] NaN-padded own captions."""
    t2v = text_to_video.long().to(text_embeds.device)
    if t2v.numel() and (int(t2v.min()) < 0 or int(t2v.max()) >= n_video):
        raise ValueError(
            f"text_to_video must index the {n_video} videos, got values in [{int(t2v.min())}, {int(t2v.max())}] "
            "(pairing='reference' reads each text's own video from the test labels: a text whose video is not in the "
            "gallery, -1, cannot be scored)"
        )
    pos = caption_positions(t2v, n_video)
    most = int(pos.max()) + 1 if pos.numel() else 1
    if most > max_captions:
        raise ValueError(
            f"a video has {most} captions, more than model.init_args.max_captions={max_captions} (pairing='reference')"
        )
    own = text_embeds.new_full((n_video, most, text_embeds.shape[1]), float("nan"))
    own[t2v, pos] = text_embeds
    return pos, own
