"""The seqTransf temporal module shared by CLIP4Clip and DRL.

Frame features get a learned position embedding, pass through a few pre-LN residual attention
blocks (CLIP's text-transformer block: LN -> self-attention -> residual, LN -> MLP with QuickGELU
-> residual), and are added back to the raw frame features. Padded frames are hidden from every
query by an additive key mask of -1e6, as in the references (CLIP4Clip `_loose_similarity`, DRL
`agg_video_feat`). The layer norms use eps 1e-12 like the references' `until_module.LayerNorm`,
even when the weights come from CLIP (whose own layer norms use 1e-5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Additive attention bias given to padded keys, the references' `(1 - m) * -1e6`.
KEY_PAD_BIAS = -1.0e6


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's GELU approximation x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


def key_padding_bias(mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Additive attention bias [B, 1, 1, F]: 0 for real frames, -1e6 for padded ones."""
    return ((1.0 - mask.to(dtype)) * KEY_PAD_BIAS)[:, None, None, :]


class ResidualAttentionBlock(nn.Module):
    """One pre-LN transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, ln_eps: float = 1e-12):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width, eps=ln_eps)
        self.qkv = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width, eps=ln_eps)
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)

    def attention(self, x: Tensor, bias: Tensor) -> Tensor:
        """Multi-head self-attention of x [B, F, D] with an additive bias broadcastable to [B, H, F, F]."""
        b, f, d = x.shape
        q, k, v = self.qkv(x).view(b, f, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.out_proj(out.transpose(1, 2).reshape(b, f, d))

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """Apply the block to x [B, F, D] under the additive key bias."""
        x = x + self.attention(self.ln_1(x), bias)
        return x + self.proj(quick_gelu(self.fc(self.ln_2(x))))


class TemporalTransformer(nn.Module):
    """seqTransf: position embedding + `layers` residual attention blocks over frames + residual."""

    def __init__(self, width: int, layers: int = 4, heads: int = 8, max_positions: int = 77, ln_eps: float = 1e-12):
        super().__init__()
        self.width, self.layers, self.heads, self.max_positions = width, layers, heads, max_positions
        self.position_embedding = nn.Embedding(max_positions, width)
        self.blocks = nn.ModuleList(ResidualAttentionBlock(width, heads, ln_eps) for _ in range(layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init as the references' `init_weights`: N(0, 0.02) weights, zero biases, unit norms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, frames: Tensor, frame_mask: Tensor) -> Tensor:
        """Contextualise frames [B, F, D] (mask [B, F], true = real frame) and add the raw frames back."""
        n_frames = frames.shape[1]
        if n_frames > self.max_positions:
            raise ValueError(f"{n_frames} frames exceed the {self.max_positions} frame position embeddings")
        x = frames + self.position_embedding.weight[:n_frames]
        bias = key_padding_bias(frame_mask, x.dtype)
        for block in self.blocks:
            x = block(x, bias)
        return x + frames


def temporal_state_from_reference(state: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Map a CLIP4Clip/DRL seqTransf state dict (`frame_position_embeddings`, `transformerClip.resblocks.*`) to ours."""
    names = {
        "ln_1.weight": "ln_1.weight", "ln_1.bias": "ln_1.bias",
        "ln_2.weight": "ln_2.weight", "ln_2.bias": "ln_2.bias",
        "attn.in_proj_weight": "qkv.weight", "attn.in_proj_bias": "qkv.bias",
        "attn.out_proj.weight": "out_proj.weight", "attn.out_proj.bias": "out_proj.bias",
        "mlp.c_fc.weight": "fc.weight", "mlp.c_fc.bias": "fc.bias",
        "mlp.c_proj.weight": "proj.weight", "mlp.c_proj.bias": "proj.bias",
    }
    out: dict[str, Tensor] = {}
    pos_key = prefix + "frame_position_embeddings.weight"
    if pos_key in state:
        out["position_embedding.weight"] = state[pos_key]
    block_prefix = prefix + "transformerClip.resblocks."
    for key, value in state.items():
        if not key.startswith(block_prefix):
            continue
        index, name = key[len(block_prefix):].split(".", 1)
        out[f"blocks.{index}.{names[name]}"] = value
    return out


def _text_transformer(text_model: nn.Module) -> nn.Module:
    """The module holding `embeddings` and `encoder` in a CLIPTextModel, CLIPTextTransformer or CLIPModel."""
    text_model = getattr(text_model, "text_model", text_model)
    if not (hasattr(text_model, "embeddings") and hasattr(text_model, "encoder")):
        raise TypeError(f"expected a transformers CLIP text model, got {type(text_model).__name__}")
    return text_model


@torch.no_grad()
def init_temporal_from_clip_text(module: TemporalTransformer, text_model: nn.Module) -> bool:
    """Copy CLIP's text position embedding and first layers into `module` when widths match; return whether it did.

    Accepts a transformers CLIPModel, CLIPTextModel or CLIPTextTransformer. HF keeps q/k/v
    projections separate (OpenAI fuses them as `in_proj`); they are concatenated into `qkv`.
    """
    text = _text_transformer(text_model)
    pos = text.embeddings.position_embedding.weight
    if pos.shape[1] != module.width:
        return False
    rows = min(pos.shape[0], module.max_positions)
    module.position_embedding.weight[:rows].copy_(pos[:rows])
    # like the reference, a temporal module deeper than CLIP keeps its extra blocks' random init
    for block, layer in zip(module.blocks, text.encoder.layers):
        attn = layer.self_attn
        if getattr(attn, "num_heads", block.heads) != block.heads:
            raise ValueError(f"CLIP text layers have {attn.num_heads} heads, the temporal module {block.heads}")
        block.qkv.weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        block.qkv.bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
        block.out_proj.load_state_dict(attn.out_proj.state_dict())
        block.ln_1.weight.copy_(layer.layer_norm1.weight)
        block.ln_1.bias.copy_(layer.layer_norm1.bias)
        block.ln_2.weight.copy_(layer.layer_norm2.weight)
        block.ln_2.bias.copy_(layer.layer_norm2.bias)
        block.fc.load_state_dict(layer.mlp.fc1.state_dict())
        block.proj.load_state_dict(layer.mlp.fc2.state_dict())
    return True


def temporal_for_backbone(
    backbone: nn.Module, layers: int = 4, heads: int | None = None, init_from_clip: bool = True
) -> TemporalTransformer:
    """seqTransf at the backbone's embedding width, initialised from its CLIP text transformer when widths match.

    `backbone` is a `CLIPBackbone` (`embed_dim`, `clip`). Heads default to CLIP's text heads when
    the widths match (the reference uses text width // 64), else width // 64 (at least 1).
    """
    width = int(backbone.embed_dim)
    text_cfg = backbone.clip.config.text_config
    if heads is None:
        heads = int(text_cfg.num_attention_heads) if int(text_cfg.hidden_size) == width else max(1, width // 64)
    module = TemporalTransformer(width, layers=layers, heads=heads, max_positions=int(text_cfg.max_position_embeddings))
    if init_from_clip:
        init_temporal_from_clip_text(module, backbone.clip)
    return module
