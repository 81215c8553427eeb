"""EMCL math against the reference vectors (emcl_em_sim_loss.pt, parity README section 9) and its own invariants.

Every shape, setting and key comes from the file (`meta`, `train`, `eval`). The reference's EM is numerically
chaotic on the file's zero-mean random inputs (a 1e-6 change of one input moves the final bases by ~0.3;
`test_em_amplifies_differences_of_its_input` shows it), so the comparisons run single-threaded (the file was
made so) from the reference's own seqTransf arithmetic: the training case from the file's
`video_feat_after_seqTransf`, the evaluation case from a replica of `module_cross` that this test checks
against that tensor. Our seqTransf module is compared separately at the file's tolerance.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.conftest import load_parity, parity_atol
from tvr_bench.callbacks.evaluator import blocked_similarity, eval_block_sizes
from tvr_bench.functional.emcl import (
    em_bases,
    em_reconstruct,
    emcl_block_grid_scores,
    emcl_block_scores,
    emcl_pair_scores,
    init_bases,
    momentum_update,
    pool_videos,
    pool_weights,
)
from tvr_bench.functional.losses import symmetric_infonce
from tvr_bench.functional.temporal import TemporalTransformer, temporal_state_from_reference
from tvr_bench.metrics import dual_softmax, retrieval_metrics

FILE = "emcl_em_sim_loss.pt"
#: the reference's `compute_metrics` names -> ours
METRIC_NAMES = {"R1": "R@1", "R5": "R@5", "R10": "R@10", "MedianR": "MdR", "MeanR": "MnR"}


@pytest.fixture
def one_thread():
    """The file's numbers were computed single-threaded; a threaded reduction rounds differently in the last bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _em_args(meta: dict) -> dict:
    return {"steps": int(meta["stage_num"]), "lamd": float(meta["lamd"]), "beta": float(meta["beta"]), "temperature": float(meta["temp"])}


def _model(meta: dict, bases: torch.Tensor, grouping: str, block: int, logit_scale: torch.Tensor | None = None):
    """An EMCL module with the file's EM settings and running bases (its features are given directly)."""
    from tvr_bench.methods.emcl import EMCL

    model = EMCL(backbone="tiny", bases=int(meta["centerK"]), em_steps=int(meta["stage_num"]), em_lambda=float(meta["lamd"]),
                 momentum=float(meta["momentum"]), beta=float(meta["beta"]), pool_temperature=float(meta["temp"]),
                 grouping=grouping, reference_block=block, temporal_layers=1)  # fmt: skip
    model.em_bases.copy_(bases)
    if logit_scale is not None:
        with torch.no_grad():
            model.backbone.logit_scale.copy_(logit_scale)
    return model


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    u = x.mean(-1, keepdim=True)
    s = (x - u).pow(2).mean(-1, keepdim=True)
    return weight * ((x - u) / torch.sqrt(s + eps)) + bias


