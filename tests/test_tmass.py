"""T-MASS: parity with the reference code's vectors, fast M-sample scorer, seeded RNG, training sanity."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import REFERENCE_METRIC_KEYS as METRIC_KEYS
from tests.conftest import load_parity, parity_atol as _atol
from tvr_bench.functional.tmass import (
    RadiusHead,
    counter_prior,
    hash_uniform,
    paired_frame_cosines,
    sample_prior,
    stochastic_text,
    tmass_similarity,
    tmass_similarity_reference,
    tmass_training_loss,
)
from tvr_bench.functional.xpool import TextConditionedPool, map_reference_state_dict



def _prefixes(state: dict) -> tuple[str, str]:
    """Prefixes of the pooling and the stochastic sub-modules in a saved CLIPStochastic state dict."""
    pool = {k.split("cross_attn.")[0] for k in state if "cross_attn." in k}
    stoch = {k.split("std_branch.")[0] for k in state if "std_branch." in k}
    assert len(pool) == 1 and len(stoch) == 1, (pool, stoch)
    return pool.pop(), stoch.pop()


def _modules(blob: dict) -> tuple[TextConditionedPool, RadiusHead]:
    cfg, state = blob["config"], blob["state_dict"]
    pool_prefix, stoch_prefix = _prefixes(state)
    pool = TextConditionedPool(cfg["embed_dim"], cfg.get("num_mha_heads", 1), cfg["transformer_dropout"])
    pool.load_reference_state_dict(state, pool_prefix)
    radius = RadiusHead(cfg["num_frames"], cfg["embed_dim"])
    radius.load_reference_state_dict(state, stoch_prefix)
    return pool, radius


# ------------------------------------------------------------------------------------ radius
def test_radius_parity_every_case():
    """log R, t + eps ⊙ R and the default init match `tmass_radius.pt` for every prior and weight set."""
    blob = load_parity("tmass_radius.pt")
    atol = _atol(blob)
    cases = [name for name, case in blob.items() if isinstance(case, dict) and "config" in case]
    assert cases
    for name in cases:
        case = blob[name]
        cfg = case["config"]
        text, frames = case["text_features"], case["video_features"]
        fresh = RadiusHead(cfg["num_frames"], cfg["embed_dim"])
        init = case["state_dict_init"]
        torch.testing.assert_close(fresh.proj.weight, next(v for k, v in init.items() if k.endswith("linear_proj.weight")))
        torch.testing.assert_close(fresh.proj.bias, next(v for k, v in init.items() if k.endswith("linear_proj.bias")))
        for key in (k for k in case if k.startswith("state_dict_")):
            weights = key.removeprefix("state_dict_")
            radius = RadiusHead(cfg["num_frames"], cfg["embed_dim"])
            radius.load_reference_state_dict(case[key])
            with torch.no_grad():
                log_r = radius(paired_frame_cosines(text, frames))
                torch.testing.assert_close(log_r, case[f"log_var_{weights}"], atol=atol, rtol=0, msg=f"{name}/{weights}")
                t_s = stochastic_text(text, log_r, case[f"eps_{weights}"])
            torch.testing.assert_close(t_s, case[f"text_stochastic_{weights}"], atol=atol, rtol=0)
            # our training-time prior draws the same numbers from torch's RNG as the reference
            torch.manual_seed(case["torch_manual_seed_before_call"])
            eps = sample_prior(cfg["stochastic_prior"], cfg["stochastic_prior_std"], tuple(text.shape))
            torch.testing.assert_close(eps, case[f"eps_{weights}"], atol=0, rtol=0)


# ------------------------------------------------------------------------------------ training
def test_train_step_parity():
    """Main and support losses, their sims and every gradient (incl. the temperature) match one reference step."""
    blob = load_parity("tmass_train_step.pt")
    atol = _atol(blob)
    cfg = blob["config"]
    pool, radius = _modules(blob)
    pool.train()
    logit_scale = torch.nn.Parameter(blob["logit_scale_param"].clone())
    torch.manual_seed(blob["torch_manual_seed_before_step"])
    eps = sample_prior(cfg["stochastic_prior"], cfg.get("stochastic_prior_std", 1.0), tuple(blob["text_features"].shape))
    torch.testing.assert_close(eps, blob["eps"], atol=0, rtol=0)
    total, parts = tmass_training_loss(
        pool, radius, blob["text_features"], blob["frame_features"], None, logit_scale, blob["eps"],
        cfg["support_loss_weight"],
    )  # fmt: skip
    torch.testing.assert_close(total, blob["loss_total"], atol=atol, rtol=0)
    torch.testing.assert_close(parts["loss_main"], blob["loss_main"], atol=atol, rtol=0)
    torch.testing.assert_close(parts["loss_support"], blob["loss_support"], atol=atol, rtol=0)
    total.backward()
    pool_prefix, stoch_prefix = _prefixes(blob["state_dict"])
    ours = {**{f"pool.{k}": p for k, p in pool.named_parameters()}, **{f"radius.{k}": p for k, p in radius.named_parameters()}}
    checked = 0
    for key, grad in blob["grads_before_clip"].items():
        if key.startswith(pool_prefix):
            (name,) = map_reference_state_dict({key: grad}, pool_prefix)
            param = ours[f"pool.{name}"]
        elif key.startswith(stoch_prefix):
            param = ours[f"radius.proj.{key.rsplit('.', 1)[1]}"]
        else:
            assert key.endswith("logit_scale"), key
            param = logit_scale
        torch.testing.assert_close(param.grad, grad, atol=atol, rtol=0, msg=key)
        checked += 1
    assert checked == len(blob["grads_before_clip"])


def test_train_step_sims_parity():
    """The stochastic and support similarity matrices themselves match the saved ones."""
    blob = load_parity("tmass_train_step.pt")
    atol = _atol(blob)
    pool, radius = _modules(blob)
    text, frames, eps = blob["text_features"], blob["frame_features"], blob["eps"]
    with torch.no_grad():
        z = pool.eval()(text, frames)
        log_r = radius(paired_frame_cosines(text, frames))
        t_s = stochastic_text(text, log_r, eps)
        sims = torch.nn.functional.normalize(t_s, dim=-1).unsqueeze(1).mul(torch.nn.functional.normalize(z, dim=-1)).sum(-1)
        torch.testing.assert_close(sims, blob["sims_stochastic"], atol=atol, rtol=0)
        pointer = z.mean(0) - text
        support = text + log_r.exp() * pointer / pointer.norm(dim=-1, keepdim=True)
        sims_sup = torch.nn.functional.normalize(support, dim=-1).unsqueeze(1).mul(torch.nn.functional.normalize(z, dim=-1)).sum(-1)
        torch.testing.assert_close(sims_sup, blob["sims_support"], atol=atol, rtol=0)


# ------------------------------------------------------------------------------------ evaluation
def _grouping(all_vid_ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(video column, position among the video's captions) per text, in first-appearance order."""
    order: dict[str, int] = {}
    counts: dict[str, int] = {}
    col, pos = [], []
    for vid in all_vid_ids:
        order.setdefault(vid, len(order))
        col.append(order[vid])
        pos.append(counts.get(vid, 0))
        counts[vid] = counts.get(vid, 0) + 1
    return torch.tensor(col), torch.tensor(pos)


