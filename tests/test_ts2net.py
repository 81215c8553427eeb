"""TS2-Net against the reference vectors (ts2net_shift_select_sim.pt) and its own invariants.

The parity file runs the reference's whole visual path on a tiny OpenAI-layout ViT; here the same weights are
converted into a transformers CLIPModel (saved with `save_pretrained`), loaded by our TS2Net module as any local
CLIP, token-shifted through the backbone's `wrap_visual_blocks` hook. The reference draws the top-k noise with
`torch.normal` right after the seed the file records (its first random draw); the tests replay that draw and
check that it gives the saved indicator before comparing anything downstream.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import load_parity, parity_atol, parity_dir
from tvr_bench.functional.temporal import temporal_state_from_reference
from tvr_bench.functional.ts2net import (
    class_positions,
    frame_weighted_similarity,
    frame_weighted_similarity_blocked,
    hard_topk,
    item_noise,
    item_seed,
    pair_bytes,
    perturbed_topk,
    reference_token_mask,
    select_tokens,
    shift_indices,
    token_mask,
    token_shift,
)

FILE = "ts2net_shift_select_sim.pt"
SELECTOR = "visual_token_selector.score_predictor."


# ------------------------------------------------------------------------------------ reference model
def _openai_visual_to_hf(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """The reference's `clip.visual.*` / `clip.logit_scale` weights under transformers CLIPModel names."""
    p = "clip.visual."
    out = {
        "vision_model.embeddings.class_embedding": state[p + "class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state[p + "positional_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state[p + "conv1.weight"],
        "visual_projection.weight": state[p + "proj"].t(),
        "logit_scale": state["clip.logit_scale"],
    }
    for ours, theirs in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for kind in ("weight", "bias"):
            out[f"vision_model.{ours}.{kind}"] = state[f"{p}{theirs}.{kind}"]
    for i in range(layers):
        src, dst = f"{p}transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        attn = src + ("attn.net." if src + "attn.net.in_proj_weight" in state else "attn.")  # shifted blocks wrap attn
        for name, w, b in zip("qkv", state[attn + "in_proj_weight"].chunk(3), state[attn + "in_proj_bias"].chunk(3)):
            out[f"{dst}self_attn.{name}_proj.weight"], out[f"{dst}self_attn.{name}_proj.bias"] = w, b
        for kind in ("weight", "bias"):
            out[f"{dst}self_attn.out_proj.{kind}"] = state[f"{attn}out_proj.{kind}"]
            for ours, theirs in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{dst}{ours}.{kind}"] = state[f"{src}{theirs}.{kind}"]
    return out


def _save_reference_clip(data: dict, out: Path) -> Path:
    """A transformers CLIP with the file's vision tower (any text tower of the embedding width), saved to `out`."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    meta = data["meta"]
    width, dim = meta["vision_width"], meta["D"]
    vision = CLIPVisionConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=meta["vision_layers"],
                              num_attention_heads=meta["vision_heads"], image_size=meta["image_resolution"],
                              patch_size=meta["patch_size"], hidden_act="quick_gelu", layer_norm_eps=1e-5)  # fmt: skip
    text = CLIPTextConfig(hidden_size=dim, intermediate_size=4 * dim, num_hidden_layers=1,
                          num_attention_heads=meta["transformerClip_heads"], max_position_embeddings=77)  # fmt: skip
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=dim))
    result = model.load_state_dict(_openai_visual_to_hf(data["state_dict"], meta["vision_layers"]), strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if k.startswith(("vision_model", "visual"))]
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, object]:
    """The parity file and a TS2Net module holding its weights (reference mask layout, perturbed test selection)."""
    from tvr_bench.methods.ts2net import TS2Net

    data = load_parity(FILE)
    meta, state = data["meta"], data["state_dict"]
    path = _save_reference_clip(data, tmp_path_factory.mktemp("ts2net-clip") / "clip")
    model = TS2Net(
        backbone=str(path), shift_layers=list(meta["shift_layers"]), shift_div=meta["n_div"], topk=meta["topk_visual"],
        perturbed_samples=meta["perturbed_topk_num_samples"], perturbed_sigma=meta["perturbed_topk_sigma"],
        temporal_layers=meta["cross_num_hidden_layers"], temporal_heads=meta["transformerClip_heads"],
        eval_selection="perturbed", mask_layout="reference",
    )  # fmt: skip
    model.token_scorer.load_state_dict({k[len(SELECTOR):]: v for k, v in state.items() if k.startswith(SELECTOR)})
    model.temporal.load_state_dict(temporal_state_from_reference(state))
    assert model.backbone.wrapped_visual_blocks == tuple(meta["shift_layers"])
    return data, model


def _video(data: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The dataloader layout [B, pair, bs, ts, 3, H, W] as frames [B, F, 3, H, W] (F = pair * bs * ts) and the mask."""
    video = data["inputs"]["video"]
    return video.reshape(video.shape[0], -1, *video.shape[-3:]), data["inputs"]["video_mask"]


def _replayed_noise(seed: int, items: int, meta: dict, candidates: int) -> torch.Tensor:
    """The reference's first draw after `torch.manual_seed(seed)`: `torch.normal(0, 1, (items, samples, candidates))`."""
    torch.manual_seed(seed)
    return torch.normal(mean=0.0, std=1.0, size=(items, meta["perturbed_topk_num_samples"], candidates))


def _scale(model) -> torch.Tensor:
    return model.backbone.logit_scale.exp()


def _final(meta: dict, semantic: torch.Tensor, global_: torch.Tensor) -> torch.Tensor:
    """`get_final_similarity`: frame_match_weight * semantic + (1 - weight) * global."""
    w = float(meta["frame_match_weight"])
    return w * semantic + (1 - w) * global_


# ------------------------------------------------------------------------------------ parity
def test_token_shift_matches_reference():
    data = load_parity(FILE)
    case = data["patch_shift_module"]
    atol = parity_atol(case)
    x = case["x_LND"].permute(1, 0, 2)  # LND -> [images, tokens, channels]
    ours = token_shift(x, int(case["video_frame"]), int(case["n_div"])).permute(1, 0, 2)
    torch.testing.assert_close(ours, case["shifted_LND"], atol=atol, rtol=0)
    left, right = shift_indices(x.shape[1], int(case["n_div"]))
    moved = (case["shifted_LND"] != case["x_LND"]).any(-1).any(-1)  # tokens that changed in some frame
    assert set(moved.nonzero().flatten().tolist()) <= set(left.tolist()) | set(right.tolist())


def test_training_forward_loss_and_gradients_match_reference(reference):
    data, model = reference
    meta, case = data["meta"], data["train"]
    atol = parity_atol(case)
    frames, mask = _video(data)
    model.train()
    model.zero_grad()
    tokens = model.visual_tokens(frames)
    scores = model.token_scorer(tokens)
    torch.testing.assert_close(scores, case["pred_score"], atol=atol, rtol=0)
    noise = _replayed_noise(int(case["torch_manual_seed"]), tokens.shape[0], meta, tokens.shape[1] - 1)
    indicator = perturbed_topk(scores[:, 1:], meta["topk_visual"], noise, meta["perturbed_topk_sigma"])
    assert torch.equal(indicator.detach(), case["topk_indicator"]), "the replayed noise is not the reference's draw"
    selected = model.select(tokens, frames.shape[0], noise=noise)
    torch.testing.assert_close(selected, case["selected_tokens"], atol=atol, rtol=0)
    video = dict(zip(("frames", "frame_mask"), model.aggregate(selected, mask)))
    torch.testing.assert_close(video["frames"], case["frame_feat_after_seqTransf"], atol=atol, rtol=0)
    text = {"embeds": data["inputs"]["text_eot_feat"]}
    sims = frame_weighted_similarity(text["embeds"], video["frames"], video["frame_mask"])
    scale = _scale(model)
    torch.testing.assert_close(scale * sims, case["sim_semantic"], atol=atol, rtol=0)
    torch.testing.assert_close(scale * sims, case["sim_global"], atol=atol, rtol=0)  # one text token: the same formula
    loss, _ = model.training_loss(text, video)
    torch.testing.assert_close(loss, case["loss"], atol=atol, rtol=0)
    loss.backward()
    params = {"clip.logit_scale": model.backbone.logit_scale}
    params.update({SELECTOR + n: p for n, p in model.token_scorer.named_parameters()})
    assert set(case["grads"]) <= set(params), set(case["grads"]) - set(params)
    for name, grad in case["grads"].items():
        torch.testing.assert_close(params[name].grad, grad, atol=atol, rtol=0, msg=name)


def _noise_seed_offset() -> int | None:
    """The seed offset of `sim_final_other_noise_seed`, as the parity README states it ("seed +N")."""
    readme = parity_dir() / "README.md"
    if not readme.exists():
        return None
    text = readme.read_text()
    m = re.search(r"sim_final_other_noise_seed`\s*\(seed\s*\+(\d+)\)", text[text.find(FILE):])
    return int(m.group(1)) if m else None


def _eval_scores(model, data: dict, seed: int, budget_mb: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Test-time scores (unscaled) of the file's eval texts x videos with the reference's draw for `seed`."""
    from tvr_bench.callbacks.evaluator import blocked_similarity

    meta = data["meta"]
    frames, mask = _video(data)
    model.eval()
    with torch.no_grad():
        tokens = model.visual_tokens(frames)
        noise = _replayed_noise(seed, tokens.shape[0], meta, tokens.shape[1] - 1)
        indicator = perturbed_topk(model.token_scorer(tokens)[:, 1:], meta["topk_visual"], noise, meta["perturbed_topk_sigma"])
        out, fmask = model.aggregate(model.select(tokens, frames.shape[0], noise=noise), mask)
        video = {"frames": out, "frame_mask": fmask}
        text = {"embeds": F.normalize(data["eval"]["text_eot_feat"], dim=-1)}
        if budget_mb is None:
            return indicator, model.similarity(text, video)
        return indicator, blocked_similarity(model, text, video, budget_mb)


def test_eval_scores_and_blockwise_loop_match_reference(reference):
    data, model = reference
    meta, case = data["meta"], data["eval"]
    atol = parity_atol(case)
    seed = int(case["torch_manual_seed"])
    indicator, sims = _eval_scores(model, data, seed)
    assert torch.equal(indicator, case["topk_indicator"]), "the replayed noise is not the reference's draw"
    scale = _scale(model).detach()
    torch.testing.assert_close(scale * _final(meta, sims, sims), case["sim_final"], atol=atol, rtol=0)
    torch.testing.assert_close(scale * sims, case["sim_global_unused"], atol=atol, rtol=0)
    # the evaluator's memory-bounded blocks (one pair per block, then two) give the same matrix
    n_frames = data["inputs"]["video_mask"].shape[1]
    for budget in (pair_bytes(n_frames) / 2**20, 2 * pair_bytes(n_frames) / 2**20, 1.0):
        _, blocked = _eval_scores(model, data, seed, budget_mb=budget)
        torch.testing.assert_close(scale * blocked, case["sim_final"], atol=atol, rtol=0, msg=f"budget {budget} MiB")
    offset = _noise_seed_offset()
    if offset is None:
        pytest.skip("the parity README states no seed for sim_final_other_noise_seed")
    _, other = _eval_scores(model, data, seed + offset)
    torch.testing.assert_close(scale * other, case["sim_final_other_noise_seed"], atol=atol, rtol=0)
    change = float((scale * (other - sims)).abs().max())
    assert change == pytest.approx(float(case["max_abs_change_other_noise_seed"]), abs=atol)


def test_paper_mask_layout_changes_only_the_padded_video(reference):
    """`mask_layout: per_frame` (the paper) vs the reference's tiled mask: same frames for unpadded videos."""
    data, model = reference
    meta = data["meta"]
    frames, mask = _video(data)
    model.eval()
    with torch.no_grad():
        tokens = model.visual_tokens(frames)
        noise = _replayed_noise(int(data["eval"]["torch_manual_seed"]), tokens.shape[0], meta, tokens.shape[1] - 1)
        selected = model.select(tokens, frames.shape[0], noise=noise)
        tiled, tiled_mask = model.aggregate(selected, mask)
        model.mask_layout = "per_frame"
        try:
            ours, ours_mask = model.aggregate(selected, mask)
        finally:
            model.mask_layout = "reference"
    assert torch.equal(ours_mask, mask.bool())
    full = mask.bool().all(-1)
    assert full.any() and (~full).any(), "the file should hold padded and unpadded videos"
    torch.testing.assert_close(ours[full], tiled[full], atol=1e-6, rtol=0)
    assert (ours[~full] - tiled[~full]).abs().max() > 1e-3
    assert not torch.equal(tiled_mask[~full], mask.bool()[~full])  # the reference scores padded frames as real ones


# ------------------------------------------------------------------------------------ invariants
def test_token_shift_on_a_readable_example():
    # 2 videos x 3 frames, 8 tokens of width 1 whose value is 100 * video + 10 * frame + token
    x = torch.tensor([[[100 * v + 10 * f + t] for t in range(8)] for v in range(2) for f in range(3)], dtype=torch.float32)
    out = token_shift(x, frames=3, n_div=7).view(2, 3, 8)
    x = x.view(2, 3, 8)
    assert shift_indices(8, 7)[0].tolist() == [1, 2, 3, 4, 5, 6, 7] and shift_indices(8, 7)[1].tolist() == [4, 5, 6, 7]
    assert torch.equal(out[:, :, 0], x[:, :, 0])  # the class token never moves
    assert torch.equal(out[:, 1:, 1:4], x[:, :-1, 1:4])  # left group: from the previous frame
    assert torch.equal(out[:, 0, 1:4], x[:, 0, 1:4])  # first frame keeps its own
    assert torch.equal(out[:, :-1, 4:], x[:, 1:, 4:])  # right group wins where both apply: from the next frame
    assert torch.equal(out[:, -1, 4:], x[:, -2, 4:])  # last frame: only the left shift applies there
    assert torch.equal(token_shift(x.view(6, 8, 1), frames=1), x.view(6, 8, 1))  # one frame: nothing to shift
    with pytest.raises(ValueError, match="whole number of videos"):
        token_shift(x.view(6, 8, 1), frames=4)
    with pytest.raises(ValueError, match="at least n_div=7 tokens"):
        token_shift(torch.zeros(2, 5, 1), frames=2)


def test_perturbed_topk_forward_and_gradient_equal_their_definition():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 9, generator=g).tanh().requires_grad_(True)
    noise = torch.randn(4, 50, 9, generator=g)
    k, sigma = 3, 0.3
    ind = perturbed_topk(scores, k, noise, sigma)
    # the definition: mean over samples of the one-hot of the sorted top-k indices
    idx = (scores.detach()[:, None] + sigma * noise).topk(k, dim=-1).indices.sort(-1).values
    onehot = F.one_hot(idx, 9).float()  # [N, S, k, P]
    torch.testing.assert_close(ind, onehot.mean(1))
    torch.testing.assert_close(ind.sum(-1), torch.ones(4, k))  # every row picks one candidate
    upstream = torch.randn(4, k, 9, generator=g)
    (grad,) = torch.autograd.grad(ind, scores, upstream)
    expected = torch.einsum("bkd,bkd->bd", upstream, torch.einsum("bnkd,bnd->bkd", onehot, noise) / 50 / sigma)
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5)


