"""The one CLIP backbone every method shares, via Hugging Face `transformers`.

`name` selects the weights:

* a preset (`tiny`, `tiny-text16`, `vit-b32-random`): a randomly initialised model built offline,
  with OpenAI's tokenizer built from the bundled BPE vocabulary;
* a local directory holding a `save_pretrained` CLIP model (and tokenizer);
* a hub name such as `openai/clip-vit-base-patch32` (needs network or a filled HF cache).

Extension point for methods that change the visual encoder (TS2-Net's token shift): `wrap_visual_blocks`
replaces a sub-module (`self_attn`, `mlp`, `layer_norm1`, `layer_norm2`) of chosen vision encoder layers by a
wrapper that calls the original module (no copy of the transformer; its weights stay the ones loaded), e.g. a
`VisualBlockWrapper` subclass that transforms the sub-module's input. `encode_patches` keeps every patch token.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

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


#: Seconds to wait for the Hugging Face hub to answer before calling it unreachable (one try, no retries).
HUB_PROBE_TIMEOUT_S = 5.0
#: Fewer tokens than this is no BPE vocabulary (256 byte tokens at least): transformers 5 returns such an
#: empty CLIPTokenizer, silently, when the tokenizer files are missing.
MIN_TOKENIZER_SIZE = 256


class WeightsUnavailableError(OSError):
    """CLIP weights or a tokenizer that cannot be had: not in a local directory, not in the Hugging Face cache,
    and not downloadable now (no network, ``HF_HUB_OFFLINE``, or not on the hub). The message is one line."""


def _first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached now (``HF_HUB_OFFLINE``, a refused or timed-out connection),
    after one request of at most ``HUB_PROBE_TIMEOUT_S`` seconds; None when it answers (any HTTP status)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 - any failure to get an answer means: not reachable now
        return f"the hub ({constants.ENDPOINT}) cannot be reached: {_first_line(err)}"
    return None


def missing_weights_message(name: str, what: str, why: str) -> str:
    """The one-line error for hub ``name``'s ``what`` (`weights`, `tokenizer`) missing from the cache while ``why``."""
    fetch = (
        f"python -c \"from transformers import CLIPModel, CLIPTokenizer; n = '{name}'; "
        f"CLIPModel.from_pretrained(n).save_pretrained('clip'); CLIPTokenizer.from_pretrained(n).save_pretrained('clip')\""
    )
    verb = "are" if " and " in what else "is"
    return (
        f"CLIP {what} {name!r} {verb} not in the local Hugging Face cache ({_hub_cache()}) and cannot be downloaded "
        f"now ({why}). "
        f"Two ways out: pass a local directory made with save_pretrained (on a machine with hub access run `{fetch}`, "
        f"copy the folder `clip` here and use --model.init_args.backbone clip), or run once on a machine with hub "
        f"access so that the cache fills (the same HF_HOME)"
    )


def _check_tokenizer(tokenizer: CLIPTokenizer, source: str, vocab_size: int | None = None) -> CLIPTokenizer:
    """The tokenizer when its vocabulary is one; WeightsUnavailableError naming ``source`` otherwise."""
    size = len(tokenizer)
    if size < MIN_TOKENIZER_SIZE:
        raise WeightsUnavailableError(f"the CLIP tokenizer of {source} is empty ({size} tokens): its files are missing")
    if vocab_size is not None and size > vocab_size:
        raise WeightsUnavailableError(
            f"the CLIP tokenizer of {source} has {size:,} tokens but the model's text embeddings only {vocab_size:,}"
        )
    return tokenizer


def _from_hub(cls: type, name: str, what: str) -> object:
    """``cls.from_pretrained(name)``: from the local cache when it is there (no network), else from the hub when
    it can be reached; WeightsUnavailableError (one line, both ways out) otherwise."""
    try:
        found = cls.from_pretrained(name, local_files_only=True)
        if cls is not CLIPTokenizer or len(found) >= MIN_TOKENIZER_SIZE:
            return found
    except OSError:
        pass
    why = hub_unreachable()
    if why is not None:
        raise WeightsUnavailableError(missing_weights_message(name, what, why))
    try:
        return cls.from_pretrained(name)
    except OSError as err:
        why = f"the hub does not give it: {_first_line(err)}"
        raise WeightsUnavailableError(missing_weights_message(name, what, why)) from None


def weights_problem(name: str) -> str | None:
    """Why ``load_clip(name)`` cannot get its files, found without loading a model or downloading anything
    (None: a preset, a local save_pretrained directory, cached hub files, or a hub that answers)."""
    if name in PRESETS:
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return f"{str(path)!r} holds no config.json: not a CLIP directory made with CLIPModel.save_pretrained"
        return None
    if name.startswith((".", "/", "~")):
        return f"CLIP weights directory {name!r} does not exist"
    from huggingface_hub import try_to_load_from_cache

    cached = {f for f in ("config.json", "tokenizer.json", "vocab.json") if isinstance(try_to_load_from_cache(name, f), str)}
    missing = ([] if "config.json" in cached else ["weights"]) + ([] if cached - {"config.json"} else ["tokenizer"])
    if not missing:
        return None
    why = hub_unreachable()
    return None if why is None else missing_weights_message(name, " and ".join(missing), why)


