"""X-CLIP: parity with the reference code's vectors (xclip_sim_loss.pt), blocked scorer == one-shot math, padding modes,
the module, and a short synthetic run that beats chance."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import load_parity
from tests.data_fixtures import tiny_root  # noqa: F401 - pytest fixture
from tests.conftest import parity_atol as _atol
from tvr_bench.functional.losses import symmetric_infonce
from tvr_bench.functional.temporal import TemporalTransformer, temporal_state_from_reference
from tvr_bench.functional.xclip import (
    AOSM_NAMES,
    PADDINGS,
    AOSMWeights,
    _aosm_lean,
    aosm,
    frame_word_parts,
    normalise,
    video_level,
    xclip_pair_bytes,
    xclip_similarity,
    xclip_similarity_blocked,
    xclip_terms,
)

PARITY = "xclip_sim_loss.pt"
#: The reference's four terms (each x exp(logit_scale) in the file) -> ours (unscaled).
TERMS = {
    "video_sentence_logits": "video_sentence",
    "video_word_logits": "video_word",
    "sentence_frame_logits": "sentence_frame",
    "frame_word_logits": "frame_word",
}
#: The frame-word term's stages inside the reference's AOSM (unscaled in the file) -> ours.
STAGES = {
    "fine_grained_sim_scores": "fine",
    "word_level_logit": "word_level",
    "frame_level_logit": "frame_level",
    "sent2frame_logits": "sent2frame",
    "video2word_logits": "video2word",
}
#: CLIP4Clip-style `compute_metrics` names -> ours.
METRICS = {"R1": "R@1", "R5": "R@5", "R10": "R@10", "MedianR": "MdR", "MeanR": "MnR"}


# ------------------------------------------------------------------------------------ helpers
def _weights(state: dict, meta: dict) -> AOSMWeights:
    """The eight AOSM matrices of a reference state dict (sizes from the file's meta)."""
    w = AOSMWeights(meta["D"], meta["max_words"], meta["F"])
    w.load_state_dict({k: state[k] for k in AOSM_NAMES})
    return w


def _temporal(state: dict, meta: dict) -> TemporalTransformer:
    """The reference's seqTransf (`frame_position_embeddings`, `transformerClip.*`) as our temporal module."""
    module = TemporalTransformer(meta["D"], layers=meta["cross_num_hidden_layers"], heads=meta["transformerClip_heads"])
    module.load_state_dict(temporal_state_from_reference(state))
    return module.eval()


def _features(text: dict, video: dict, temporal: TemporalTransformer) -> tuple[torch.Tensor, ...]:
    """Raw file inputs -> (sentence, words, word_mask, video, frames, frame_mask) as `encode_text`/`encode_video` give."""
    mask = video["video_mask"].bool()
    contextual = temporal(video["frame_feat"], mask)
    return (
        normalise(text["sentence_feat"]), normalise(text["word_feat"]), text["text_mask"].bool(),
        video_level(contextual, mask), normalise(video["frame_feat"]), mask,
    )  # fmt: skip


def _scale(blob: dict) -> torch.Tensor:
    return blob["state_dict"]["clip.logit_scale"].exp()


# ------------------------------------------------------------------------------------ parity
def test_temporal_module_and_video_feature_match_reference():
    """seqTransf output (`visual_output`) and the video-level feature (`video_output`) of the training batch."""
    blob = load_parity(PARITY)
    atol, meta = _atol(blob), blob["meta"]
    inputs, comps = blob["train"]["inputs"], blob["train_batch_eval"]["components"]
    mask = inputs["video_mask"].bool()
    with torch.no_grad():
        contextual = _temporal(blob["state_dict"], meta)(inputs["frame_feat"], mask)
    torch.testing.assert_close(contextual, comps["visual_output"], atol=atol, rtol=0)
    torch.testing.assert_close(video_level(comps["visual_output"], mask), comps["video_output"], atol=atol, rtol=0)
    torch.testing.assert_close(normalise(inputs["frame_feat"]), comps["frame_features"], atol=atol, rtol=0)
    torch.testing.assert_close(normalise(inputs["sentence_feat"]), comps["sentence_output"], atol=atol, rtol=0)
    torch.testing.assert_close(normalise(inputs["word_feat"]), comps["word_features"], atol=atol, rtol=0)


def test_every_term_and_aosm_stage_matches_reference():
    """From the reference's own features: the four scaled terms, the AOSM stages and their mean (padding='reference')."""
    blob = load_parity(PARITY)
    atol, meta = _atol(blob), blob["meta"]
    sec = blob["train_batch_eval"]
    comps, mask = sec["components"], blob["train"]["inputs"]["video_mask"].bool()
    weights = _weights(blob["state_dict"], meta)
    scale = _scale(blob)
    torch.testing.assert_close(scale, comps["logit_scale_exp"], atol=atol, rtol=0)
    args = (comps["sentence_output"], comps["word_features"], blob["train"]["inputs"]["text_mask"].bool(),
            comps["video_output"], comps["frame_features"], mask)  # fmt: skip
    with torch.no_grad():
        terms = xclip_terms(*args, weights, "reference")
        parts = frame_word_parts(comps["word_features"], comps["frame_features"], weights)
    assert set(TERMS) <= set(comps) and set(STAGES) <= set(comps)
    for ref_key, ours in TERMS.items():
        torch.testing.assert_close(scale * terms[ours], comps[ref_key], atol=atol, rtol=0, msg=ref_key)
    for ref_key, ours in STAGES.items():
        torch.testing.assert_close(parts[ours], comps[ref_key], atol=atol, rtol=0, msg=ref_key)
    mean = sum(terms.values()) / 4
    torch.testing.assert_close(scale * mean, sec["logits"], atol=atol, rtol=0)


def test_training_loss_and_gradients_match_reference():
    """From the raw batch (seqTransf included): scaled scores, both cross-entropies, the loss and the gradients of the
    eight AOSM matrices and the logit scale."""
    blob = load_parity(PARITY)
    atol, meta, train = _atol(blob), blob["meta"], blob["train"]
    weights = _weights(blob["state_dict"], meta)
    logit_scale = blob["state_dict"]["clip.logit_scale"].clone().requires_grad_(True)
    with torch.no_grad():
        feats = _features(train["inputs"], train["inputs"], _temporal(blob["state_dict"], meta))
    sims = xclip_similarity(*feats, weights, "reference")
    scaled = logit_scale.exp() * sims
    torch.testing.assert_close(scaled, train["sim_matrix"], atol=atol, rtol=0)
    target = torch.arange(sims.shape[0])
    torch.testing.assert_close(F.cross_entropy(scaled, target), train["sim_loss_t2v"], atol=atol, rtol=0)
    torch.testing.assert_close(F.cross_entropy(scaled.t(), target), train["sim_loss_v2t"], atol=atol, rtol=0)
    loss = symmetric_infonce(sims, logit_scale)
    torch.testing.assert_close(loss, train["loss"], atol=atol, rtol=0)
    loss.backward()
    assert set(train["grads"]) == {*AOSM_NAMES, "clip.logit_scale"}
    for name, ref in train["grads"].items():
        grad = logit_scale.grad if name == "clip.logit_scale" else getattr(weights, name).grad
        torch.testing.assert_close(grad, ref, atol=atol, rtol=0, msg=name)
    # the eval-mode scores of the same batch are the training scores (no dropout, no gather on one process)
    torch.testing.assert_close(blob["train_batch_eval"]["logits"], train["sim_matrix"], atol=atol, rtol=0)


def test_identity_aosm_init_matches_reference():
    """The module's init (identity matrices) against `logits_with_identity_aosm_weights`; the file's init state is ours."""
    blob = load_parity(PARITY)
    atol, meta = _atol(blob), blob["meta"]
    init = blob["state_dict_init_aosm"]
    fresh = AOSMWeights(meta["D"], meta["max_words"], meta["F"])
    for name in AOSM_NAMES:
        torch.testing.assert_close(getattr(fresh, name).detach(), init[name], atol=0, rtol=0, msg=name)
    with torch.no_grad():
        feats = _features(blob["train"]["inputs"], blob["train"]["inputs"], _temporal(blob["state_dict"], meta))
        sims = xclip_similarity(*feats, fresh, "reference")
    expected = blob["train_batch_eval"]["logits_with_identity_aosm_weights"]
    torch.testing.assert_close(_scale(blob) * sims, expected, atol=atol, rtol=0)


def test_unequal_texts_and_videos_and_the_unused_text_mask():
    """7 texts x 5 videos; the reference never reads the text mask (an all-ones mask gives the same scores), nor do we
    with padding='reference'; padding='masked' does."""
    blob = load_parity(PARITY)
    atol, meta, sec = _atol(blob), blob["meta"], blob["unequal"]
    weights = _weights(blob["state_dict"], meta)
    with torch.no_grad():
        feats = _features(sec["text"], sec["video"], _temporal(blob["state_dict"], meta))
        ones = (feats[0], feats[1], torch.ones_like(feats[2]), *feats[3:])
        scale = _scale(blob)
        ref = xclip_similarity(*feats, weights, "reference")
        torch.testing.assert_close(scale * ref, sec["logits"], atol=atol, rtol=0)
        ones_ref = xclip_similarity(*ones, weights, "reference")
        torch.testing.assert_close(scale * ones_ref, sec["logits_with_all_ones_text_mask"], atol=atol, rtol=0)
        blocked = xclip_similarity_blocked(*feats, weights, "reference", max_bytes=1)
        torch.testing.assert_close(scale * blocked, sec["logits"], atol=atol, rtol=0)
        masked = xclip_similarity(*feats, weights, "masked")
    assert not feats[2].all() and (masked - ref).abs().max() > 1e-3  # the text mask matters once it is used


def test_blockwise_eval_loop_and_metrics_match_reference():
    """The reference's `_run_on_single_gpu` matrix through our evaluator's blocked scoring (the XCLIP module's
    `similarity`) for several memory budgets, and its `compute_metrics` both ways."""
    from tvr_bench.callbacks.evaluator import blocked_similarity
    from tvr_bench.methods.xclip import XCLIP
    from tvr_bench.metrics import retrieval_metrics

    blob = load_parity(PARITY)
    atol, meta, sec = _atol(blob), blob["meta"], blob["eval_loop"]
    inputs = sec["inputs"]
    with torch.no_grad():
        s, w, wm, v, f, fm = _features(inputs, inputs, _temporal(blob["state_dict"], meta))
    text, video = {"sentence": s, "words": w, "word_mask": wm}, {"video": v, "frames": f, "frame_mask": fm}
    model = XCLIP(backbone="tiny", padding="reference", max_words=meta["max_words"], num_frames=meta["F"]).eval()
    model.aosm = _weights(blob["state_dict"], meta)
    scale = _scale(blob)
    n = s.shape[0]
    pair = model.pair_cost_bytes(text, video)
    block = int(sec["batch_size_val"])
    for pairs in (1, block, block * block, n * n):
        budget_mb = pair * pairs / 2**20
        model.hparams.eval_memory_mb = budget_mb  # the module's own steps follow the same budget
        sims = blocked_similarity(model, text, video, budget_mb)
        torch.testing.assert_close(scale * sims, sec["sim_matrix"], atol=atol, rtol=0, msg=f"{pairs} pairs per block")
    got = retrieval_metrics(sims, torch.arange(n))
    for side in ("t2v", "v2t"):
        for ref_key, our_key in METRICS.items():
            assert got[f"{side}/{our_key}"] == pytest.approx(float(sec[f"{side}_metrics"][ref_key]), abs=atol), (side, ref_key)


# ------------------------------------------------------------------------------------ invariants
def _random_aosm(dim: int, words: int, frames: int, seed: int, scale: float = 0.2) -> AOSMWeights:
    g = torch.Generator().manual_seed(seed)
    w = AOSMWeights(dim, words, frames)
    with torch.no_grad():
        for p in w.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return w


def _random_set(nt: int, nv: int, nw: int, nf: int, d: int, seed: int, holes: bool = False) -> tuple[torch.Tensor, ...]:
    """Unit-length features of `nt` texts and `nv` videos with prefix masks (or arbitrary holes), each item one real position."""
    g = torch.Generator().manual_seed(seed)
    if holes:
        wm, fm = torch.rand(nt, nw, generator=g) < 0.6, torch.rand(nv, nf, generator=g) < 0.6
        wm[:, 0], fm[:, -1] = True, True
    else:
        wm = torch.arange(nw)[None] < torch.randint(1, nw + 1, (nt,), generator=g)[:, None]
        fm = torch.arange(nf)[None] < torch.randint(1, nf + 1, (nv,), generator=g)[:, None]
        wm[0], fm[-1] = True, True  # one text and one video without padding
    s, w = normalise(torch.randn(nt, d, generator=g)), normalise(torch.randn(nt, nw, d, generator=g))
    frames = normalise(torch.randn(nv, nf, d, generator=g))
    return s, w, wm, video_level(frames, fm), frames, fm


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("holes", [False, True])
def test_blocked_equals_one_shot_for_any_budget(padding: str, holes: bool):
    for nt, nv, nw, nf, d, seed in [(9, 13, 7, 5, 8, 1), (1, 4, 3, 12, 16, 2), (17, 3, 11, 4, 6, 3)]:
        feats = _random_set(nt, nv, nw, nf, d, seed, holes)
        weights = _random_aosm(d, nw, nf, seed)
        with torch.no_grad():
            full = xclip_similarity(*feats, weights, padding)
        pair = xclip_pair_bytes(nw, nf)
        for budget in (1, pair, 3 * pair, 50 * pair, 10**12):
            blocked = xclip_similarity_blocked(*feats, weights, padding, max_bytes=budget)
            torch.testing.assert_close(blocked, full, atol=1e-6, rtol=0, msg=f"{nt}x{nv} budget {budget}")


def test_any_slice_scores_its_block():
    """The score of (t, v) depends on t and v alone: any rows x columns equal that block of the full matrix."""
    feats = _random_set(10, 7, 6, 5, 8, seed=4)
    weights = _random_aosm(8, 6, 5, seed=4)
    rows, cols = torch.tensor([5, 0, 9, 3]), torch.tensor([6, 2, 0])
    s, w, wm, v, f, fm = feats
    for padding in PADDINGS:
        full = xclip_similarity_blocked(*feats, weights, padding)
        part = xclip_similarity_blocked(s[rows], w[rows], wm[rows], v[cols], f[cols], fm[cols], weights, padding, max_bytes=1)
        torch.testing.assert_close(part, full[rows][:, cols], atol=1e-6, rtol=0, msg=padding)


def test_masked_padding_ignores_padded_content_and_equals_reference_without_padding():
    s, w, wm, v, f, fm = _random_set(6, 5, 7, 6, 8, seed=5)
    weights = _random_aosm(8, 7, 6, seed=5)
    g = torch.Generator().manual_seed(9)
    w2 = torch.where(wm[..., None], w, normalise(torch.randn(w.shape, generator=g)))
    f2 = torch.where(fm[..., None], f, normalise(torch.randn(f.shape, generator=g)))
    with torch.no_grad():
        base = xclip_similarity(s, w, wm, v, f, fm, weights, "masked")
        torch.testing.assert_close(xclip_similarity(s, w2, wm, v, f2, fm, weights, "masked"), base, atol=1e-6, rtol=0)
        ref = xclip_similarity(s, w, wm, v, f, fm, weights, "reference")
        assert (xclip_similarity(s, w2, wm, v, f2, fm, weights, "reference") - ref).abs().max() > 1e-3
        full_w, full_f = torch.ones_like(wm), torch.ones_like(fm)
        torch.testing.assert_close(
            xclip_similarity(s, w, full_w, v, f, full_f, weights, "masked"),
            xclip_similarity(s, w, full_w, v, f, full_f, weights, "reference"), atol=1e-6, rtol=0,
        )  # fmt: skip


def test_lean_aosm_equals_the_differentiable_one():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 5, 4, 6, generator=g)
    mask = torch.rand(3, 5, 1, 1, generator=g) < 0.7
    mask[:, 0] = True
    for dim, m in ((1, mask), (-1, None), (1, None), (-1, mask.transpose(1, 3)[..., :1, :1].expand(3, 1, 1, 6))):
        n = x.shape[dim]
        weight = torch.eye(n) + 0.3 * torch.randn(n, n, generator=g)
        torch.testing.assert_close(_aosm_lean(x, weight, dim, m), aosm(x, weight, dim, m), atol=1e-6, rtol=0)