def test_perturbed_topk_tends_to_the_hard_topk_and_hard_topk_is_sorted():
    scores = torch.tensor([[0.9, -0.5, 0.1, 0.8, 0.3], [0.0, 0.7, -0.2, 0.6, 0.5]])
    hard = hard_topk(scores, 2)
    assert hard.argmax(-1).tolist() == [[0, 3], [1, 3]]  # ascending positions, not score order
    tiny = perturbed_topk(scores, 2, torch.randn(2, 100, 5, generator=torch.Generator().manual_seed(1)), sigma=1e-4)
    torch.testing.assert_close(tiny, hard)
    with pytest.raises(ValueError, match="k=6"):
        hard_topk(scores, 6)
    with pytest.raises(ValueError, match="does not match"):
        perturbed_topk(scores, 2, torch.zeros(2, 10, 4))


def test_item_noise_depends_on_the_item_alone():
    a = item_noise([item_seed(0, "eval", "v1"), item_seed(0, "eval", "v2")], frames=3, samples=5, candidates=4)
    b = item_noise([item_seed(0, "eval", "v9"), item_seed(0, "eval", "v2")], frames=3, samples=5, candidates=4)
    c = item_noise([item_seed(1, "eval", "v2")], frames=3, samples=5, candidates=4)
    assert torch.equal(a[3:], b[3:])  # v2's draw whatever shares its batch
    assert not torch.equal(a[:3], b[:3]) and not torch.equal(a[3:], c)
    assert item_seed(0, "eval", "v2") == item_seed(0, "eval", "v2") < 2**63