def _own_captions(text: torch.Tensor, col: torch.Tensor, pos: torch.Tensor, n_video: int) -> torch.Tensor:
    own = torch.full((n_video, int(pos.max()) + 1, text.shape[1]), float("nan"))
    own[col, pos] = text
    return own


def test_eval_loop_parity_reference_pairing():
    """The reference evaluation (own-caption pairing, saved eps of every trial) is reproduced entry by entry."""
    blob = load_parity("tmass_eval_loop.pt")
    atol = _atol(blob)
    pool, radius = _modules(blob)
    pool.eval()
    text, frames = blob["text_features"], blob["frame_features"]
    col, pos = _grouping(list(blob["all_vid_ids"]))
    torch.testing.assert_close(col, blob["pair_vid_index"].long())
    n_video = frames.shape[0]
    eps_trials = blob["eps_trials"]  # [videos, trials, texts, D]
    assert eps_trials.shape[1] == blob["config"]["stochasic_trials"]
    eps = eps_trials.permute(2, 0, 1, 3)  # per pair: [texts, videos, trials, D]
    own = _own_captions(text, col, pos, n_video)
    with torch.no_grad():
        torch.testing.assert_close(pool(text, frames).transpose(0, 1), blob["pooled_all_texts"], atol=atol, rtol=0)
        fast = tmass_similarity(pool, radius, text, frames, None, eps, own_text=own, text_pos=pos)
        ref = tmass_similarity_reference(pool, radius, text, frames, None, eps, own_text=own, text_pos=pos)
        query = tmass_similarity(pool, radius, text, frames, None, eps)
    for key in (k for k in blob if k.startswith("sims") and "DSL" not in k):
        expected = blob[key][col, pos]  # [texts, videos]
        for ours in (fast, ref):
            assert torch.equal(ours.isnan(), expected.isnan()), key
            torch.testing.assert_close(ours.nan_to_num(7.0), expected.nan_to_num(7.0), atol=atol, rtol=0, msg=key)
    # positives coincide with the paper's (query) pairing; negatives generally do not
    rows = torch.arange(len(col))
    torch.testing.assert_close(query[rows, col], fast[rows, col], atol=atol, rtol=0)
    assert not query.isnan().any()

    metrics = pytest.importorskip("tvr_bench.metrics")
    ours = metrics.retrieval_metrics(fast, col)
    # v2t: NaN captions are ignored by the group max, as the reference's NaN -> -inf does
    for key, our_key in METRIC_KEYS.items():
        assert ours[f"v2t/{our_key}"] == pytest.approx(blob["res_v2t"][key], abs=atol), key
    if not fast.isnan().any():  # the reference ranks NaN first in t2v, we rank it last (documented)
        for key, our_key in METRIC_KEYS.items():
            assert ours[f"t2v/{our_key}"] == pytest.approx(blob["res_t2v"][key], abs=atol), key