def load_clip(name: str) -> tuple[CLIPModel, CLIPTokenizer]:
    """Build or load a CLIP model and its tokenizer from a preset, a local directory or a hub name
    (WeightsUnavailableError, one line naming the model and the ways out, when the files cannot be had)."""
    if name in PRESETS:
        torch_state = torch.random.get_rng_state()
        model = CLIPModel(PRESETS[name].config())
        torch.random.set_rng_state(torch_state)
        return model, offline_clip_tokenizer()
    path = Path(name).expanduser()
    if path.is_dir():
        try:
            model = CLIPModel.from_pretrained(str(path), local_files_only=True)
        except OSError as err:
            raise WeightsUnavailableError(
                f"{str(path)!r} is not a CLIP directory made with CLIPModel.save_pretrained ({_first_line(err)})"
            ) from None
        vocab = int(model.config.text_config.vocab_size)
        has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "vocab.json"))
        if not has_tokenizer:
            return model, offline_clip_tokenizer()
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise WeightsUnavailableError(
                f"the CLIP tokenizer files in {str(path)!r} cannot be loaded ({type(err).__name__}: {_first_line(err)}); save them "
                f"again with CLIPTokenizer.save_pretrained, or remove tokenizer.json and vocab.json to use OpenAI's "
                f"tokenizer bundled with tvr-bench"
            ) from None
        return model, _check_tokenizer(tokenizer, repr(str(path)), vocab)
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"CLIP weights directory {name!r} does not exist")
    model = _from_hub(CLIPModel, name, "weights")
    tokenizer = _from_hub(CLIPTokenizer, name, "tokenizer")
    return model, _check_tokenizer(tokenizer, repr(name), int(model.config.text_config.vocab_size))


#: Sub-modules of a CLIP vision encoder layer that `CLIPBackbone.wrap_visual_blocks` can wrap
#: (layer: x + self_attn(layer_norm1(x)), then + mlp(layer_norm2(x))).
VISUAL_BLOCK_PARTS = ("self_attn", "mlp", "layer_norm1", "layer_norm2")


class VisualBlockWrapper(nn.Module):
    """Wraps one sub-module of a vision encoder layer: transforms its input hidden states, then calls it.

    The original module is kept as `inner` (its parameters are trained as before, under `....<part>.inner.*`).
    Subclasses override `transform`; the base class is the identity wrapper (outputs unchanged).
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def transform(self, hidden: Tensor) -> Tensor:
        """The wrapped module's input hidden states [N, L, W] as it will see them (identity here)."""
        return hidden

    def forward(self, *args, **kwargs):
        """Call the wrapped module on the transformed hidden states (keyword `hidden_states` or first argument)."""
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = self.transform(kwargs["hidden_states"])
        elif args:
            args = (self.transform(args[0]), *args[1:])
        else:
            raise TypeError(f"{type(self).__name__}: no hidden states in the call")
        return self.inner(*args, **kwargs)


class CLIPBackbone(nn.Module):
    """CLIP text and image encoders returning the features every method builds on."""

    def __init__(self, name: str = "tiny", freeze: str = "none", gradient_checkpointing: bool = False):
        super().__init__()
        if freeze not in {"none", "embeddings", "all"}:
            raise ValueError(f"freeze must be 'none', 'embeddings' or 'all', got {freeze!r}")
        self.name = name
        self.clip, self.tokenizer = load_clip(name)
        # from_pretrained returns the model in eval mode; a built one is in train mode. Train mode, as the
        # references train CLIP (their loops call model.train() every epoch): Lightning switches to eval for
        # validation and test and back, and finds no module left in eval mode when training starts.
        self.clip.train()
        self.clip.config.use_cache = False
        self._precomputed_text: dict[str, Tensor] | None = None
        self._wrapped_visual_blocks: set[int] = set()
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
        if output_attentions and len(vm.encoder.layers) - 1 in self._wrapped_visual_blocks:
            raise ValueError("the last visual block is wrapped (wrap_visual_blocks): its class-token attention is not available")
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

    # ------------------------------------------------------------------ visual blocks
    @property
    def wrapped_visual_blocks(self) -> tuple[int, ...]:
        """Indices (0-based) of the vision encoder layers that `wrap_visual_blocks` changed."""
        return tuple(sorted(self._wrapped_visual_blocks))

    def wrap_visual_blocks(
        self, layers: Iterable[int], wrap: Callable[[nn.Module], nn.Module], part: str = "self_attn"
    ) -> list[nn.Module]:
        """Replace sub-module `part` of the chosen vision encoder layers by `wrap(original)`; return the wrappers.

        `layers` are 0-based indices (negative ones count from the last layer); `part` is one of
        VISUAL_BLOCK_PARTS. The wrapper must call the original module (see `VisualBlockWrapper`): the layer
        then computes x + wrapper(layer_norm1(x)) for `self_attn`. Wrap after loading weights: the wrapped
        parameters' names gain the wrapper's prefix (e.g. `self_attn.inner.q_proj.weight`).
        """
        if part not in VISUAL_BLOCK_PARTS:
            raise ValueError(f"cannot wrap {part!r} of a visual block; choose one of {VISUAL_BLOCK_PARTS}")
        blocks = self.clip.vision_model.encoder.layers
        chosen: list[int] = []
        for layer in layers:
            index = int(layer) + len(blocks) if int(layer) < 0 else int(layer)
            if not 0 <= index < len(blocks):
                raise ValueError(f"visual block {layer} does not exist: the vision tower of {self.name!r} has {len(blocks)} layers")
            if index in chosen:
                raise ValueError(f"visual block {layer} is listed twice")
            chosen.append(index)
        wrappers = [wrap(getattr(blocks[index], part)) for index in chosen]
        for wrapper in wrappers:
            if not isinstance(wrapper, nn.Module):
                raise TypeError(f"wrap must return an nn.Module, got {type(wrapper).__name__}")
        for index, wrapper in zip(chosen, wrappers):  # all or nothing: installed once every wrapper is built
            setattr(blocks[index], part, wrapper)
            self._wrapped_visual_blocks.add(index)
        return wrappers

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
