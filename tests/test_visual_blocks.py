"""The CLIP wrapper's extension point for methods that change the visual encoder: `wrap_visual_blocks`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tvr_bench.backbones.clip import VISUAL_BLOCK_PARTS, CLIPBackbone, VisualBlockWrapper


def _backbone() -> CLIPBackbone:
    torch.manual_seed(0)
    return CLIPBackbone("tiny").eval()


class Scaled(VisualBlockWrapper):
    """Multiplies the wrapped module's input by a constant."""

    def __init__(self, inner: nn.Module, factor: float):
        super().__init__(inner)
        self.factor = factor

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden * self.factor


@pytest.mark.parametrize("part", VISUAL_BLOCK_PARTS)
def test_identity_wrapper_leaves_every_output_unchanged(part: str):
    plain, wrapped = _backbone(), _backbone()
    px = torch.randn(3, 3, plain.image_size, plain.image_size)
    layers = len(wrapped.clip.vision_model.encoder.layers)
    wrappers = wrapped.wrap_visual_blocks(range(layers), VisualBlockWrapper, part=part)
    assert len(wrappers) == layers and wrapped.wrapped_visual_blocks == tuple(range(layers))
    with torch.no_grad():
        assert torch.equal(wrapped.encode_frames(px), plain.encode_frames(px))
        a, b = wrapped.encode_patches(px), plain.encode_patches(px)
    assert torch.equal(a["cls"], b["cls"]) and torch.equal(a["patches"], b["patches"])
    # same parameters, now reached through the wrapper
    names = dict(wrapped.named_parameters())
    assert any(f".{part}.inner." in n for n in names)
    assert sum(p.numel() for p in wrapped.parameters()) == sum(p.numel() for p in plain.parameters())


def test_gradients_reach_the_wrapped_modules_and_the_transform_applies():
    bb = _backbone()
    px = torch.randn(2, 3, bb.image_size, bb.image_size)
    before = bb.encode_patches(px)["patches"].detach()
    [wrapper] = bb.wrap_visual_blocks([-1], lambda m: Scaled(m, 0.5))
    last = bb.clip.vision_model.encoder.layers[-1]
    assert last.self_attn is wrapper and isinstance(wrapper.inner, nn.Module)
    assert bb.clip.vision_model.encoder.layers[0].self_attn is not wrapper
    out = bb.encode_patches(px)["patches"]
    assert (out - before).abs().max() > 1e-4  # the wrapper changed the attention input
    out.square().sum().backward()
    for p in wrapper.inner.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert bb.clip.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0  # and through it, upstream


def test_wrapped_mlp_is_called_positionally_and_wrappers_nest():
    bb = _backbone()
    px = torch.randn(2, 3, bb.image_size, bb.image_size)
    with torch.no_grad():
        plain = bb.encode_frames(px)
        bb.wrap_visual_blocks([0], lambda m: Scaled(m, 2.0), part="mlp")
        bb.wrap_visual_blocks([0], lambda m: Scaled(m, 0.5), part="mlp")  # 2 * 0.5: the identity again
        torch.testing.assert_close(bb.encode_frames(px), plain, rtol=0, atol=1e-6)


def test_bad_requests_are_refused_with_the_reason():
    bb = _backbone()
    n = len(bb.clip.vision_model.encoder.layers)
    with pytest.raises(ValueError, match="cannot wrap 'attention'"):
        bb.wrap_visual_blocks([0], VisualBlockWrapper, part="attention")
    with pytest.raises(ValueError, match=f"visual block {n} does not exist.*{n} layers"):
        bb.wrap_visual_blocks([n], VisualBlockWrapper)
    with pytest.raises(ValueError, match="listed twice"):
        bb.wrap_visual_blocks([0, -n], VisualBlockWrapper)
    with pytest.raises(TypeError, match="nn.Module"):
        bb.wrap_visual_blocks([0], lambda m: (lambda x: x))
    assert bb.wrapped_visual_blocks == ()  # nothing half-done


def test_last_block_attention_is_refused_once_wrapped():
    bb = _backbone()
    px = torch.randn(1, 3, bb.image_size, bb.image_size)
    bb.wrap_visual_blocks([0], VisualBlockWrapper)
    assert bb.encode_patches(px, output_attentions=True)["cls_attention"].shape == (1, bb.num_patches)
    bb.wrap_visual_blocks([-1], VisualBlockWrapper)
    with pytest.raises(ValueError, match="last visual block is wrapped"):
        bb.encode_patches(px, output_attentions=True)