@torch.no_grad()
def reference_seq_transf(state: dict, frames: torch.Tensor, mask: torch.Tensor, heads: int, layers: int) -> torch.Tensor:
    """The reference's seqTransf arithmetic (`EMCL.agg_video_feat` over `module_cross.Transformer`: TF-style layer
    norms, torch's MultiheadAttention on an [L, N, D] sequence with a repeated [B·H, F, F] mask): a test oracle."""
    width, n_frames = frames.shape[-1], frames.shape[1]
    x = frames + state["frame_position_embeddings.weight"][:n_frames][None]
    bias = ((1.0 - mask.float().unsqueeze(1)) * -1000000.0).expand(-1, n_frames, -1).repeat_interleave(heads, dim=0)
    x = x.permute(1, 0, 2)
    for i in range(layers):
        p = f"transformerClip.resblocks.{i}."
        attn = nn.MultiheadAttention(width, heads).eval()
        attn.load_state_dict({k[len(p) + 5 :]: v for k, v in state.items() if k.startswith(p + "attn.")})
        h = _layer_norm(x, state[p + "ln_1.weight"], state[p + "ln_1.bias"])
        x = x + attn(h, h, h, need_weights=False, attn_mask=bias)[0]
        h = _layer_norm(x, state[p + "ln_2.weight"], state[p + "ln_2.bias"])
        h = h @ state[p + "mlp.c_fc.weight"].t() + state[p + "mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h)
        x = x + (h @ state[p + "mlp.c_proj.weight"].t() + state[p + "mlp.c_proj.bias"])
    return x.permute(1, 0, 2) + frames


# ------------------------------------------------------------------------------------ parity
def test_seq_transf_matches_reference():
    data = load_parity(FILE)
    meta, train = data["meta"], data["train"]
    atol = parity_atol(data)
    module = TemporalTransformer(int(meta["D"]), layers=int(meta["num_hidden_layers"]), heads=int(meta["transformerClip_heads"]))
    module.load_state_dict(temporal_state_from_reference(data["state_dict"]), strict=True)
    with torch.no_grad():
        ours = module.eval()(train["inputs"]["frame_feat"], train["inputs"]["video_mask"].bool())
    torch.testing.assert_close(ours, train["video_feat_after_seqTransf"], atol=atol, rtol=0)


def test_reference_seq_transf_oracle_is_the_reference(one_thread):
    """The replica that feeds the evaluation case reproduces the file's seqTransf output of the training case exactly."""
    data = load_parity(FILE)
    meta, train = data["meta"], data["train"]
    out = reference_seq_transf(data["state_dict"], train["inputs"]["frame_feat"], train["inputs"]["video_mask"],
                               int(meta["transformerClip_heads"]), int(meta["num_hidden_layers"]))  # fmt: skip
    torch.testing.assert_close(out, train["video_feat_after_seqTransf"], atol=parity_atol(data) / 100, rtol=0)


def test_training_pooling_em_loss_and_gradient_match_reference(one_thread):
    data = load_parity(FILE)
    meta, train = data["meta"], data["train"]
    atol = parity_atol(data)
    inputs = train["inputs"]
    text, frames, mask = inputs["text_cls"], train["video_feat_after_seqTransf"], inputs["video_mask"].bool()
    n_text, n_video = text.shape[0], frames.shape[0]
    args = _em_args(meta)
    close = lambda got, key: torch.testing.assert_close(got, train[key], atol=atol, rtol=0, msg=key)  # noqa: E731

    close(pool_weights(text, frames, mask, args["temperature"]), "v_weight")
    x = torch.cat([pool_videos(text, frames, mask, args["temperature"]).reshape(n_text * n_video, -1), text])
    close(x, "em_input")
    mu, z = em_bases(x, data["emcl_mu_init"], args["steps"], args["lamd"])
    close(mu, "em_final_bases_mu")
    close(z, "em_final_z")
    close(em_reconstruct(x, data["emcl_mu_init"], args["steps"], args["lamd"], args["beta"])[0], "em_output")
    sims, final = emcl_block_scores(text, frames, mask, data["emcl_mu_init"], **args)
    close(sims, "t2v_logits")
    close(momentum_update(data["emcl_mu_init"], final, float(meta["momentum"])), "emcl_mu_after_step")
    scale = data["logit_scale_param"].clone().requires_grad_(True)
    scaled = sims * scale.exp()
    target = torch.arange(n_text)
    close(torch.nn.functional.cross_entropy(scaled, target), "loss_t2v")
    close(torch.nn.functional.cross_entropy(scaled.t(), target), "loss_v2t")
    loss = symmetric_infonce(sims, scale)
    close(loss, "loss")
    (grad,) = torch.autograd.grad(loss, scale)
    close(grad, "grad_logit_scale")

    # the module: the same loss and logit-scale gradient, and the bases' momentum step in training mode only
    model = _model(meta, data["emcl_mu_init"], "reference", int(meta["eval_mini_batch"]), data["logit_scale_param"])
    feats_t, feats_v = {"embeds": text}, {"frames": frames, "frame_mask": mask}
    model.eval()
    model.training_loss(feats_t, feats_v)
    torch.testing.assert_close(model.em_bases, data["emcl_mu_init"], atol=0, rtol=0)  # eval: no update
    model.train()
    loss, _ = model.training_loss(feats_t, feats_v)
    torch.testing.assert_close(loss, train["loss"], atol=atol, rtol=0)
    loss.backward()
    torch.testing.assert_close(model.backbone.logit_scale.grad, train["grad_logit_scale"], atol=atol, rtol=0)
    torch.testing.assert_close(model.em_bases, train["emcl_mu_after_step"], atol=atol, rtol=0)


def test_eval_block_loop_scores_and_metrics_match_reference(one_thread):
    """The evaluator's blocked scoring with EMCL's reference grouping is the reference's `_run_on_single_gpu` loop."""
    data = load_parity(FILE)
    meta, ev = data["meta"], data["eval"]
    atol = parity_atol(data)
    block = int(ev["mini_batch"])
    assert block == int(meta["eval_mini_batch"])
    inputs = ev["inputs"]
    frames = reference_seq_transf(data["state_dict"], inputs["frame_feat"], inputs["video_mask"],
                                  int(meta["transformerClip_heads"]), int(meta["num_hidden_layers"]))  # fmt: skip
    n = inputs["text_cls"].shape[0]
    text = {"embeds": inputs["text_cls"], "index": torch.arange(n)}
    video = {"frames": frames, "frame_mask": inputs["video_mask"].bool(), "index": torch.arange(frames.shape[0])}
    model = _model(meta, ev["emcl_mu"], "reference", block).eval()
    assert eval_block_sizes(model) == (block, block)
    for budget_mb in (1e-6, 1.0, 1e6):  # the memory budget never splits a reference block
        sim = blocked_similarity(model, text, video, budget_mb)
        torch.testing.assert_close(sim, ev["sim_matrix"], atol=atol, rtol=0, msg=f"budget {budget_mb}")
    # any rows asked for (a DDP rank's share) are those rows of the block-wise matrix
    rows = torch.tensor([n - 1, 1, block, 0])
    torch.testing.assert_close(blocked_similarity(model, text, video, 1.0, rows), ev["sim_matrix"][rows], atol=atol, rtol=0)
    torch.testing.assert_close(model.similarity(text, video), ev["sim_matrix_single_block"], atol=atol, rtol=0)
    grid = emcl_block_grid_scores(text["embeds"], frames, video["frame_mask"], ev["emcl_mu"], (block, block), **{
        k: v for k, v in _em_args(meta).items()})  # fmt: skip
    torch.testing.assert_close(grid, ev["sim_matrix"], atol=atol, rtol=0)
    single_gap = float((ev["sim_matrix"] - ev["sim_matrix_single_block"]).abs().max())
    assert single_gap == pytest.approx(float(ev["max_abs_diff_blocks_vs_single_block"]), abs=atol)

    # pairwise grouping: the reference loop with blocks of one text and one video
    pair_model = _model(meta, ev["emcl_mu"], "pair", block).eval()
    assert eval_block_sizes(pair_model) is None
    pairs = blocked_similarity(pair_model, text, video, 1e-3)
    torch.testing.assert_close(pairs[:1, :1], ev["sim_00_scored_alone"], atol=atol, rtol=0)
    alone = _model(meta, ev["emcl_mu"], "reference", 1).eval()
    torch.testing.assert_close(pairs, blocked_similarity(alone, text, video, 1.0), atol=atol, rtol=0)

    sim = ev["sim_matrix"]
    got = retrieval_metrics(sim, torch.arange(n))
    for side in ("t2v", "v2t"):
        for ref_key, our_key in METRIC_NAMES.items():
            assert got[f"{side}/{our_key}"] == pytest.approx(float(ev[f"{side}_metrics"][ref_key]), abs=atol), (side, ref_key)
    # the printed "inverted softmax" rows: t2v = N·DSL over texts at temperature 1/t2v_temp; v2t normalises over videos
    t2v_inv = dual_softmax(sim, 1.0 / float(meta["t2v_temp"])) * n
    v2t_inv = dual_softmax(sim.t(), 1.0 / float(meta["v2t_temp"])).t() * n
    torch.testing.assert_close(t2v_inv, ev["t2v_sim_inverted_softmax"], atol=atol, rtol=1e-5)
    torch.testing.assert_close(v2t_inv, ev["v2t_sim_inverted_softmax"], atol=atol, rtol=1e-5)
    for side, matrix in (("t2v", t2v_inv), ("v2t", v2t_inv)):
        got = retrieval_metrics(matrix, torch.arange(n))
        for ref_key, our_key in METRIC_NAMES.items():
            want = float(ev[f"{side}_metrics_inverted_softmax"][ref_key])
            assert got[f"{side}/{our_key}"] == pytest.approx(want, abs=atol), (side, ref_key)


def test_em_amplifies_differences_of_its_input(one_thread):
    """Why the parity runs from the reference's own seqTransf: on the file's inputs a 1e-6 change moves the bases by far more."""
    data = load_parity(FILE)
    meta, train = data["meta"], data["train"]
    x = train["em_input"]
    g = torch.Generator().manual_seed(0)
    mu, _ = em_bases(x, data["emcl_mu_init"], int(meta["stage_num"]), float(meta["lamd"]))
    moved, _ = em_bases(x + 1e-6 * torch.randn(x.shape, generator=g), data["emcl_mu_init"], int(meta["stage_num"]), float(meta["lamd"]))
    torch.testing.assert_close(mu, train["em_final_bases_mu"], atol=0, rtol=0)
    assert float((moved - mu).abs().max()) > 1e-3


# ------------------------------------------------------------------------------------ invariants
def _clip_like(n_text: int, n_video: int, frames: int, d: int, seed: int = 0):
    """Features with a shared offset and per-video content, as CLIP's (the EM is well conditioned on them)."""
    g = torch.Generator().manual_seed(seed)
    offset = 0.3 * torch.randn(d, generator=g)
    content = 0.45 * torch.randn(n_video, 1, d, generator=g)
    video = content + 0.2 * torch.randn(n_video, frames, d, generator=g) + offset
    text = content[torch.arange(n_text) % n_video, 0] + 0.3 * torch.randn(n_text, d, generator=g) + offset
    mask = torch.arange(frames)[None] < torch.randint(1, frames + 1, (n_video,), generator=g)[:, None]
    return text, video, mask


def test_pair_scores_depend_on_the_pair_only(one_thread):
    text, video, mask = _clip_like(5, 4, 6, 64)
    bases = init_bases(16, torch.Generator().manual_seed(3))
    full = emcl_pair_scores(text, video, mask, bases)
    for step in (1, 30000, None):  # one pair per step, two pairs, the default (float rounding: 1e-5)
        torch.testing.assert_close(emcl_pair_scores(text, video, mask, bases, step=step), full, atol=1e-5, rtol=0)
    rows, cols = torch.tensor([4, 0, 2]), torch.tensor([3, 1])
    torch.testing.assert_close(emcl_pair_scores(text[rows], video[cols], mask[cols], bases), full[rows][:, cols], atol=1e-5, rtol=0)
    for a, b in ((0, 0), (4, 1), (2, 3)):
        alone = emcl_block_scores(text[a : a + 1], video[b : b + 1], mask[b : b + 1], bases)[0]
        torch.testing.assert_close(alone[0, 0], full[a, b], atol=1e-5, rtol=0)


def test_padded_frames_get_no_weight_but_share_the_softmax():
    """The reference masks after the softmax without renormalising: padded frames weigh 0 but take part in the
    denominator, so the real frames' weights of a padded video sum to less than 1 (docs/methods/emcl.md)."""
    text, video, mask = _clip_like(3, 4, 6, 16, seed=2)
    mask[1, 3:] = False
    w = pool_weights(text, video, mask)
    assert (w[:, ~mask] == 0).all()
    assert (w[:, 1].sum(-1) < 1 - 1e-3).all() and torch.allclose(w[:, mask.all(1)].sum(-1), torch.ones(3, int(mask.all(1).sum())))


def test_block_scores_depend_on_the_other_items_of_their_block(one_thread):
    text, video, mask = _clip_like(6, 6, 4, 16, seed=1)
    bases = init_bases(8, torch.Generator().manual_seed(4))
    full = emcl_block_scores(text, video, mask, bases)[0]
    changed = text.clone()
    changed[5] = changed[5] + 2.0  # another text of the block
    assert float((emcl_block_scores(changed, video, mask, bases)[0][0] - full[0]).abs().max()) > 1e-4
    for block in ((4, 4), (5, 2)):  # ragged blocks both ways
        grid = emcl_block_grid_scores(text, video, mask, bases, block)
        loop = torch.empty_like(full)
        for i in range(0, 6, block[0]):
            for j in range(0, 6, block[1]):
                loop[i : i + block[0], j : j + block[1]] = emcl_block_scores(text[i : i + block[0]], video[j : j + block[1]], mask[j : j + block[1]], bases)[0]
        torch.testing.assert_close(grid, loop, atol=1e-6, rtol=0, msg=str(block))


def test_em_reconstruction_carries_no_gradient():
    """d(out)/d(x) is the identity: the EM runs without gradient, as in the reference."""
    x = torch.randn(5, 8, requires_grad=True)
    out, _ = em_reconstruct(x, init_bases(4, torch.Generator().manual_seed(0)), steps=3)
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, torch.ones_like(x))


