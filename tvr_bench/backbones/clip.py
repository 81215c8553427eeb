"""The one CLIP backbone every method shares, via Hugging Face `transformers`.

`name` selects the weights:

* a preset (`tiny`, `tiny-text16`, `vit-b32-random`): a randomly initialised model built offline,
  with OpenAI's tokenizer built from the bundled BPE vocabulary;
* a local directory holding a `save_pretrained` CLIP model (and tokenizer);
* a hub name such as `openai/clip-vit-base-patch32` (needs network or a filled HF cache).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor, nn
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig

from tvr_bench.backbones.normalization import CLIP_MEAN, CLIP_STD  # noqa: F401  (the backbone's pixel statistics)
from tvr_bench.backbones.tokenizer import offline_clip_tokenizer


@dataclass(frozen=True)
class RandomCLIPPreset:
    """Sizes of a randomly initialised CLIP built without any download."""

    width: int
    layers: int
    heads: int
    embed_dim: int
    image_size: int
    patch_size: int
    vision_width: int | None = None
    vision_layers: int | None = None

    def config(self) -> CLIPConfig:
        """Return the transformers CLIPConfig for this preset."""
        vw = self.vision_width or self.width
        text = CLIPTextConfig(
            vocab_size=49408,
            hidden_size=self.width,
            intermediate_size=4 * self.width,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
        vision = CLIPVisionConfig(
            hidden_size=vw,
            intermediate_size=4 * vw,
            num_hidden_layers=self.vision_layers or self.layers,
            num_attention_heads=max(1, vw // 64) if vw >= 64 else self.heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
        )
        return CLIPConfig(
            text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=self.embed_dim
        )


PRESETS: dict[str, RandomCLIPPreset] = {
    # Trains on a laptop CPU in minutes: 64 px frames, 16 patches of 16 px.
    "tiny": RandomCLIPPreset(width=128, layers=2, heads=2, embed_dim=128, image_size=64, patch_size=16),
    # The ViT-B/32 geometry with random weights: for perf measurements, never for CI.
    "vit-b32-random": RandomCLIPPreset(
        width=512, layers=12, heads=8, embed_dim=512, image_size=224, patch_size=32,
        vision_width=768, vision_layers=12,
    ),
}


def load_clip(name: str) -> tuple[CLIPModel, CLIPTokenizer]:
    """Build or load a CLIP model and its tokenizer from a preset, a local directory or a hub name."""
    if name in PRESETS:
        torch_state = torch.random.get_rng_state()
        model = CLIPModel(PRESETS[name].config())
        torch.random.set_rng_state(torch_state)
        return model, offline_clip_tokenizer()
    path = Path(name).expanduser()
    if path.is_dir():
        model = CLIPModel.from_pretrained(str(path), local_files_only=True)
        has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "vocab.json"))
        tokenizer = (
            CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
            if has_tokenizer
            else offline_clip_tokenizer()
        )
        return model, tokenizer
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"CLIP weights directory {name!r} does not exist")
    try:
        model = CLIPModel.from_pretrained(name)
        tokenizer = CLIPTokenizer.from_pretrained(name)
    except OSError as err:
        raise OSError(
            f"could not load CLIP {name!r} from the Hugging Face hub or its cache ({err}). Presets: "
            f"{sorted(PRESETS)}; or pass a local directory made with CLIPModel.save_pretrained."
        ) from err
    return model, tokenizer


class CLIPBackbone(nn.Module):
    """CLIP text and image encoders returning the features every method builds on."""

    def __init__(self, name: str = "tiny", freeze: str = "none", gradient_checkpointing: bool = False):
        super().__init__()
        if freeze not in {"none", "embeddings", "all"}:
            raise ValueError(f"freeze must be 'none', 'embeddings' or 'all', got {freeze!r}")
        self.name = name
        self.clip, self.tokenizer = load_clip(name)
        self.clip.config.use_cache = False
        self._precomputed_text: dict[str, Tensor] | None = None
        if gradient_checkpointing:
            self.clip.gradient_checkpointing_enable()
        self._apply_freeze(freeze)

    # ------------------------------------------------------------------ properties
    @property
    def embed_dim(self) -> int:
        """Width of the joint text-video embedding space."""
        return int(self.clip.config.projection_dim)

    @property
    def image_size(self) -> int:
        """Input resolution the vision tower expects."""
        return int(self.clip.config.vision_config.image_size)

    @property
    def num_patches(self) -> int:
        """Patches per frame (without the class token)."""
        cfg = self.clip.config.vision_config
        return (cfg.image_size // cfg.patch_size) ** 2

    @property
    def logit_scale(self) -> nn.Parameter:
        """CLIP's learnable log temperature."""
        return self.clip.logit_scale

    # ------------------------------------------------------------------ text
    def tokenize(self, captions: list[str], max_words: int, device: torch.device | None = None) -> dict[str, Tensor]:
        """Tokenize captions to `max_words` tokens (start and end token included), padded to that length."""
        max_len = min(max_words, int(self.clip.config.text_config.max_position_embeddings))
        out = self.tokenizer(
            list(captions), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"
        )
        return {k: v.to(device) if device is not None else v for k, v in out.items() if k in ("input_ids", "attention_mask")}

    @contextmanager
    def precomputed_text(self, outputs: dict[str, Tensor]) -> Iterator[None]:
        """Within the block `encode_text` returns these cached outputs of a frozen backbone instead of
        running the text tower (cached features, docs/features.md)."""
        self._precomputed_text = _CachedText(outputs)
        try:
            yield
        finally:
            self._precomputed_text = None

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """Return `embeds` [N, D] (projected end token), `tokens` [N, L, D] (projected states) and `token_mask`."""
        if self._precomputed_text is not None:
            return self._precomputed_text
        out = self.clip.text_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        projection = self.clip.text_projection
        return {
            "embeds": projection(out.pooler_output),
            "tokens": projection(out.last_hidden_state),
            "token_mask": attention_mask.bool(),
        }

    # ------------------------------------------------------------------ vision
    def encode_frames(self, pixels: Tensor) -> Tensor:
        """Project the class token of each image: [N, 3, H, W] -> [N, D]. A 2-D input [N, D] holds the
        cached output of this frozen backbone (docs/features.md) and is returned as it is."""
        if pixels.ndim == 2:
            if pixels.shape[1] != self.embed_dim:
                raise ValueError(f"cached frame features have width {pixels.shape[1]}, the backbone {self.embed_dim}")
            return pixels
        out = self.clip.vision_model(pixel_values=pixels, return_dict=True)
        return self.clip.visual_projection(out.pooler_output)

    def encode_patches(
        self, pixels: Tensor, keep_index: Tensor | None = None, output_attentions: bool = False
    ) -> dict[str, Tensor]:
        """Run the vision tower on a subset of patches and return projected class and patch tokens.

        `keep_index` [N, K] lists the patch positions (0-based, class token excluded) each image keeps;
        the others are dropped before the transformer, so they are never seen. With
        `output_attentions` the last layer's class-token attention over the kept patches (mean over
        heads) is returned as `cls_attention` [N, K].
        """
        if pixels.ndim != 4:
            raise ValueError("patch tokens need pixels [N, 3, H, W]; cached features hold class-token embeddings only")
        vm = self.clip.vision_model
        tokens = vm.embeddings(pixels)  # [N, 1 + P, W], position embeddings included
        if keep_index is not None:
            idx = (keep_index + 1).unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
            tokens = torch.cat([tokens[:, :1], torch.gather(tokens, 1, idx)], dim=1)
        hidden = vm.pre_layrnorm(tokens)
        attentions = None
        if output_attentions:
            for layer in vm.encoder.layers[:-1]:
                hidden = _layer_out(layer(hidden, None))
            hidden, attentions = _last_layer_with_attention(vm.encoder.layers[-1], hidden)
        else:
            hidden = vm.encoder(inputs_embeds=hidden, return_dict=True).last_hidden_state
        hidden = vm.post_layernorm(hidden)
        projected = self.clip.visual_projection(hidden)
        out = {"cls": projected[:, 0], "patches": projected[:, 1:]}
        if attentions is not None:
            out["cls_attention"] = attentions
        return out

    # ------------------------------------------------------------------ freezing
    def _apply_freeze(self, freeze: str) -> None:
        if freeze == "all":
            for p in self.clip.parameters():
                p.requires_grad_(False)
            self.clip.logit_scale.requires_grad_(True)
        elif freeze == "embeddings":
            # CLIP4Clip's `freeze_layer_num 0`: token/position embeddings and the patch stem stay fixed.
            for name, p in self.clip.named_parameters():
                if name.startswith(("text_model.embeddings", "vision_model.embeddings", "vision_model.pre_layrnorm")):
                    p.requires_grad_(False)