def test_aosm_is_a_softmax_weighted_max_at_identity():
    """With M = I and tau -> 0 the AOSM tends to the max; masked positions never win."""
    x = torch.tensor([[0.2, 0.9, -0.1, 0.5]])
    assert float(aosm(x, torch.eye(4))) == pytest.approx(0.9, abs=1e-3)
    assert float(aosm(x, torch.eye(4), mask=torch.tensor([[True, False, True, True]]))) == pytest.approx(0.5, abs=2e-3)


def test_gradients_flow_and_loss_decreases():
    torch.manual_seed(0)
    s, w, wm, v, f, fm = _random_set(8, 8, 6, 5, 16, seed=7)
    v = normalise(v + 0.5 * s)  # text i describes video i
    weights = AOSMWeights(16, 6, 5)
    logit_scale = torch.tensor(2.0, requires_grad=True)
    opt = torch.optim.Adam([*weights.parameters(), logit_scale], lr=1e-2)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = symmetric_infonce(xclip_similarity(s, w, wm, v, f, fm, weights, "masked"), logit_scale)
        loss.backward()
        for name, p in weights.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        first = float(loss.detach()) if first is None else first
        opt.step()
    assert float(loss.detach()) < first - 0.1


def test_blocked_scorer_is_float32_under_cpu_autocast():
    feats = _random_set(6, 5, 9, 7, 32, seed=8)
    weights = _random_aosm(32, 9, 7, seed=8)
    with torch.no_grad():
        fp32 = xclip_similarity_blocked(*feats, weights)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = xclip_similarity_blocked(*feats, weights, max_bytes=1)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, fp32, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------ module