def _direct_score(t: torch.Tensor, v: torch.Tensor, m: torch.Tensor) -> float:
    """The frame-weighted score of one pair, written out."""
    s = torch.stack([F.cosine_similarity(t, f, dim=0) for f in v])
    w = torch.where(m, s, torch.zeros(())) / torch.where(m, s, torch.zeros(())).norm()
    w = torch.softmax(torch.where(m, 4 * w, torch.full_like(w, float("-inf"))), dim=0)
    return float((w * s).sum())


def test_frame_weighted_similarity_blocks_slices_and_padding():
    g = torch.Generator().manual_seed(2)
    text, frames = torch.randn(7, 16, generator=g), torch.randn(5, 6, 16, generator=g)
    mask = torch.rand(5, 6, generator=g) < 0.7
    mask[:, 0] = True
    full = frame_weighted_similarity(text, frames, mask)
    for i in (0, 3, 6):
        for j in (0, 2, 4):
            assert full[i, j].item() == pytest.approx(_direct_score(text[i], frames[j], mask[j]), abs=1e-6)
    for chunk in (1, pair_bytes(6), 7 * pair_bytes(6), 10**9):
        blocked = frame_weighted_similarity_blocked(text, frames, mask, chunk_bytes=chunk)
        torch.testing.assert_close(blocked, full, atol=1e-6, rtol=0, msg=f"chunk {chunk}")
    rows, cols = torch.tensor([4, 0, 6]), torch.tensor([3, 1])
    torch.testing.assert_close(frame_weighted_similarity(text[rows], frames[cols], mask[cols]), full[rows][:, cols], atol=1e-6, rtol=0)
    poked = frames.clone()
    poked[~mask] = 50.0  # padded frames' features change nothing
    torch.testing.assert_close(frame_weighted_similarity(text, poked, mask), full, atol=1e-6, rtol=0)