# ------------------------------------------------------------------------------------ fast scorer
def _setup(dim: int, heads: int, scale: float, n_text: int, n_video: int, frames: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pool = TextConditionedPool(dim, heads, 0.3).eval()
    radius = RadiusHead(frames, dim)
    with torch.no_grad():
        for p in list(pool.parameters()) + list(radius.parameters()):
            p.add_(scale * torch.randn(p.shape, generator=g))
    offset = 0.3 * torch.randn(dim, generator=g)
    video = 0.45 * torch.randn(n_video, 1, dim, generator=g) + 0.2 * torch.randn(n_video, frames, dim, generator=g)
    text = 0.45 * torch.randn(n_text, dim, generator=g) + offset
    return pool, radius, text, video + offset


@pytest.mark.parametrize(("dim", "heads", "scale", "prior"), [(64, 1, 0.2, "uniform01"), (64, 4, 0.2, "normal"),
                                                             (512, 1, 0.02, "uniform01"), (512, 8, 0.2, "uniform01")])  # fmt: skip
def test_fast_equals_reference(dim: int, heads: int, scale: float, prior: str):
    """Fast M-sample scores == one-shot reference math, for eps per text and per pair."""
    pool, radius, text, frames = _setup(dim, heads, scale, 11, 9)
    std = 0.5 if prior == "normal" else 1.0
    eps_text = counter_prior(prior, std, 7, torch.arange(11), 20, dim)
    eps_pair = counter_prior(prior, std, 7, torch.arange(11), 5, dim, torch.arange(9))
    with torch.no_grad():
        for eps in (eps_text, eps_pair):
            ref = tmass_similarity_reference(pool, radius, text, frames, None, eps)
            fast = tmass_similarity(pool, radius, text, frames, None, eps)
            torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)