def _tiny_batch(model, frames: int = 4):
    size = model.backbone.image_size
    pixels = torch.randn(3, frames, 3, size, size)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)[:, :frames]
    tok = model.backbone.tokenize(["a red circle", "a blue square spins slowly", "green"], model.hparams.max_words)
    return tok, pixels, mask


@pytest.mark.parametrize("padding,temporal", [("masked", "seqTransf"), ("reference", "meanP")])
def test_module_scores_blocks_trains_and_names_itself(padding: str, temporal: str):
    from tvr_bench.methods.xclip import XCLIP

    torch.manual_seed(0)
    model = XCLIP(backbone="tiny", max_words=12, num_frames=4, padding=padding, temporal=temporal)
    assert model.method_name == ("xclip" if temporal == "seqTransf" else "xclip_meanP")
    assert XCLIP.SCORING_OPTIONS == {"padding": ("masked", "reference")}
    tok, pixels, mask = _tiny_batch(model)
    model.eval()
    with torch.no_grad():
        text, video = model.encode_text(**tok), model.encode_video(pixels, mask)
        full = model.similarity(text, video)
        block = model.similarity({k: x[1:] for k, x in text.items()}, {k: x[:2] for k, x in video.items()})
        torch.testing.assert_close(block, full[1:, :2], atol=1e-6, rtol=0)
        one_shot = xclip_similarity(*model._inputs(text, video), model.aosm, padding)
        torch.testing.assert_close(full, one_shot, atol=1e-6, rtol=0)
        if padding == "masked":  # padded frames change nothing
            pixels2 = pixels.clone()
            pixels2[1, 2:] = 7.0
            torch.testing.assert_close(model.similarity(text, model.encode_video(pixels2, mask)), full, atol=1e-5, rtol=0)
    assert model.pair_cost_bytes(text, video) == xclip_pair_bytes(12, 4)
    model.train()
    loss, extra = model.training_loss(model.encode_text(**tok), model.encode_video(pixels, mask))
    assert torch.isfinite(loss) and extra == {}
    loss.backward()
    assert model.backbone.logit_scale.grad is not None and model.backbone.clip.visual_projection.weight.grad is not None
    assert all(p.grad is not None for p in model.aosm.parameters())
    if temporal == "seqTransf":
        assert model.temporal.blocks[0].qkv.weight.grad is not None