def test_token_masks_and_class_positions():
    mask = torch.tensor([[True, True, False]])
    assert token_mask(mask, 2).tolist() == [[True, True, True, True, False, False]]
    assert reference_token_mask(mask, 2).tolist() == [[True, True, False, True, True, False]]
    tokens = torch.arange(6.0).view(1, 6, 1)
    assert class_positions(tokens, 2).flatten().tolist() == [0.0, 2.0, 4.0]
    sel = select_tokens(torch.arange(12.0).view(1, 4, 3), torch.tensor([[[0.0, 1.0, 0.0], [0.5, 0.0, 0.5]]]))
    assert sel.tolist() == [[[0.0, 1.0, 2.0], [6.0, 7.0, 8.0], [6.0, 7.0, 8.0]]]


# ------------------------------------------------------------------------------------ module
def _tiny(**kwargs):
    from tvr_bench.methods.ts2net import TS2Net

    torch.manual_seed(0)
    return TS2Net(backbone="tiny", **kwargs)


def _batch(model, n: int = 3, frames: int = 5):
    g = torch.Generator().manual_seed(3)
    size = model.backbone.image_size
    pixels = torch.randn(n, frames, 3, size, size, generator=g)
    mask = torch.ones(n, frames, dtype=torch.bool)
    mask[1, 3:] = False
    tok = model.backbone.tokenize(["a red circle moves left", "a blue square", "green"][:n], 12)
    return pixels, mask, tok


