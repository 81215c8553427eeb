"""RetrievalModule: the LightningModule every method shares (optimisation, gathering, eval hooks)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from tvr_bench.backbones.clip import CLIPBackbone
from tvr_bench.backbones.normalization import normalize_batch
from tvr_bench.functional.losses import MAX_LOGIT_SCALE, clamp_logit_scale_
from tvr_bench.functional.pooling import mean_pool_normalised
from tvr_bench.optim import REFERENCE_ADAM_ARGS, REFERENCE_OPTIMIZERS, BertAdam, LegacyAdamW, schedule_lambda

Features = dict[str, Tensor]


#: Checkpoint entry holding torch's random state (plain tensors: loads with ``weights_only=True``).
RNG_STATE_KEY = "tvr_bench_rng_state"

#: Values of the `optimizer` init argument: the suite's AdamW, or the method's reference update rule.
OPTIMIZERS = ("adamw", "reference")
#: Global gradient-norm clip every reference applies before its optimiser step (CLIP4Clip
#: main_task_retrieval.py:278, DRL main.py:267, X-Pool trainer/trainer.py:61, T-MASS
#: trainer/trainer_stochastic.py:69); BertAdam clips each tensor at the same norm again inside its step.
REFERENCE_CLIP_NORM = 1.0


class NonFiniteLossError(RuntimeError):
    """Raised when a training loss is NaN or infinite, naming the samples of the batch."""


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous (for collectives that read raw memory)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.contiguous()


class RetrievalModule(L.LightningModule):
    """Shared training and evaluation logic; subclasses supply the method's features, score and loss.

    Subclasses implement `encode_text`, `encode_video`, `similarity` and `training_loss`
    (see docs/INTERFACES.md). The backbone's parameters form the `backbone` learning-rate group
    (`backbone_lr`); everything else the `head` group (`lr`). `optimizer` picks the update rule: `adamw`
    (default: torch AdamW, no decay on norms/biases/temperature) or `reference` (the method's
    `REFERENCE_OPTIMIZER` with the reference's groups and schedule; see `configure_optimizers`).

    ``DATA_PROTOCOL`` is the data side of the method's reference protocol: frame ``sampling`` of the
    shards, the training ``train_stream`` (``pairs``: every (video, caption) pair once per epoch in one
    uniform random order; ``videos``: every video once per epoch with one random caption), train-time
    ``augment`` (``none`` | ``clip_train``) and ``last_batch`` (``drop`` | ``keep``: the incomplete last
    batch of an epoch, as the reference's ``DataLoader`` treats it). The CLI fills any of these the data
    config leaves unset; sources are in the method cards (docs/methods/).
    """

    #: CLIP4Clip's (and DRL's, MASCOT's): ``drop_last=True`` in CLIP4Clip `dataloaders/data_dataloaders.py` L32.
    DATA_PROTOCOL: ClassVar[dict[str, str]] = {"sampling": "fps1_uniform", "train_stream": "pairs", "augment": "none", "last_batch": "drop"}
    #: Update rule of the method's reference code, used with `optimizer: reference` (one of
    #: tvr_bench.optim.REFERENCE_OPTIMIZERS; None: the method has no reference optimiser).
    REFERENCE_OPTIMIZER: ClassVar[str | None] = None
    #: How `tvr-bench search` serves the method from a vector index (docs/search.md): ``two_tower`` when
    #: `similarity(t, v)` is exactly ``t["embeds"] @ v["embeds"].T`` with each side computed without the other
    #: (the index holds one vector per video, searched exactly); ``rerank`` (the safe default) when a score needs
    #: both sides together (text-conditioned pooling, token-wise matching): a first stage over mean-pooled
    #: vectors (`search_vectors`) picks K candidates and `similarity` re-ranks them from the stored features.
    SEARCH_SCORING: ClassVar[str] = "rerank"
    #: The init args that change how test-time scores are computed, each with the values the scoring audit tries,
    #: the default first (tvr_bench/audit.py; docs/leaderboard.md, "What counts as a retrieval result"). Each one
    #: is kept as an attribute of the same name and read at scoring time, so `using_scoring_options` can switch it.
    SCORING_OPTIONS: ClassVar[dict[str, tuple[Any, ...]]] = {}

    def __init__(
        self,
        backbone: str = "tiny",
        max_words: int = 32,
        lr: float = 1e-4,
        backbone_lr: float = 1e-7,
        weight_decay: float = 0.2,
        no_decay_norm_bias: bool = True,
        betas: tuple[float, float] = (0.9, 0.98),
        adam_eps: float = 1e-6,
        warmup_ratio: float = 0.1,
        freeze: str = "none",
        gradient_checkpointing: bool = False,
        eval_memory_mb: float = 1024.0,
        logit_scale_max: float = MAX_LOGIT_SCALE,
        optimizer: str = "adamw",
        lr_scale: float = 1.0,
    ):
        """`lr_scale` multiplies both learning rates (`lr` and `backbone_lr`), keeping the ratio the method's reference
        sets: the synthetic recipe's one factor that carries the references' rates for a pretrained ViT-B/32 over to
        the small pretrained synthetic backbone (data_cards/synthetic.md, "Fine-tuning recipe")."""
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"model optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if optimizer == "reference":
            kind = type(self).REFERENCE_OPTIMIZER
            if kind not in REFERENCE_OPTIMIZERS:
                raise ValueError(f"optimizer='reference': {type(self).__name__} declares no reference optimiser")
            ref_betas, ref_eps = REFERENCE_ADAM_ARGS[kind]
            if tuple(betas) != ref_betas or adam_eps != ref_eps:
                raise ValueError(
                    f"optimizer='reference': {type(self).__name__}'s reference ({kind}) uses betas {ref_betas} and "
                    f"eps {ref_eps}, got betas {tuple(betas)} and adam_eps {adam_eps}; set them in the model "
                    f"init_args or use optimizer: adamw (docs/methods/, 'Optimiser')"
                )
        if max_words < 3:
            raise ValueError(f"max_words must be at least 3 (start, one word, end), got {max_words}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if lr <= 0 or backbone_lr < 0:
            raise ValueError(f"learning rates must be positive (lr={lr}, backbone_lr={backbone_lr})")
        if not lr_scale > 0:
            raise ValueError(f"lr_scale must be positive, got {lr_scale}")
        self.save_hyperparameters()
        self.backbone = CLIPBackbone(backbone, freeze=freeze, gradient_checkpointing=gradient_checkpointing)

    # ------------------------------------------------------------------ method interface
    @property
    def method_name(self) -> str:
        """Short name of the method, used in logs and leaderboards."""
        return type(self).__name__.lower()

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Features:
        """Text features of a batch of token ids (batch-first tensors)."""
        raise NotImplementedError

    def encode_video(self, frames: Tensor, frame_mask: Tensor) -> Features:
        """Video features of a batch of frames [B, F, 3, H, W] with mask [B, F]."""
        raise NotImplementedError

    def similarity(self, text: Features, video: Features) -> Tensor:
        """Evaluation scores [n_text, n_video] of any slice of texts and videos."""
        raise NotImplementedError

    def training_loss(self, text: Features, video: Features) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of a batch where text i is paired with video i, and extra scalars to log."""
        raise NotImplementedError

    def pair_cost_bytes(self, text: Features, video: Features) -> int:
        """Bytes one (text, video) pair costs inside `similarity`; sizes the evaluator's blocks."""
        return 4 * 64

    def search_vectors(self, feats: Features, side: str) -> Tensor:
        """One vector per item for the search index's vector stage ([N, D] float), from `encode_text`
        (``side="text"``) or `encode_video` (``"video"``) features.

        ``two_tower``: the ``embeds`` themselves (their inner product is the score). ``rerank``: the
        first-stage vectors, unit length: the text's ``embeds`` (else its end token, the last real one of
        ``tokens``) and the masked mean of the unit-length ``frames`` (else ``embeds``); a method whose
        features follow other names overrides this."""
        if side not in ("text", "video"):
            raise ValueError(f"side must be 'text' or 'video', got {side!r}")
        if self.SEARCH_SCORING == "two_tower":
            return feats["embeds"]
        if "embeds" in feats:
            vectors = feats["embeds"]
        elif side == "text" and "tokens" in feats:
            lengths = feats["token_mask"].long().sum(-1).clamp_min(1) - 1
            vectors = feats["tokens"][torch.arange(lengths.shape[0], device=lengths.device), lengths]
        elif side == "video" and "frames" in feats:
            vectors = mean_pool_normalised(feats["frames"].float(), feats["frame_mask"])
        else:
            raise KeyError(
                f"{type(self).__name__} features {sorted(feats)} have no 'embeds', 'tokens' or 'frames': override "
                f"search_vectors() to give the search index its first-stage vectors (docs/search.md)"
            )
        return F.normalize(vectors.float(), dim=-1)

    def search_refusal(self) -> str | None:
        """Why this configured method's scores cannot be served one query at a time from an index (None: they
        can). A score that depends on which items are evaluated together (``eval_block_sizes``) cannot."""
        blocks = getattr(self, "eval_block_sizes", None)
        if callable(blocks) and blocks() is not None:
            return (f"{self.method_name} scores depend on how items are grouped into evaluation blocks "
                    f"(eval_block_sizes() = {blocks()}); a search scores one query against stored videos")
        return None

    # ------------------------------------------------------------------ scoring options
    def scoring_options(self) -> dict[str, Any]:
        """The current value of every `SCORING_OPTIONS` entry."""
        missing = [name for name in type(self).SCORING_OPTIONS if not hasattr(self, name)]
        if missing:
            raise AttributeError(
                f"{type(self).__name__} declares SCORING_OPTIONS {missing} but keeps no attribute of that name "
                "(each scoring option must be stored as `self.<name>` and read at scoring time)"
            )
        return {name: getattr(self, name) for name in type(self).SCORING_OPTIONS}

    @contextmanager
    def using_scoring_options(self, **options: Any) -> Iterator[None]:
        """Score with other values of some `SCORING_OPTIONS` inside the block (restored after it)."""
        declared = type(self).SCORING_OPTIONS
        unknown = sorted(set(options) - set(declared))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no scoring option(s) {unknown}; declared: {sorted(declared)}")
        before = self.scoring_options()
        try:
            for name, value in options.items():
                setattr(self, name, value)
            yield
        finally:
            for name, value in before.items():
                setattr(self, name, value)

    # ------------------------------------------------------------------ shared helpers
    def encode_frames(self, frames: Tensor) -> Tensor:
        """Per-frame CLIP embeddings: [B, F, 3, H, W] -> [B, F, D]."""
        b, f = frames.shape[:2]
        return self.backbone.encode_frames(frames.flatten(0, 1)).view(b, f, -1)

    def encode_batch_text(self, batch: dict[str, Any]) -> Features:
        """The method's text features of a batch: from its captions, or from the frozen backbone's cached
        outputs `text_features` when the batch comes from a features directory (docs/features.md)."""
        cached = batch.get("text_features")
        if cached is None:
            return self.encode_text(**self.tokenize(batch["captions"]))
        with self.backbone.precomputed_text(cached):
            return self.encode_text(None, cached.get("token_mask"))  # type: ignore[arg-type]

    def tokenize(self, captions: list[str]) -> dict[str, Tensor]:
        """Token ids and attention mask of captions on this module's device."""
        return self.backbone.tokenize(captions, self.hparams.max_words, self.device)

    def gather_features(self, feats: Features) -> Features:
        """All-gather features from every DDP rank with gradients (identity on one process or without a trainer).

        Every rank computes the same loss L on the gathered batch; the gather's backward sums dL/df_r over
        the W ranks (W dL/df_r) and DDP averages the parameter gradients, so they equal the gradients of
        one process with the whole batch (tests/test_ddp.py). The references' AllGather returns only the
        local slice, i.e. 1/W of that on the feature path (docs/scaling.md).
        """
        trainer = self._trainer  # `self.trainer` raises when the module is used without a Trainer
        if trainer is None or trainer.world_size <= 1:
            return feats
        out = {}
        for key, value in feats.items():
            gathered = self.all_gather(value, sync_grads=True).flatten(0, 1)
            # torch's gather backward sends the incoming gradient as is; gloo reads a non-contiguous one
            # (T-MASS's frame gradient is) as raw memory, so hand it a contiguous copy
            out[key] = _ContiguousGrad.apply(gathered) if gathered.requires_grad else gathered
        return out

    # ------------------------------------------------------------------ Lightning hooks
    def training_features(self, batch: dict[str, Any]) -> tuple[Features, Features]:
        """Local text and video features of a training batch (methods with extra views override this)."""
        text = self.encode_batch_text(batch)
        return text, self.encode_video(batch["frames"], batch["frame_mask"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Encode, gather across ranks, compute the method's loss, refuse non-finite values."""
        batch = normalize_batch(batch)  # no-op after the DataModule's hook; uint8 frames of a bare loader otherwise
        text, video = self.training_features(batch)
        loss, extra = self.training_loss(self.gather_features(text), self.gather_features(video))
        if not torch.isfinite(loss):
            keys = ", ".join(map(str, batch.get("video_key", [])))
            raise NonFiniteLossError(
                f"non-finite training loss {loss.item()} at step {self.global_step}; samples in the batch: {keys}"
            )
        bs = len(batch["captions"])
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for name, value in extra.items():
            self.log(f"train/{name}", value, batch_size=bs)
        self.log("train/logit_scale", self.backbone.logit_scale.detach().exp(), batch_size=bs)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Clamp the temperature at ln(100) after each step, as every reference does."""
        clamp_logit_scale_(self.backbone.logit_scale, self.hparams.logit_scale_max)

    # ------------------------------------------------------------------ exact resume
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store torch's random state (CPU and this device) so that a resumed fit draws what the
        uninterrupted one would have drawn (dropout, T-MASS samples)."""
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        checkpoint[RNG_STATE_KEY] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the stored random state for the first training batch of a resumed fit."""
        trainer = self._trainer
        fitting = trainer is not None and getattr(trainer.state, "fn", None) == "fit"
        self._resume_rng_state = checkpoint.get(RNG_STATE_KEY) if fitting else None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Resumed fit: restore the checkpoint's random state right before the first step it trains."""
        state = getattr(self, "_resume_rng_state", None)
        if state is None:
            return
        self._resume_rng_state = None
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def _eval_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        batch = normalize_batch(batch)  # as in training_step
        text = self.encode_batch_text(batch)
        video = self.encode_video(batch["frames"], batch["frame_mask"])
        return {
            "text": text,
            "video": video,
            "video_key": list(batch["video_key"]),
            "caption_key": list(batch["caption_key"]),
            "caption_video": batch["caption_video"],
        }

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Encode one evaluation batch; the RetrievalEvaluator callback collects and scores."""
        return self._eval_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Encode one evaluation batch; the RetrievalEvaluator callback collects and scores."""
        return self._eval_step(batch)

    # ------------------------------------------------------------------ optimisation
    def group_lr(self, part: str) -> float:
        """The learning rate of the `backbone` or `head` group: `backbone_lr` or `lr`, times `lr_scale`."""
        hp = self.hparams
        return (hp.backbone_lr if part == "backbone" else hp.lr) * float(hp.get("lr_scale", 1.0))

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: backbone vs head learning rate, without weight decay on norms and biases."""
        hp = self.hparams
        groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            part = "backbone" if name.startswith("backbone.") else "head"
            no_decay = hp.no_decay_norm_bias and (p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias"))
            if name.endswith("logit_scale"):
                no_decay = True
            groups.setdefault((part, no_decay), []).append(p)
        out = []
        for (part, no_decay), params in sorted(groups.items()):
            out.append(
                {
                    "params": params,
                    "lr": self.group_lr(part),
                    "weight_decay": 0.0 if no_decay else hp.weight_decay,
                    "name": f"{part}{'_no_decay' if no_decay else ''}",
                }
            )
        return out

    def reference_param_groups(self) -> list[dict[str, Any]]:
        """The reference code's groups: backbone (CLIP) vs new-layer learning rate, weight decay by the reference's rule.

        BertAdam (CLIP4Clip main_task_retrieval.py:189-206, DRL main.py:185-201): no decay only where the
        name contains 'bias'; its 'LayerNorm.*' patterns match no CLIP name, so layer norms, embeddings and
        the logit scale are decayed. Legacy AdamW (X-Pool train.py:50-58, T-MASS train.py:73-81): every
        parameter decayed. `no_decay_norm_bias` does not apply here.
        """
        hp = self.hparams
        bert = type(self).REFERENCE_OPTIMIZER == "bertadam"
        groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                part = "backbone" if name.startswith("backbone.") else "head"
                groups.setdefault((part, bert and "bias" in name), []).append(p)
        return [
            {
                "params": params,
                "lr": self.group_lr(part),
                "weight_decay": 0.0 if no_decay else hp.weight_decay,
                "name": f"{part}{'_no_decay' if no_decay else ''}",
            }
            for (part, no_decay), params in sorted(groups.items())
        ]

    def configure_optimizers(self) -> dict[str, Any]:
        """The optimiser and its per-step LambdaLR schedule (factor 0 at the first step, as every reference).

        `optimizer: adamw`: torch AdamW on `param_groups`, linear warm-up over int(warmup_ratio * total)
        steps then a half cosine. `optimizer: reference`: the method's `REFERENCE_OPTIMIZER` on
        `reference_param_groups` - BertAdam with `warmup_cosine_overall` or the legacy AdamW with the
        same schedule as `adamw` (tvr_bench/optim.py); the trainer must clip the global gradient norm at
        1.0 as the references do.
        """
        hp = self.hparams
        total = self._total_steps()
        if hp.optimizer == "reference":
            self._check_reference_clipping()
            kind = type(self).REFERENCE_OPTIMIZER
            if kind == "bertadam":
                optimizer: torch.optim.Optimizer = BertAdam(
                    self.reference_param_groups(), lr=self.group_lr("head"), betas=tuple(hp.betas), eps=hp.adam_eps,
                    max_grad_norm=REFERENCE_CLIP_NORM,
                )
                schedule = schedule_lambda("cosine_overall", total, hp.warmup_ratio)
            else:
                optimizer = LegacyAdamW(self.reference_param_groups(), lr=self.group_lr("head"), betas=tuple(hp.betas),
                                        eps=hp.adam_eps)
                schedule = schedule_lambda("cosine", total, hp.warmup_ratio)
        else:
            optimizer = torch.optim.AdamW(self.param_groups(), betas=tuple(hp.betas), eps=hp.adam_eps)
            schedule = schedule_lambda("cosine", total, hp.warmup_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _check_reference_clipping(self) -> None:
        """`optimizer: reference` needs the references' global clip: trainer.gradient_clip_val 1.0, algorithm 'norm'."""
        trainer = self._trainer
        if trainer is None:
            return
        value = trainer.gradient_clip_val
        algorithm = str(getattr(trainer, "gradient_clip_algorithm", None) or "norm").lower()
        if value is None or float(value) != REFERENCE_CLIP_NORM or not algorithm.endswith("norm"):
            raise ValueError(
                f"model optimizer='reference' reproduces the reference loop, which clips the global gradient norm at "
                f"{REFERENCE_CLIP_NORM} before the optimiser step: set trainer.gradient_clip_val: {REFERENCE_CLIP_NORM} "
                f"and gradient_clip_algorithm: norm (got {value!r}, {algorithm!r}; recipes/base.yaml sets them)"
            )

    def _total_steps(self) -> int:
        trainer = self._trainer  # `self.trainer` raises outside a Trainer (plain PyTorch loops)
        if trainer is None:
            return 1
        steps = trainer.estimated_stepping_batches
        if not math.isfinite(steps) or steps <= 0:
            if trainer.max_steps and trainer.max_steps > 0:
                return int(trainer.max_steps)
            raise ValueError(
                "cannot size the cosine schedule: the training dataloader has no length and "
                "trainer.max_steps is not set"
            )
        return int(steps)