def test_module_refuses_features_of_the_wrong_size():
    from tvr_bench.methods.xclip import XCLIP

    model = XCLIP(backbone="tiny", max_words=12, num_frames=3)
    tok, pixels, mask = _tiny_batch(model, frames=4)
    with pytest.raises(ValueError, match="frame matrices are 3 x 3 but the videos have 4 frame slots"):
        model.encode_video(pixels, mask)
    short = model.backbone.tokenize(["a red circle"], 8)
    with pytest.raises(ValueError, match="word matrices are 12 x 12 but the text features have 8 token positions"):
        model.encode_text(**short)
    with pytest.raises(ValueError, match="unknown X-CLIP padding 'none'"):
        XCLIP(backbone="tiny", padding="none")


def test_module_inits_temporal_from_clip_and_aosm_at_identity():
    from tvr_bench.methods.xclip import XCLIP

    model = XCLIP(backbone="tiny")
    tower = model.backbone.clip.text_model
    torch.testing.assert_close(model.temporal.position_embedding.weight, tower.embeddings.position_embedding.weight)
    for name in AOSM_NAMES:
        p = getattr(model.aosm, name)
        torch.testing.assert_close(p.detach(), torch.eye(p.shape[0]))
    assert model.aosm.words == 32 and model.aosm.frames == 12