def test_blocks_give_the_same_entries():
    """With eps drawn from global indices, any block of texts x videos reproduces the full matrix."""
    pool, radius, text, frames = _setup(48, 2, 0.2, 14, 10, frames=6)
    mask = torch.ones(10, 6, dtype=torch.bool)
    mask[3, 4:] = False
    t_idx, v_idx = torch.arange(14), torch.arange(10)
    for per_pair in (False, True):

        def eps(ti: torch.Tensor, vi: torch.Tensor) -> torch.Tensor:
            return counter_prior("uniform01", 1.0, 5, ti, 20, 48, vi if per_pair else None)

        with torch.no_grad():
            full = tmass_similarity(pool, radius, text, frames, mask, eps(t_idx, v_idx))
            ref = tmass_similarity_reference(pool, radius, text, frames, mask, eps(t_idx, v_idx))
            torch.testing.assert_close(full, ref, atol=1e-5, rtol=0)
            tiny = tmass_similarity(pool, radius, text, frames, mask, eps(t_idx, v_idx), max_bytes=1)
            torch.testing.assert_close(tiny, full, atol=1e-6, rtol=0)
            for ts, vs in [(slice(0, 4), slice(2, 9)), (slice(9, 14), slice(0, 1)), (slice(13, 14), slice(0, 10))]:
                block = tmass_similarity(pool, radius, text[ts], frames[vs], mask[vs], eps(t_idx[ts], v_idx[vs]))
                torch.testing.assert_close(block, full[ts, vs], atol=1e-6, rtol=0)


def test_counter_rng_is_seeded_and_well_spread():
    """Counter-hash draws: same (seed, index) -> same numbers; right moments; seeds and indices decorrelate."""
    idx = torch.arange(200)
    a = counter_prior("uniform01", 1.0, 3, idx, 20, 64)
    torch.testing.assert_close(a, counter_prior("uniform01", 1.0, 3, idx, 20, 64), atol=0, rtol=0)
    torch.testing.assert_close(a[50:60], counter_prior("uniform01", 1.0, 3, idx[50:60], 20, 64), atol=0, rtol=0)
    assert a.min() >= 0 and a.max() < 1
    assert abs(float(a.mean()) - 0.5) < 0.01 and abs(float(a.var()) - 1 / 12) < 0.005
    b = counter_prior("uniform01", 1.0, 4, idx, 20, 64)
    assert abs(float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])) < 0.01
    flat = a.reshape(-1)
    assert abs(float(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1])) < 0.01
    n = counter_prior("normal", 3e-3, 3, idx, 20, 64)
    assert abs(float(n.mean())) < 3e-5 and abs(float(n.std()) - 3e-3) < 5e-5
    pair = counter_prior("uniform01", 1.0, 3, idx[:5], 4, 8, torch.arange(6))
    assert pair.shape == (5, 6, 4, 8) and not torch.equal(pair[:, 0], pair[:, 1])
    assert hash_uniform(1, torch.arange(4)).unique().numel() == 4


