"""The CLIP backbone: offline tokenizer ids, feature shapes, masked patch forward, local loading."""

import pytest
import torch

from tvr_bench.backbones.clip import CLIPBackbone, load_clip
from tvr_bench.backbones.tokenizer import offline_clip_tokenizer


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return CLIPBackbone("tiny").eval()


def test_tokenizer_gives_openai_ids():
    tok = offline_clip_tokenizer()
    assert len(tok) == 49408
    # Ids of OpenAI's `clip.tokenize` for these strings (start 49406, end 49407).
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("hello world")["input_ids"] == [49406, 3306, 1002, 49407]


def test_tokenize_pads_and_truncates_to_max_words(backbone):
    out = backbone.tokenize(["a red circle", "one two three four five six seven eight nine ten"], max_words=6)
    assert out["input_ids"].shape == (2, 6)
    assert out["input_ids"][1, -1].item() == 49407, "truncation must keep the end token"
    assert out["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 0]


def test_feature_shapes(backbone):
    tok = backbone.tokenize(["a red circle moves left", "a blue square"], max_words=32)
    text = backbone.encode_text(**tok)
    d = backbone.embed_dim
    assert text["embeds"].shape == (2, d)
    assert text["tokens"].shape == (2, 32, d)
    assert text["token_mask"].dtype == torch.bool
    # The end-token state of the projected tokens is the pooled embedding.
    eot = tok["attention_mask"].sum(1) - 1
    torch.testing.assert_close(text["tokens"][torch.arange(2), eot], text["embeds"], atol=1e-5, rtol=0)
    px = torch.randn(3, 3, backbone.image_size, backbone.image_size)
    assert backbone.encode_frames(px).shape == (3, d)


def test_patch_forward_sees_only_kept_patches(backbone):
    px = torch.randn(2, 3, backbone.image_size, backbone.image_size)
    full = backbone.encode_patches(px, output_attentions=True)
    assert full["patches"].shape == (2, backbone.num_patches, backbone.embed_dim)
    torch.testing.assert_close(full["cls"], backbone.encode_frames(px), atol=1e-5, rtol=0)
    attn = full["cls_attention"]  # class-token attention over patches: non-negative, sums below 1 (CLS keeps some)
    assert attn.shape == (2, backbone.num_patches) and (attn >= 0).all() and (attn.sum(-1) < 1).all()
    keep = torch.tensor([[0, 3, 5, 7], [1, 2, 4, 6]])
    kept = backbone.encode_patches(px, keep_index=keep)
    assert kept["patches"].shape == (2, 4, backbone.embed_dim)
    # Changing a dropped patch's pixels changes nothing; changing a kept one does.
    p = backbone.image_size // int(backbone.num_patches**0.5)
    px2 = px.clone()
    px2[0, :, 0:p, p : 2 * p] += 5.0  # patch 1 of image 0: dropped
    torch.testing.assert_close(backbone.encode_patches(px2, keep_index=keep)["cls"], kept["cls"])
    px3 = px.clone()
    px3[0, :, 0:p, 0:p] += 5.0  # patch 0 of image 0: kept
    assert not torch.allclose(backbone.encode_patches(px3, keep_index=keep)["cls"][0], kept["cls"][0])


def test_loads_from_local_directory(tmp_path, backbone):
    backbone.clip.save_pretrained(tmp_path / "clip")
    backbone.tokenizer.save_pretrained(tmp_path / "clip")
    loaded = CLIPBackbone(str(tmp_path / "clip")).eval()
    px = torch.randn(2, 3, backbone.image_size, backbone.image_size)
    torch.testing.assert_close(loaded.encode_frames(px), backbone.encode_frames(px))
    assert loaded.tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_clip(str(tmp_path / "nope") + "/")