def test_module_declares_its_protocol_and_refuses_bad_settings():
    from tvr_bench.methods.base import RetrievalModule
    from tvr_bench.methods.ts2net import TS2Net

    assert set(TS2Net.DATA_PROTOCOL) == set(RetrievalModule.DATA_PROTOCOL)
    assert TS2Net.SCORING_OPTIONS == {"eval_selection": ("hard", "perturbed"), "mask_layout": ("per_frame", "reference")}
    for key, values in TS2Net.SCORING_OPTIONS.items():  # the default comes first
        import inspect

        assert inspect.signature(TS2Net.__init__).parameters[key].default == values[0]
    with pytest.raises(ValueError, match="eval_selection"):
        _tiny(eval_selection="noisy")
    with pytest.raises(ValueError, match="mask_layout"):
        _tiny(mask_layout="tiled")
    with pytest.raises(ValueError, match="topk must be in 1..16"):
        _tiny(topk=17)
    model = _tiny()
    with pytest.raises(ValueError, match="needs pixels"):
        model.encode_video(torch.randn(2, model.backbone.embed_dim), torch.ones(2, 1, dtype=torch.bool))
    size = model.backbone.image_size
    with pytest.raises(ValueError, match="at most 19 frames"):
        model.eval().encode_video(torch.randn(1, 20, 3, size, size), torch.ones(1, 20, dtype=torch.bool))