def test_bad_settings_are_refused():
    from tvr_bench.methods.emcl import EMCL

    with pytest.raises(ValueError, match="grouping"):
        EMCL(grouping="blocks")
    with pytest.raises(ValueError, match="positive"):
        EMCL(em_steps=0)
    with pytest.raises(ValueError, match="at least one step"):
        em_bases(torch.randn(3, 4), init_bases(2), steps=0)


# ------------------------------------------------------------------------------------ module
@pytest.mark.parametrize("grouping", ["pair", "reference"])
def test_module_scores_trains_and_keeps_its_bases(grouping):
    from tvr_bench.methods.emcl import EMCL

    torch.manual_seed(0)
    model = EMCL(backbone="tiny", grouping=grouping, reference_block=2, temporal_layers=1)
    assert model.method_name == "emcl" and EMCL.SCORING_OPTIONS == {"grouping": ("pair", "reference")}
    assert "em_bases" in model.state_dict() and model.em_bases.shape == (1, 32)
    size = model.backbone.image_size
    frames = torch.randn(3, 4, 3, size, size)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    tok = model.backbone.tokenize(["a red circle", "a blue square spins slowly", "green"], 12)
    model.eval()
    with torch.no_grad():
        text, video = model.encode_text(**tok), model.encode_video(frames, mask)
        full = model.similarity(text, video)
        assert full.shape == (3, 3) and torch.isfinite(full).all()
        if grouping == "pair":
            torch.testing.assert_close(model.similarity({k: v[1:] for k, v in text.items()}, {k: v[:2] for k, v in video.items()}),
                                       full[1:, :2], atol=1e-6, rtol=0)  # fmt: skip
    assert model.pair_cost_bytes(text, video) > 0
    before = model.em_bases.clone()
    model.train()
    loss, _ = model.training_loss(model.encode_text(**tok), model.encode_video(frames, mask))
    assert torch.isfinite(loss)
    loss.backward()
    assert model.backbone.logit_scale.grad is not None
    assert model.backbone.clip.visual_projection.weight.grad is not None
    assert model.temporal.blocks[0].qkv.weight.grad is not None
    assert float((model.em_bases - before).abs().max()) > 0  # the momentum step
    restored = EMCL(backbone="tiny", grouping=grouping, reference_block=2, temporal_layers=1)
    restored.load_state_dict(model.state_dict())
    torch.testing.assert_close(restored.em_bases, model.em_bases, atol=0, rtol=0)


def test_method_recipes_instantiate():
    from pathlib import Path

    import yaml

    from tvr_bench.methods.emcl import EMCL

    root = Path(__file__).resolve().parents[1] / "recipes" / "methods"
    args = dict(yaml.safe_load((root / "emcl.yaml").read_text())["model"]["init_args"])
    for extra in sorted(root.glob("emcl_*.yaml")):  # per-dataset overrides only touch known args
        over = yaml.safe_load(extra.read_text()).get("model", {}).get("init_args", {})
        assert set(over) <= set(args), (extra.name, set(over) - set(args))
    model = EMCL(**args)
    assert model.hparams.grouping == "pair" and model.eval_block_sizes() is None
    assert EMCL(**{**args, "grouping": "reference"}).eval_block_sizes() == (32, 32)
