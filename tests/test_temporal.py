"""seqTransf temporal module: CLIP4Clip parity (clip4clip_heads.pt), masking, CLIP-text initialisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import load_parity
from tvr_bench.functional.losses import symmetric_infonce
from tvr_bench.functional.temporal import (
    TemporalTransformer,
    init_temporal_from_clip_text,
    key_padding_bias,
    temporal_state_from_reference,
)

ATOL = 1e-5  # parity README: float32 outputs compare at atol 1e-5


def _meanp_logits(text: torch.Tensor, frames: torch.Tensor, mask: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP4Clip meanP head, scaled like the reference (also at eval)."""
    m = mask.to(frames.dtype).unsqueeze(-1)
    video = F.normalize((F.normalize(frames, dim=-1) * m).sum(1) / m.sum(1), dim=-1)
    return logit_scale.exp() * F.normalize(text.squeeze(1), dim=-1) @ video.t()


def _reference_module(data: dict) -> TemporalTransformer:
    cfg = data["seqTransf_config"]
    module = TemporalTransformer(
        cfg["width"], layers=cfg["layers"], heads=cfg["heads"], max_positions=cfg["max_position_embeddings"]
    )
    state = temporal_state_from_reference(data["seqTransf"]["state_dict"])
    module.load_state_dict(state, strict=True)
    return module.eval()


def test_seqtransf_matches_clip4clip_heads():
    data = load_parity("clip4clip_heads.pt")
    module = _reference_module(data)
    mask = data["video_mask"].bool()
    with torch.no_grad():
        frames = module(data["frame_feat"], mask)
        logits = _meanp_logits(data["text_eot_feat"], frames, mask, data["logit_scale_param"])
    ref = data["seqTransf"]
    torch.testing.assert_close(logits, ref["retrieve_logits"], atol=ATOL, rtol=0)
    loss = symmetric_infonce(logits / data["logit_scale_param"].exp(), data["logit_scale_param"])
    torch.testing.assert_close(loss, ref["sym_loss"], atol=ATOL, rtol=0)


def test_meanp_matches_clip4clip_heads():
    data = load_parity("clip4clip_heads.pt")
    logits = _meanp_logits(data["text_eot_feat"], data["frame_feat"], data["video_mask"].bool(), data["logit_scale_param"])
    torch.testing.assert_close(logits, data["meanP"]["retrieve_logits"], atol=ATOL, rtol=0)
    loss = symmetric_infonce(logits / data["logit_scale_param"].exp(), data["logit_scale_param"])
    torch.testing.assert_close(loss, data["meanP"]["sym_loss"], atol=ATOL, rtol=0)


def test_padded_frames_do_not_affect_real_frames():
    data = load_parity("clip4clip_heads.pt")
    module = _reference_module(data)
    mask = data["video_mask"].bool()
    assert (~mask).any(), "the parity file should contain short videos"
    noisy = data["frame_feat"].clone()
    noisy[~mask] = 100.0 * torch.randn_like(noisy[~mask])
    with torch.no_grad():
        a, b = module(data["frame_feat"], mask), module(noisy, mask)
    torch.testing.assert_close(a[mask], b[mask], atol=ATOL, rtol=0)


def test_residual_and_gradients():
    torch.manual_seed(0)
    module = TemporalTransformer(16, layers=2, heads=4)
    frames = torch.randn(3, 5, 16, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    out = module(frames, mask)
    assert out.shape == frames.shape
    out.pow(2).sum().backward()
    assert frames.grad is not None and torch.isfinite(frames.grad).all()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for block in module.blocks:  # zero blocks -> pure residual plus position embedding
        for p in block.parameters():
            p.data.zero_()
    with torch.no_grad():
        torch.testing.assert_close(module(frames, mask), 2 * frames + module.position_embedding.weight[:5])


def test_init_from_clip_text_reproduces_clip_layers():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPTextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    text = transformers.CLIPTextModel(cfg).eval()
    module = TemporalTransformer(32, layers=2, heads=4, ln_eps=cfg.layer_norm_eps).eval()
    assert init_temporal_from_clip_text(module, text)
    tower = getattr(text, "text_model", text)  # transformers 5 flattens CLIPTextModel
    torch.testing.assert_close(module.position_embedding.weight, tower.embeddings.position_embedding.weight)
    frames = torch.randn(2, 6, 32)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        ours = module(frames, mask)
        x = frames + tower.embeddings.position_embedding.weight[:6]
        bias = key_padding_bias(mask).expand(-1, 1, 6, -1)
        for layer in tower.encoder.layers[:2]:
            out = layer(x, bias)
            x = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(ours, x + frames, atol=ATOL, rtol=0)


def test_init_from_clip_text_skips_other_widths():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPTextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    module = TemporalTransformer(16, layers=1, heads=2)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    assert not init_temporal_from_clip_text(module, transformers.CLIPTextModel(cfg))
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_clip4clip_seqtransf_head_module():
    from tvr_bench.methods.clip4clip import CLIP4Clip

    torch.manual_seed(0)
    model = CLIP4Clip(backbone="tiny", head="seqTransf")
    assert model.method_name == "clip4clip_seqtransf"
    tower = model.backbone.clip.text_model
    torch.testing.assert_close(model.temporal.position_embedding.weight, tower.embeddings.position_embedding.weight)
    size = model.backbone.image_size
    frames = torch.randn(3, 4, 3, size, size)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    tok = model.backbone.tokenize(["a red circle", "a blue square spins", "green"], 16)
    text, video = model.encode_text(**tok), model.encode_video(frames, mask)
    full = model.similarity(text, video)
    torch.testing.assert_close(
        model.similarity({k: v[1:] for k, v in text.items()}, {k: v[:2] for k, v in video.items()}), full[1:, :2]
    )
    frames2 = frames.clone()
    frames2[1, 2:] = 7.0
    torch.testing.assert_close(model.encode_video(frames2, mask)["embeds"], video["embeds"], atol=1e-5, rtol=0)
    loss, _ = model.training_loss(text, video)
    loss.backward()
    assert model.temporal.blocks[0].qkv.weight.grad is not None
    names = {g["name"]: g for g in model.param_groups()}
    head_params = {id(p) for n, g in names.items() if n.startswith("head") for p in g["params"]}
    assert all(id(p) in head_params for p in model.temporal.parameters())