# ------------------------------------------------------------------------------------ training sanity
@pytest.fixture
def one_thread():
    """Tiny problems run faster on one thread (no OpenMP hand-offs on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_gradients_flow_and_loss_decreases(one_thread):
    """Both losses back-propagate into pooling and radius; a few Adam steps lower the total loss."""
    torch.manual_seed(0)
    pool, radius, text, frames = _setup(32, 1, 0.0, 8, 8, frames=6, seed=1)
    frames = frames + 0.5 * text.unsqueeze(1)
    pool.dropout.p = 0.0
    pool.train()
    logit_scale = torch.tensor(2.0)
    eps = sample_prior("uniform01", 1.0, (8, 32), generator=torch.Generator().manual_seed(0))
    params = list(pool.parameters()) + list(radius.parameters())

    def loss_fn() -> torch.Tensor:
        return tmass_training_loss(pool, radius, text, frames, None, logit_scale, eps, 0.8)[0]

    loss = loss_fn()
    loss.backward()
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert float(radius.proj.weight.grad.abs().sum()) > 0
    first = float(loss.detach())
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(25):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert float(loss_fn().detach()) < first - 0.1


# ------------------------------------------------------------------------------------ LightningModule
def _tiny_eval_batch(model, n_video: int = 3, n_frames: int = 4):
    size = model.backbone.image_size
    captions = ["a red circle", "a red ball", "a blue square spins", "green", "green grass", "a green field"]
    caption_video = torch.tensor([0, 0, 1, 2, 2, 2])
    keys = ["v0#1", "v0#0", "v1#0", "v2#0", "v2#2", "v2#1"]
    return {
        "frames": torch.randn(n_video, n_frames, 3, size, size),
        "frame_mask": torch.ones(n_video, n_frames, dtype=torch.bool),
        "captions": captions,
        "caption_video": caption_video,
        "caption_key": keys,
        "video_key": ["v0", "v1", "v2"],
    }


def test_module_eval_is_block_independent_and_seeded():
    """TMASS: scores of a block equal the full matrix's entries (eps from the global indices) and follow the seed."""
    from tvr_bench.methods.tmass import TMASS

    torch.manual_seed(0)
    model = TMASS(backbone="tiny", num_frames=4, trials=5, max_words=16).eval()
    batch = _tiny_eval_batch(model)
    with torch.no_grad():
        out = model._eval_step(batch)
        text, video = out["text"], out["video"]
        text["index"], video["index"] = torch.arange(6), torch.arange(3)
        full = model.similarity(text, video)
        block = model.similarity({k: v[2:5] for k, v in text.items()}, {k: v[1:] for k, v in video.items()})
        torch.testing.assert_close(block, full[2:5, 1:], atol=1e-6, rtol=0)
        ref = tmass_similarity_reference(
            model.pool, model.radius, text["embeds"], video["frames"], video["frame_mask"], model.eval_eps(text, video)
        )
        torch.testing.assert_close(full, ref, atol=1e-5, rtol=0)
        model.eval_seed = 1
        assert not torch.allclose(model.similarity(text, video), full)
        model.eval_seed, model.eps_mode = 0, "pair"
        pair = model.similarity(text, video)
        torch.testing.assert_close(
            model.similarity({k: v[:2] for k, v in text.items()}, {k: v[2:] for k, v in video.items()}), pair[:2, 2:],
            atol=1e-6, rtol=0,
        )  # fmt: skip


def test_module_reference_pairing_and_training():
    """pairing='reference' uses each candidate's own caption at the query's position (NaN past its last one)."""
    from tvr_bench.methods.tmass import TMASS, own_caption_layout

    torch.manual_seed(0)
    model = TMASS(backbone="tiny", num_frames=4, trials=3, max_words=16, pairing="reference", max_captions=4)
    assert model.method_name == "tmass_refpairing"
    batch = _tiny_eval_batch(model)
    model.eval()
    with torch.no_grad():
        out = model._eval_step(batch)
        text, video = out["text"], out["video"]
        with pytest.raises(KeyError, match="prepare_eval_features"):
            model.similarity(text, video)
        # rows in the evaluator's order: by video, then by the `key#j` index
        order = sorted(range(6), key=lambda i: (batch["video_key"][int(batch["caption_video"][i])], batch["caption_key"][i]))
        text = {k: v[order] for k, v in text.items()}
        t2v = batch["caption_video"][order]
        text["index"], video["index"] = torch.arange(6), torch.arange(3)
        text, video = model.prepare_eval_features(text, video, t2v)
        assert text["caption_pos"].tolist() == [0, 1, 0, 0, 1, 2]
        assert video["caption_embeds"].shape[:2] == (3, 3)  # as many positions as the longest video has captions
        sims = model.similarity(text, video)
    # caption position 1 exists for videos 0 and 2 only; position 2 only for video 2
    assert sims[1, 1].isnan() and not sims[1, 0].isnan() and not sims[1, 2].isnan()
    assert sims[5, :2].isnan().all() and not sims[5, 2].isnan()
    assert not sims[[0, 2, 3]].isnan().any()
    with pytest.raises(ValueError, match="max_captions"):
        own_caption_layout(text["embeds"], t2v, 3, 2)
    query = TMASS(backbone="tiny", num_frames=4, trials=3, max_words=16)
    assert query.prepare_eval_features(text, video, t2v) == (text, video)  # the default pairing adds nothing
    model.train()
    text = model.encode_text(**model.tokenize(batch["captions"][:3]))
    video = model.encode_video(batch["frames"], batch["frame_mask"])
    model.support_weight = 0.8
    loss, parts = model.training_loss(text, video)
    assert set(parts) == {"loss_main", "loss_support"}
    loss.backward()
    assert model.radius.proj.weight.grad is not None and model.pool.q_proj.weight.grad is not None
    with pytest.raises(ValueError, match="num_frames"):
        model.encode_video(torch.randn(1, 5, *batch["frames"].shape[2:]), torch.ones(1, 5, dtype=torch.bool))