class _CachedText(dict):
    """Cached text outputs; a missing entry (token states not extracted) names the fix."""

    def __missing__(self, key: str) -> Tensor:
        raise KeyError(f"the cached text features hold no {key!r}: extract them again without --no-tokens (docs/features.md)")


def _layer_out(out: Tensor | tuple) -> Tensor:
    """Hidden states of an encoder layer's output (a tensor or a tuple, depending on the version)."""
    return out[0] if isinstance(out, tuple) else out


def _last_layer_with_attention(layer: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """Run one CLIP encoder layer and also return its class-token attention over the other tokens."""
    residual = hidden
    x = layer.layer_norm1(hidden)
    attn = layer.self_attn
    n, length, width = x.shape
    heads = attn.num_heads
    q = attn.q_proj(x).view(n, length, heads, -1).transpose(1, 2)
    k = attn.k_proj(x).view(n, length, heads, -1).transpose(1, 2)
    v = attn.v_proj(x).view(n, length, heads, -1).transpose(1, 2)
    weights = torch.softmax((q @ k.transpose(-1, -2)) * attn.scale, dim=-1)
    ctx = (weights @ v).transpose(1, 2).reshape(n, length, width)
    hidden = residual + attn.out_proj(ctx)
    hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    return hidden, weights[:, :, 0, 1:].mean(dim=1)
