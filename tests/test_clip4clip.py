"""CLIP4Clip meanP against the reference head (clip4clip_heads.pt) and as a module."""

import torch
import torch.nn.functional as F

from tests.conftest import load_parity
from tvr_bench.functional.losses import symmetric_infonce
from tvr_bench.functional.pooling import mean_pool_normalised
from tvr_bench.methods.clip4clip import CLIP4Clip


def test_meanp_reproduces_reference_logits_and_loss():
    data = load_parity("clip4clip_heads.pt")
    case = data["meanP"]
    ls = case["state_dict"]["clip.logit_scale"]
    text = F.normalize(data["text_eot_feat"].squeeze(1), dim=-1)
    video = F.normalize(mean_pool_normalised(data["frame_feat"], data["video_mask"].bool()), dim=-1)
    cos = text @ video.t()
    torch.testing.assert_close(ls.exp() * cos, case["retrieve_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(symmetric_infonce(cos, ls), case["sym_loss"], atol=1e-5, rtol=0)


def test_module_similarity_is_blockwise_and_loss_has_gradients():
    torch.manual_seed(0)
    model = CLIP4Clip(backbone="tiny")
    size = model.backbone.image_size
    frames = torch.randn(3, 4, 3, size, size)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    tok = model.backbone.tokenize(["a red circle", "a blue square spins", "green"], 16)
    text, video = model.encode_text(**tok), model.encode_video(frames, mask)
    full = model.similarity(text, video)
    block = model.similarity({k: v[1:] for k, v in text.items()}, {k: v[:2] for k, v in video.items()})
    torch.testing.assert_close(block, full[1:, :2])
    # Padded frames do not change the video embedding.
    frames2 = frames.clone()
    frames2[1, 2:] = 7.0
    torch.testing.assert_close(model.encode_video(frames2, mask)["embeds"], video["embeds"], atol=1e-6, rtol=0)
    loss, _ = model.training_loss(text, video)
    loss.backward()
    assert model.backbone.clip.text_model.embeddings.token_embedding.weight.grad is not None
    assert model.backbone.logit_scale.grad is not None