def test_one_caption_pairings_differ_on_negatives():
    """With ONE caption per video the two pairings still differ: the reference scores the selected sample
    against the candidate pooled with its own caption, the query pairing against the candidate pooled with
    the query. Positives coincide, negatives do not (a worked example for docs/methods/tmass.md)."""
    n, dim, trials = 6, 64, 20
    pool, radius, text, frames = _setup(dim, 1, 0.2, n, n, frames=8, seed=3)
    eps = counter_prior("uniform01", 1.0, 0, torch.arange(n), trials, dim, torch.arange(n))  # per pair, as the reference
    own, pos = text.unsqueeze(1), torch.zeros(n, dtype=torch.long)  # caption i belongs to video i
    with torch.no_grad():
        query = tmass_similarity_reference(pool, radius, text, frames, None, eps)
        reference = tmass_similarity_reference(pool, radius, text, frames, None, eps, own, pos)
        fast_ref = tmass_similarity(pool, radius, text, frames, None, eps, own, pos)
        # an independent loop oracle of the reference's rule, pair by pair
        z = pool(text, frames)  # [T, V, D]: z[t, v] = z_{v | t}
        oracle = torch.empty(n, n)
        for t in range(n):
            for v in range(n):
                r = radius(torch.nn.functional.cosine_similarity(text[t], frames[v], dim=-1)).exp()
                samples = text[t] + eps[t, v] * r  # [M, D]
                best = torch.nn.functional.cosine_similarity(samples, z[t, v][None], dim=-1).argmax()
                oracle[t, v] = torch.nn.functional.cosine_similarity(samples[best], z[v, v], dim=0)
    torch.testing.assert_close(reference, oracle, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast_ref, oracle, atol=1e-5, rtol=0)
    diag = torch.eye(n, dtype=torch.bool)
    torch.testing.assert_close(query[diag], reference[diag], atol=1e-6, rtol=0)
    assert float((query - reference)[~diag].abs().max()) > 1e-3  # negatives differ


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\(\)`")
def test_reference_pairing_with_captions_split_across_eval_batches(tmp_path):
    """The evaluator path (batches -> assemble -> prepare_eval_features -> blocked scores) reproduces the reference
    loop entry by entry when the eval batch size splits a video's captions over several batches (positions and
    own captions come from the whole set, as the reference groups them)."""
    from types import SimpleNamespace

    from tvr_bench.callbacks.evaluator import RetrievalEvaluator
    from tvr_bench.methods.tmass import TMASS

    blob = load_parity("tmass_eval_loop.pt")
    atol, cfg = _atol(blob), blob["config"]
    pool, radius = _modules(blob)
    text, frames = blob["text_features"], blob["frame_features"]
    vids = list(blob["all_vid_ids"])
    col, pos = _grouping(vids)
    first_seen = list(dict.fromkeys(vids))  # video of each frame_features row (first-appearance order)
    model = TMASS(backbone="tiny", num_frames=cfg["num_frames"], trials=cfg["stochasic_trials"], pairing="reference",
                  eval_memory_mb=1e-3)  # a tiny budget: one text x one video per block  # fmt: skip
    model.pool, model.radius = pool, radius
    model.eval()
    eps_pair = blob["eps_trials"].permute(2, 0, 1, 3)  # [pairs, videos (first-seen order), trials, D]
    # the evaluator sorts texts by (video key, key#j) and videos by key; map its indices back to the saved eps
    text_rows = sorted(range(len(vids)), key=lambda i: (vids[i], int(pos[i])))
    video_rows = sorted(range(len(first_seen)), key=lambda v: first_seen[v])
    model.eval_eps = lambda t, v: eps_pair[torch.tensor(text_rows)[t["index"]]][:, torch.tensor(video_rows)[v["index"]]]
    evaluator = RetrievalEvaluator(print_table=False, save_scores=str(tmp_path / "scores.pt"))
    batch_size = cfg["val_batch_size"]
    batches = [list(range(i, min(i + batch_size, len(vids)))) for i in range(0, len(vids), batch_size)]
    split = {v for v in set(vids) if len({b for b, rows in enumerate(batches) for i in rows if vids[i] == v}) > 1}
    assert split, "the batch size must split some video's captions over two batches for this test to mean anything"
    for rows in batches:
        batch_videos = list(dict.fromkeys(vids[i] for i in rows))
        evaluator.on_test_batch_end(None, model, {
            "text": {"embeds": text[rows]},
            "video": {"frames": frames[[first_seen.index(v) for v in batch_videos]],
                      "frame_mask": torch.ones(len(batch_videos), frames.shape[1], dtype=torch.bool)},
            "video_key": batch_videos,
            "caption_key": [f"{vids[i]}#{int(pos[i])}" for i in rows],
            "caption_video": torch.tensor([batch_videos.index(vids[i]) for i in rows]),
        }, None, 0)  # fmt: skip
    with torch.no_grad():
        evaluator._evaluate(SimpleNamespace(is_global_zero=True), model, "test")
    saved = torch.load(tmp_path / "scores.pt", weights_only=False)
    assert saved["caption_keys"] == [f"{vids[i]}#{int(pos[i])}" for i in text_rows]
    vcols = [first_seen.index(k) for k in saved["video_keys"]]
    for key in (k for k in blob if k.startswith("sims") and "DSL" not in k):
        expected = blob[key][col[text_rows], pos[text_rows]][:, vcols]  # [texts, videos] in the evaluator's order
        assert torch.equal(saved["sim"].isnan(), expected.isnan()), key
        torch.testing.assert_close(saved["sim"].nan_to_num(7.0), expected.nan_to_num(7.0), atol=atol, rtol=0, msg=key)


def test_evaluator_scores_are_float32_under_cpu_autocast():
    """The evaluator's blocked scoring (any method) runs in float32 with autocast off: under bf16 autocast and with
    bf16 features (as a bf16-mixed eval step returns them) the scores are float32 and match the fp32 ones."""
    from tvr_bench.callbacks.evaluator import blocked_similarity
    from tvr_bench.methods.tmass import TMASS

    torch.manual_seed(0)
    model = TMASS(backbone="tiny", num_frames=4, trials=5, max_words=16).eval()
    with torch.no_grad():
        out = model._eval_step(_tiny_eval_batch(model))
    text, video = out["text"], out["video"]
    text["index"], video["index"] = torch.arange(6), torch.arange(3)
    fp32 = blocked_similarity(model, text, video, budget_mb=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = blocked_similarity(model, text, video, budget_mb=1e-3)
        half = {k: v.bfloat16() if v.is_floating_point() else v for k, v in text.items()}
        from_bf16 = blocked_similarity(model, half, video, budget_mb=1.0)
    assert mixed.dtype == from_bf16.dtype == torch.float32
    torch.testing.assert_close(mixed, fp32, atol=1e-6, rtol=0)
    torch.testing.assert_close(from_bf16, fp32, atol=2e-2, rtol=0)
    # a plain cosine scorer (CLIP4Clip-style matmul) would run in bf16 under autocast: the evaluator switches it off

    class Cosine:
        def similarity(self, t: dict, v: dict) -> torch.Tensor:
            return t["embeds"] @ v["embeds"].T

        def pair_cost_bytes(self, t: dict, v: dict) -> int:
            return 4

    g = torch.Generator().manual_seed(1)
    t = {"embeds": torch.nn.functional.normalize(torch.randn(40, 64, generator=g), dim=-1)}
    v = {"embeds": torch.nn.functional.normalize(torch.randn(30, 64, generator=g), dim=-1)}
    exact = t["embeds"] @ v["embeds"].T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (t["embeds"] @ v["embeds"].T).dtype == torch.bfloat16  # what autocast would do
        scored = blocked_similarity(Cosine(), t, v, budget_mb=1e-3)
    assert scored.dtype == torch.float32
    torch.testing.assert_close(scored, exact, atol=1e-6, rtol=0)


@pytest.mark.parametrize("per_pair", [False, True])
def test_fast_scorer_steps_cover_every_pair(monkeypatch, per_pair: bool):
    """Text chunks, video blocks and D-vector sub-steps that do not divide the sizes give the reference scores,
    for both eps layouts and both pairings (with a masked frame)."""
    from tvr_bench.functional import tmass as tm

    monkeypatch.setattr(tm, "TMASS_VIDEO_BLOCK", 4)
    monkeypatch.setattr(tm, "TMASS_TEXT_CHUNK", 6)
    pool, radius, text, frames = _setup(32, 2, 0.2, 14, 10, frames=5, seed=4)
    mask = torch.ones(10, 5, dtype=torch.bool)
    mask[7, 3:] = False
    eps = counter_prior("uniform01", 1.0, 2, torch.arange(14), 6, 32, torch.arange(10) if per_pair else None)
    col = torch.arange(14) % 10  # videos 0-3 have two captions
    from tvr_bench.methods.tmass import caption_positions, own_caption_layout

    pos, own = own_caption_layout(text, col, 10, 4)
    assert torch.equal(pos, caption_positions(col, 10))
    step = tm.tmass_pair_bytes(32, 6, per_pair) * 4 * 2  # 4 videos x 2 texts per D-vector step
    with torch.no_grad():
        for own_text, text_pos in ((None, None), (own, pos)):
            ref = tm.tmass_similarity_reference(pool, radius, text, frames, mask, eps, own_text, text_pos)
            fast = tm.tmass_similarity(pool, radius, text, frames, mask, eps, own_text, text_pos, block_bytes=step)
            assert torch.equal(fast.isnan(), ref.isnan())
            torch.testing.assert_close(fast.nan_to_num(3.0), ref.nan_to_num(3.0), atol=1e-5, rtol=0)


def test_step_sizes_cache_sized_on_cpu_whole_budget_on_accelerators():
    """Scorer steps: the cache-sized constant (capped by the budget) on CPU, the whole budget on a GPU; the
    accelerator's single large step gives the same scores (checked here on CPU)."""
    from tvr_bench.functional import tmass as tm
    from tvr_bench.functional.steps import step_bytes

    assert step_bytes(torch.device("cpu"), 16, 100) == 16 and step_bytes(torch.device("cpu"), 16, 8) == 8
    assert step_bytes(torch.device("cuda", 0), 16, 100) == 100 and step_bytes(torch.device("meta"), 16, 100) == 100
    assert step_bytes(torch.device("cuda", 0), 16, 100, requested=7) == 7 == step_bytes(torch.device("cpu"), 16, 100, 7)
    pool, radius, text, frames = _setup(32, 2, 0.2, 14, 10, frames=5, seed=4)
    eps = counter_prior("uniform01", 1.0, 2, torch.arange(14), 6, 32)
    with torch.no_grad():
        ref = tm.tmass_similarity_reference(pool, radius, text, frames, None, eps)
        budget = 256 * 2**20
        whole = tm.tmass_similarity(pool, radius, text, frames, None, eps, max_bytes=budget, block_bytes=budget)
        default = tm.tmass_similarity(pool, radius, text, frames, None, eps, max_bytes=budget)
    torch.testing.assert_close(whole, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(default, ref, atol=1e-5, rtol=0)