@pytest.mark.parametrize("selection", ["hard", "perturbed"])
def test_eval_features_and_scores_depend_on_the_item_alone(selection: str):
    model = _tiny(eval_selection=selection).eval()
    pixels, mask, tok = _batch(model)
    with torch.no_grad():
        text = model.encode_text(**tok)
        video = model.encode_video(pixels, mask, video_keys=["a", "b", "c"])
        # video "b" alone, and in another batch: the same features (its draws come from its key)
        alone = model.encode_video(pixels[1:2], mask[1:2], video_keys=["b"])
        other = model.encode_video(pixels.flip(0), mask.flip(0), video_keys=["c", "b", "a"])
        torch.testing.assert_close(alone["frames"][0], video["frames"][1], atol=1e-5, rtol=0)
        torch.testing.assert_close(other["frames"][1], video["frames"][1], atol=1e-5, rtol=0)
        full = model.similarity(text, video)
        block = model.similarity({k: v[1:] for k, v in text.items()}, {k: v[:2] for k, v in video.items()})
        torch.testing.assert_close(block, full[1:, :2], atol=1e-6, rtol=0)
        again = model.similarity(text, model.encode_video(pixels, mask, video_keys=["a", "b", "c"]))
        assert torch.equal(again, full)  # deterministic for a given noise_seed
        if selection == "perturbed":
            model.noise_seed = 1
            moved = model.similarity(text, model.encode_video(pixels, mask, video_keys=["a", "b", "c"]))
            assert (moved - full).abs().max() > 0  # another seed, another draw
    assert model.pair_cost_bytes(text, video) == pair_bytes(pixels.shape[1])


def test_training_loss_reaches_every_trained_part():
    model = _tiny().train()
    pixels, mask, tok = _batch(model)
    batch = {"captions": ["a red circle moves left", "a blue square", "green"], "frames": pixels, "frame_mask": mask,
             "video_key": ["a", "b", "c"]}  # fmt: skip
    text, video = model.training_features(batch)
    loss, extra = model.training_loss(text, video)
    assert torch.isfinite(loss) and extra == {}
    loss.backward()
    shifted = model.backbone.clip.vision_model.encoder.layers[-1].self_attn
    parts = {
        "logit_scale": model.backbone.logit_scale,
        "token scorer": model.token_scorer.out_conv[2].weight,
        "scorer input": model.token_scorer.in_conv[1].weight,
        "temporal": model.temporal.blocks[0].qkv.weight,
        "shifted block": shifted.inner.q_proj.weight,
        "text tower": model.backbone.clip.text_projection.weight,
    }
    for name, p in parts.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # a training step's draw depends on the step and the key: the same batch again gives the same loss
    text2, video2 = model.training_features(batch)
    torch.testing.assert_close(model.training_loss(text2, video2)[0], loss)


def test_token_shift_changes_the_video_features():
    """The shifted blocks mix neighbouring frames: a change to frame 0 reaches frame 1's features."""
    model = _tiny().eval()
    pixels, mask, _ = _batch(model)
    with torch.no_grad():
        tokens = model.visual_tokens(pixels)
        poked = pixels.clone()
        poked[0, 0] += 1.0
        after = model.visual_tokens(poked)
    f = pixels.shape[1]
    assert (after[1] - tokens[1]).abs().max() > 1e-4  # video 0, frame 1
    assert torch.equal(after[f:], tokens[f:])  # other videos untouched


def test_perf_scorer_variants_give_the_same_matrix():
    """`make perf`'s TS2-Net section: the evaluator path (forced into many blocks here), the one-shot math and the
    reference's op sequence score the same matrix."""
    from tvr_bench.perf.ts2net_scorer import VARIANTS, run_variant

    results = {v: run_variant(v, n=40, frames=6, d=16, budget_mb=0.002, seed=0, threads=None) for v in VARIANTS}
    ref = results["one_shot"]["sim"]
    assert ref.shape == (40, 40) and ref.diagonal().mean() > ref.mean()  # paired items score higher
    for variant, res in results.items():
        torch.testing.assert_close(res["sim"], ref, atol=1e-6, rtol=0, msg=variant)
        assert res["seconds"] > 0 and res["peak_extra_mib"] >= 0
