"""MASCOT: informed masks, masked forward, completion and co-learning losses, ablation switches, module."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tvr_bench.functional.losses import symmetric_infonce
from tvr_bench.functional.mascot import (
    CompletionPredictor,
    informed_mask,
    mutual_colearning_loss,
    num_masked,
    semantic_completion_loss,
    text_patch_scores,
)
from tests.data_fixtures import tiny_root  # noqa: F401 - pytest fixture
from tvr_bench.methods.mascot import MASCOT

CAPTIONS = ["a red circle moves left", "a blue square spins", "green triangle", "yellow dots fade"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one intra-op thread is much faster than two on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(**kwargs) -> MASCOT:
    torch.manual_seed(0)
    return MASCOT(backbone="tiny", **kwargs)


def _batch(model: MASCOT, padded: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict, dict]:
    """Frames [4, 3, ...], frame mask, normalised text features and raw backbone text outputs."""
    g = torch.Generator().manual_seed(1)
    s = model.backbone.image_size
    frames = torch.randn(4, 3, 3, s, s, generator=g)
    mask = torch.ones(4, 3, dtype=torch.bool)
    if padded:
        mask[1, 2:] = False
        mask[2, 1:] = False
    raw = model.backbone.encode_text(**model.backbone.tokenize(CAPTIONS, 16))
    return frames, mask, {"embeds": F.normalize(raw["embeds"], dim=-1)}, raw


def _views(model: MASCOT, frames, mask, text, raw) -> dict:
    return model.training_views(frames, mask, text["embeds"], raw["tokens"], raw["token_mask"])


# ------------------------------------------------------------------------------------------ masks
@pytest.mark.parametrize("ratio", [0.25, 0.3, 0.5, 0.75])
def test_informed_masks_hide_exactly_the_top_and_bottom_scored_patches(ratio):
    scores = torch.rand(6, 16, generator=torch.Generator().manual_seed(0))
    k = round(ratio * 16)
    assert num_masked(16, ratio) == k
    for informed, largest in (("high", True), ("low", False)):
        keep, hidden = informed_mask(scores, ratio, informed)
        assert keep.shape == (6, 16 - k) and hidden.shape == (6, k)
        expected = scores.topk(k, dim=-1, largest=largest).indices.sort(-1).values
        assert torch.equal(hidden, expected), informed
        assert torch.equal(keep, keep.sort(-1).values)
        both = torch.cat([keep, hidden], -1).sort(-1).values
        assert torch.equal(both, torch.arange(16).expand(6, 16))
        # Every hidden patch of a high mask outscores every kept one (the reverse for low).
        lo = scores.gather(1, hidden).min(-1).values if largest else scores.gather(1, keep).min(-1).values
        hi = scores.gather(1, keep).max(-1).values if largest else scores.gather(1, hidden).max(-1).values
        assert (lo > hi).all()


def test_mask_ratio_edges():
    scores = torch.rand(2, 16)
    keep, hidden = informed_mask(scores, 0.0, "high")
    assert keep.shape == (2, 16) and hidden.shape == (2, 0)
    assert num_masked(16, 0.99) == 15, "at least one patch stays visible"
    with pytest.raises(ValueError):
        num_masked(16, 1.0)
    with pytest.raises(ValueError):
        informed_mask(scores, 0.5, "middle")


def test_text_guided_scores_rank_patches_by_caption_similarity():
    text = torch.tensor([[1.0, 0.0]])
    patches = torch.tensor([[[0.0, 1.0], [1.0, 0.1], [1.0, 1.0], [-1.0, 0.0]]])
    scores = text_patch_scores(patches, text)
    _, hidden = informed_mask(scores, 0.25, "high")
    assert hidden.tolist() == [[1]]
    _, hidden = informed_mask(scores, 0.25, "low")
    assert hidden.tolist() == [[3]]


def test_masked_forward_only_sees_kept_patches():
    model = _model().eval()
    bb = model.backbone
    px = torch.randn(2, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        attn = bb.encode_patches(px, output_attentions=True)["cls_attention"]
        keep, hidden = informed_mask(attn, 0.5, "high")
        view = bb.encode_patches(px, keep_index=keep)
    grid = int(bb.num_patches**0.5)
    p = bb.image_size // grid

    def poke(index: int) -> torch.Tensor:
        out = px.clone()
        r, c = divmod(index, grid)
        out[0, :, r * p : (r + 1) * p, c * p : (c + 1) * p] += 4.0
        return out

    with torch.no_grad():
        for idx in hidden[0].tolist()[:3]:
            again = bb.encode_patches(poke(idx), keep_index=keep)
            torch.testing.assert_close(again["cls"], view["cls"])
            torch.testing.assert_close(again["patches"], view["patches"])
        changed = bb.encode_patches(poke(keep[0, 0].item()), keep_index=keep)
    assert not torch.allclose(changed["cls"][0], view["cls"][0])


def test_module_views_use_the_attention_ranked_masks():
    model = _model().eval()
    frames, mask, text, raw = _batch(model, padded=False)
    with torch.no_grad():
        views = _views(model, frames, mask, text, raw)
        px = frames.flatten(0, 1)
        full = model.backbone.encode_patches(px, output_attentions=True)
        for name in ("high", "low"):
            keep, _ = informed_mask(full["cls_attention"], model.mask_ratio, name)
            cls = model.backbone.encode_patches(px, keep_index=keep)["cls"].view(4, 3, -1)
            expected = F.normalize(F.normalize(cls, dim=-1).mean(1), dim=-1)
            torch.testing.assert_close(views[f"embeds_{name}"], expected, atol=1e-5, rtol=0)
        # The full training view is exactly the inference embedding.
        torch.testing.assert_close(views["embeds"], model.encode_video(frames, mask)["embeds"], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- completion
@pytest.mark.parametrize("distance", ["cosine", "mse"])
def test_completion_loss_is_zero_iff_prediction_equals_target(distance):
    g = torch.Generator().manual_seed(3)
    target, text = torch.randn(3, 5, 8, generator=g), torch.randn(3, 8, generator=g)
    zero = semantic_completion_loss(target.clone(), target, text, text_weight=1.0, distance=distance)
    assert zero.shape == (3,)
    torch.testing.assert_close(zero, torch.zeros(3), atol=1e-6, rtol=0)
    other = semantic_completion_loss(target + torch.randn(3, 5, 8, generator=g), target, text, distance=distance)
    assert (other > 1e-3).all()
    empty = semantic_completion_loss(torch.randn(3, 0, 8, requires_grad=True), torch.randn(3, 0, 8), text)
    assert torch.equal(empty, torch.zeros(3))


def test_completion_text_term_counts_only_text_relative_error():
    g = torch.Generator().manual_seed(4)
    target, text = torch.randn(2, 4, 8, generator=g), torch.randn(2, 8, generator=g)
    pred = target + torch.randn(2, 4, 8, generator=g)
    visual = semantic_completion_loss(pred, target, None)
    both = semantic_completion_loss(pred, target, text, text_weight=2.0)
    gap = text_patch_scores(pred, text) - text_patch_scores(target, text)
    torch.testing.assert_close(both - visual, 2.0 * gap.pow(2).mean(-1))


def test_completion_loss_decreases_when_the_predictor_trains():
    model = _model()
    frames, mask, text, raw = _batch(model)
    valid = mask.bool()
    owner = valid.nonzero()[:, 0]
    with torch.no_grad():  # fixed encoder outputs: only the predictor learns here
        px = frames[valid]
        full = model.backbone.encode_patches(px, output_attentions=True)
        keep, hidden = informed_mask(full["cls_attention"], model.mask_ratio, "high")
        view = model.backbone.encode_patches(px, keep_index=keep)
        embeds, tokens, tmask = text["embeds"].detach(), raw["tokens"].detach(), raw["token_mask"]
    opt = torch.optim.Adam(model.predictor.parameters(), lr=3e-3)
    history = []
    for _ in range(15):
        loss = model._completion(full, view, keep, hidden, owner, embeds, tokens, tmask).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.7 * history[0], history


def test_predictor_ignores_padded_text_tokens():
    torch.manual_seed(0)
    pred = CompletionPredictor(16, num_patches=4).eval()
    cls, visible = torch.randn(1, 16), torch.randn(1, 2, 16)
    keep, hidden = torch.tensor([[0, 2]]), torch.tensor([[1, 3]])
    tokens, tmask = torch.randn(1, 3, 16), torch.tensor([[True, True, False]])
    a = pred(cls, visible, keep, hidden, tokens, tmask)
    tokens2 = tokens.clone()
    tokens2[0, 2] += 10.0
    torch.testing.assert_close(pred(cls, visible, keep, hidden, tokens2, tmask), a)
    assert a.shape == (1, 2, 16)


# ------------------------------------------------------------------------------------ co-learning
def test_colearning_is_zero_when_views_agree_and_trains_both_otherwise():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(4, 4, generator=g).requires_grad_()
    assert mutual_colearning_loss(a, a.detach().clone(), 2.0).abs().item() < 1e-6
    b = torch.randn(4, 4, generator=g).requires_grad_()
    loss = mutual_colearning_loss(a, b, 2.0)
    assert loss.item() > 1e-3
    loss.backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ ablation switches
def _loss(model: MASCOT, *batch) -> tuple[torch.Tensor, dict]:
    frames, mask, text, raw = batch
    return model.training_loss(text, _views(model, frames, mask, text, raw))


def test_total_loss_is_the_weighted_sum_of_its_parts():
    model = _model(masked_nce_weight=0.5, completion_weight=2.0, colearn_weight=3.0)
    batch = _batch(model)
    loss, parts = _loss(model, *batch)
    assert set(parts) == {"nce_full", "nce_high", "nce_low", "completion", "colearn"}
    expected = (
        parts["nce_full"] + 0.5 * (parts["nce_high"] + parts["nce_low"]) + 2.0 * parts["completion"] + 3.0 * parts["colearn"]
    )
    torch.testing.assert_close(loss.detach(), expected)


@pytest.mark.parametrize("switch, part", [("completion_weight", "completion"), ("colearn_weight", "colearn")])
def test_zero_weight_removes_exactly_that_term(switch, part):
    model = _model().eval()
    batch = _batch(model)
    with torch.no_grad():
        on, parts = _loss(model, *batch)
        setattr(model, switch, 0.0)
        off, parts_off = _loss(model, *batch)
    assert part not in parts_off
    torch.testing.assert_close(on - off, parts[part], atol=1e-6, rtol=0)
    for key in parts_off:
        torch.testing.assert_close(parts_off[key], parts[key])


def test_mask_switches_change_the_views_and_terms():
    batch = _batch(_model())
    with torch.no_grad():
        high_only, parts = _loss(_model(use_low_mask=False).eval(), *batch)
        assert set(parts) == {"nce_full", "nce_high", "completion"}, "mutual co-learning needs both views"
        torch.testing.assert_close(high_only, parts["nce_full"] + parts["nce_high"] + parts["completion"])
        low_only = _model(use_high_mask=False).eval()
        assert low_only.predictor is None, "background is not reconstructed by default"
        _, parts = _loss(low_only, *batch)
        assert set(parts) == {"nce_full", "nce_low"}
        _, parts = _loss(_model(use_high_mask=False, completion_low_weight=1.0).eval(), *batch)
        assert set(parts) == {"nce_full", "nce_low", "completion"}
        _, parts = _loss(_model(use_low_mask=False, colearn_mode="full").eval(), *batch)
        assert "colearn" in parts
        plain = _model(use_high_mask=False, use_low_mask=False).eval()
        loss, parts = _loss(plain, *batch)
        assert set(parts) == {"nce_full"}
        frames, mask, text, _ = batch
        video = plain.encode_video(frames, mask)
        torch.testing.assert_close(loss, symmetric_infonce(text["embeds"] @ video["embeds"].t(), plain.backbone.logit_scale))


def test_attention_sources_and_ratio_change_the_masked_view():
    model = _model(use_low_mask=False, completion_weight=0.0).eval()
    batch = _batch(model)
    with torch.no_grad():
        ref = _views(model, *batch)["embeds_high"]
        for name, value in (("attention_source", "text"), ("attention_source", "random"), ("mask_ratio", 0.25)):
            setattr(model, name, value)
            other = _views(model, *batch)["embeds_high"]
            assert not torch.allclose(other, ref), (name, value)
            model.attention_source, model.mask_ratio = "cls", 0.5


def test_frame_level_completion_needs_no_predictor():
    model = _model(completion_level="frame")
    assert model.predictor is None
    _, parts = _loss(model, *_batch(model))
    assert parts["completion"] > 0


def test_invalid_options_are_refused():
    for kwargs in (
        {"attention_source": "saliency"},
        {"completion_level": "pixel"},
        {"colearn_mode": "x"},
        {"mask_ratio": 1.0},
        {"completion_weight": -1.0},
    ):
        with pytest.raises(ValueError):
            _model(**kwargs)


# ----------------------------------------------------------------------------------------- module
def test_gradients_reach_every_trained_part():
    model = _model()
    loss, _ = _loss(model, *_batch(model))
    loss.backward()
    grads = {
        "vision": model.backbone.clip.vision_model.encoder.layers[0].mlp.fc1.weight.grad,
        "text": model.backbone.clip.text_model.encoder.layers[0].mlp.fc1.weight.grad,
        "predictor": model.predictor.head.weight.grad,
        "mask_token": model.predictor.mask_token.grad,
        "text_context": model.predictor.text_type.grad,
        "logit_scale": model.backbone.logit_scale.grad,
    }
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_similarity_is_blockwise_and_ignores_padded_frames():
    model = _model().eval()
    frames, mask, _, _ = _batch(model)
    with torch.no_grad():
        text = model.encode_text(**model.backbone.tokenize(CAPTIONS, 16))
        video = model.encode_video(frames, mask)
        full = model.similarity(text, video)
        block = model.similarity({k: v[1:3] for k, v in text.items()}, {k: v[2:] for k, v in video.items()})
        torch.testing.assert_close(block, full[1:3, 2:])
        frames2 = frames.clone()
        frames2[1, 2:] = 9.0
        torch.testing.assert_close(model.encode_video(frames2, mask)["embeds"], video["embeds"], atol=1e-6, rtol=0)
    assert full.shape == (4, 4)


def test_training_step_runs_in_a_lightning_trainer(tmp_path):
    import lightning as L

    model = _model()
    s = model.backbone.image_size
    batches = [
        {
            "frames": torch.randn(4, 3, 3, s, s),
            "frame_mask": torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool),
            "captions": CAPTIONS,
            "video_key": [f"v{i}" for i in range(4)],
        }
        for _ in range(2)
    ]
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer = L.Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
    )
    before = model.predictor.head.weight.detach().clone()
    trainer.fit(model, train_dataloaders=loader)
    assert not torch.equal(before, model.predictor.head.weight.detach())
    assert {"train/nce_full", "train/completion", "train/colearn"} <= set(trainer.callback_metrics)


def test_recipes_instantiate_and_overrides_touch_known_args():
    import importlib
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1] / "recipes" / "methods"
    cfg = yaml.safe_load((root / "mascot.yaml").read_text())["model"]
    module_name, cls_name = cfg["class_path"].rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), cls_name)
    args = dict(cfg["init_args"])
    overrides = sorted(root.glob("mascot_*.yaml"))
    assert {p.stem for p in overrides} >= {"mascot_msrvtt", "mascot_lsmdc", "mascot_activitynet", "mascot_didemo"}
    for extra in overrides:
        over = yaml.safe_load(extra.read_text()).get("model", {}).get("init_args", {})
        assert set(over) <= set(args), (extra.name, set(over) - set(args))
    model = cls(**args)
    assert isinstance(model, MASCOT) and model.hparams.max_words == args["max_words"]
    assert model.predictor is not None and model.active_views == ("high", "low")


@pytest.mark.slow
def test_short_synthetic_run_beats_chance(tiny_root, tmp_path):
    """90 steps on the tiny synthetic set (48 train videos; test 16 videos / 80 captions) beat chance t2v R@1.

    From-scratch `tiny` CLIP, 2 frames, lr 5e-4 (the synthetic recipe's). Seed 0 gave t2v R@1 21.2
    (CLIP4Clip meanP in the same setting: 21.2) against chance 6.25. About 40 s on one CPU thread: slow.
    """
    import lightning as L

    from tvr_bench.callbacks.evaluator import RetrievalEvaluator
    from tvr_bench.data.benchmarks.synthetic import SyntheticDataModule

    L.seed_everything(0, verbose=False)
    dm = SyntheticDataModule(
        size="tiny", root=str(tiny_root), num_frames=2, batch_size=16, eval_batch_size=16, num_workers=0, val_split=None
    )
    model = MASCOT(backbone="tiny", max_words=16, lr=5e-4, backbone_lr=5e-4, freeze="none", warmup_ratio=0.0)
    evaluator = RetrievalEvaluator(print_table=False)
    trainer = L.Trainer(
        max_epochs=30, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, accelerator="cpu", callbacks=[evaluator], num_sanity_val_steps=0,
        limit_val_batches=0, gradient_clip_val=1.0,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 90
    trainer.test(model, datamodule=dm, verbose=False)
    chance = 100.0 / evaluator.last_counts["videos"]
    assert evaluator.last_counts == {"texts": 80, "videos": 16}
    assert evaluator.last_metrics["t2v/R@1"] > chance, evaluator.last_metrics