def test_method_recipes_instantiate_and_layers_touch_known_args():
    from pathlib import Path

    import yaml

    from tvr_bench.methods.xclip import XCLIP

    root = Path(__file__).resolve().parents[1] / "recipes" / "methods"
    args = dict(yaml.safe_load((root / "xclip.yaml").read_text())["model"]["init_args"])
    layers = sorted(root.glob("xclip_*.yaml"))
    assert {p.stem for p in layers} == {f"xclip_{d}" for d in ("msrvtt", "msvd", "lsmdc", "didemo", "activitynet")}
    for layer in layers:
        doc = yaml.safe_load(layer.read_text())
        over = doc.get("model", {}).get("init_args", {})
        assert set(over) <= set(args), (layer.name, set(over) - set(args))
        assert over["num_frames"] == doc["data"]["init_args"]["num_frames"], layer.name  # the frame matrices' size
    model = XCLIP(**args)
    assert model.hparams.max_words == args["max_words"] and model.padding == "masked"


@pytest.mark.slow
def test_short_synthetic_run_beats_chance(tiny_root, tmp_path):
    """90 steps on the tiny synthetic set (48 train videos; test 16 videos / 80 captions) beat chance t2v R@1.

    From-scratch `tiny` CLIP, 2 frames, lr 5e-4 (the synthetic recipe's), the default padding. About 40 s on one CPU
    thread: slow.
    """
    import lightning as L

    from tvr_bench.callbacks.evaluator import RetrievalEvaluator
    from tvr_bench.data.benchmarks.synthetic import SyntheticDataModule
    from tvr_bench.methods.xclip import XCLIP

    L.seed_everything(0, verbose=False)
    dm = SyntheticDataModule(
        size="tiny", root=str(tiny_root), num_frames=2, batch_size=16, eval_batch_size=16, num_workers=0, val_split=None
    )
    model = XCLIP(backbone="tiny", max_words=16, num_frames=2, lr=5e-4, backbone_lr=5e-4, freeze="none", warmup_ratio=0.0)
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
    assert evaluator.last_metrics["t2v/R@1"] > 2 * chance, evaluator.last_metrics


def test_result_protocol_records_a_non_default_padding():
    """The leaderboard's protocol block names `padding`, and the row variant carries it when it is not the default, so
    reference-padding rows are a variant of their own (the paper profile's rows say `padding=reference`)."""
    from tvr_bench.callbacks.leaderboard import LeaderboardWriter
    from tvr_bench.methods.xclip import XCLIP

    trainer = SimpleNamespace(datamodule=None, checkpoint_callback=None, ckpt_path=None)
    evaluator = SimpleNamespace(last_counts={"videos": 3})
    for profile, padding, variant in (("default", "masked", ""), ("default", "reference", "padding=reference"),
                                      ("paper", "reference", "profile=paper, padding=reference")):  # fmt: skip
        writer = LeaderboardWriter(runs_dir="unused", enabled=False, profile=profile)
        writer.fit_stats = {"steps": 10}  # a trained row (else `training=zero-shot` joins the variant)
        proto = writer.protocol(trainer, XCLIP(backbone="tiny", padding=padding), evaluator)
        assert proto["padding"] == padding and proto["variant"] == variant
