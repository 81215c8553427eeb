"""X-Pool: parity with the reference code's vectors, fast scorer == reference math, training sanity."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import REFERENCE_METRIC_KEYS as METRIC_KEYS
from tests.conftest import load_parity, parity_atol as _atol
from tvr_bench.functional.losses import symmetric_infonce
from tvr_bench.functional.xpool import (
    TextConditionedPool,
    baseline_pool_reference,
    baseline_similarity,
    cosine,
    map_reference_state_dict,
    xpool_similarity_fast,
    xpool_similarity_reference,
)



def _pool_from_config(cfg: dict) -> TextConditionedPool:
    return TextConditionedPool(cfg["embed_dim"], cfg["num_mha_heads"], cfg["transformer_dropout"]).eval()


def _pool_cases() -> list[tuple[str, str]]:
    blob = load_parity("xpool_pool.pt")
    cases = []
    for name, case in blob.items():
        if isinstance(case, dict) and "config" in case:
            cases += [(name, key.removeprefix("state_dict_")) for key in case if key.startswith("state_dict_")]
    assert cases, "xpool_pool.pt holds no cases"
    return cases


def test_pool_parity_every_case():
    """Pooled vectors, training sims and CLIP loss match the reference for every head count and weight set."""
    blob = load_parity("xpool_pool.pt")
    atol = _atol(blob)
    for name, weights in _pool_cases():
        case = blob[name]
        pool = _pool_from_config(case["config"])
        pool.load_reference_state_dict(case[f"state_dict_{weights}"])
        text, frames = case["text_embeds"], case["video_embeds"]
        with torch.no_grad():
            out = pool(text, frames).transpose(0, 1)  # reference layout [V, T, D]
            torch.testing.assert_close(out, case[f"out_{weights}"], atol=atol, rtol=0, msg=f"{name}/{weights}")
            ref = xpool_similarity_reference(pool, text, frames)
            fast = xpool_similarity_fast(pool, text, frames)
            torch.testing.assert_close(fast, ref, atol=atol, rtol=0, msg=f"{name}/{weights} fast")
            expected_sims = cosine(text.unsqueeze(1), case[f"out_{weights}"].transpose(0, 1))
            torch.testing.assert_close(fast, expected_sims, atol=atol, rtol=0)


def test_pool_training_block_parity():
    """The training-style block (saved with the perturbed weights) gives the reference sims and loss."""
    blob = load_parity("xpool_pool.pt")
    atol = _atol(blob)
    for name, case in blob.items():
        if not (isinstance(case, dict) and "train_pooled" in case):
            continue
        train_text, frames = case["train_text_embeds"], case["video_embeds"]
        matched = []
        for key in (k for k in case if k.startswith("state_dict_")):
            pool = _pool_from_config(case["config"])
            pool.load_reference_state_dict(case[key])
            with torch.no_grad():
                pooled = pool(train_text, frames)
            if torch.allclose(pooled.transpose(0, 1), case["train_pooled"], atol=atol, rtol=0):
                matched.append(key)
                sims = cosine(train_text.unsqueeze(1), pooled)
                torch.testing.assert_close(sims, case["train_sims"], atol=atol, rtol=0)
                loss = symmetric_infonce(sims, case["logit_scale_param"])
                torch.testing.assert_close(loss, case["clip_loss"], atol=atol, rtol=0)
        assert matched, f"{name}: no saved weight set reproduces train_pooled"


def _groups(all_vid_ids: list[str]) -> tuple[list[str], list[tuple[int, int]]]:
    """Video ids in first-appearance order and (group, position) of every text, as the reference groups them."""
    order: dict[str, int] = {}
    counts: dict[str, int] = {}
    where = []
    for vid in all_vid_ids:
        order.setdefault(vid, len(order))
        where.append((order[vid], counts.get(vid, 0)))
        counts[vid] = counts.get(vid, 0) + 1
    return list(order), where


def _flat_expected(sims3: torch.Tensor, where: list[tuple[int, int]]) -> torch.Tensor:
    return torch.stack([sims3[g, m] for g, m in where])


def test_eval_loop_parity():
    """The whole multi-caption evaluation: flat [n_text, n_video] scores equal the reference's [G, P, V] sims."""
    blob = load_parity("xpool_eval_loop.pt")
    atol = _atol(blob)
    text, frames = blob["text_features"], blob["frame_features"]
    videos, where = _groups(list(blob["all_vid_ids"]))
    assert len(videos) == frames.shape[0]
    text_to_video = torch.tensor([g for g, _ in where])
    torch.testing.assert_close(text_to_video, blob["pair_vid_index"].long())
    heads = blob.get("config", {}).get("num_mha_heads", 1)  # the file was made with the repo default (1)
    pool = TextConditionedPool(text.shape[1], heads, 0.0).eval()
    pool.load_reference_state_dict(blob["pool_frames_state_dict"])
    with torch.no_grad():
        torch.testing.assert_close(pool(text, frames).transpose(0, 1), blob["pooled_all_texts"], atol=atol, rtol=0)
        fast = xpool_similarity_fast(pool, text, frames)
        ref = xpool_similarity_reference(pool, text, frames)
    expected = _flat_expected(blob["sims"], where)
    assert not expected.isnan().any()
    torch.testing.assert_close(fast, expected, atol=atol, rtol=0)
    torch.testing.assert_close(ref, expected, atol=atol, rtol=0)
    # every padded entry of the reference tensor is NaN, every real one is ours
    assert int((~blob["sims"].isnan()).sum()) == expected.numel()

    metrics = pytest.importorskip("tvr_bench.metrics")
    ours = metrics.retrieval_metrics(fast, text_to_video)
    for direction in ("t2v", "v2t"):
        theirs = blob[f"res_{direction}"]
        for key, our_key in METRIC_KEYS.items():
            assert ours[f"{direction}/{our_key}"] == pytest.approx(theirs[key], abs=atol), (direction, key)


# ----------------------------------------------------------------------------- fast == reference
def _perturbed_pool(dim: int, heads: int, scale: float, seed: int) -> TextConditionedPool:
    g = torch.Generator().manual_seed(seed)
    pool = TextConditionedPool(dim, heads, 0.3).eval()
    with torch.no_grad():
        for p in pool.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return pool


def _clip_like(n_text: int, n_video: int, frames: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw CLIP-like features: a shared offset, per-video content, small per-frame changes."""
    g = torch.Generator().manual_seed(seed)
    offset = 0.3 * torch.randn(dim, generator=g)
    video = 0.45 * torch.randn(n_video, 1, dim, generator=g) + 0.2 * torch.randn(n_video, frames, dim, generator=g)
    text = 0.45 * torch.randn(n_text, dim, generator=g) + offset
    return text, video + offset


@pytest.mark.parametrize(
    ("dim", "heads", "scale"), [(64, 1, 0.2), (64, 4, 0.2), (64, 8, 0.05), (512, 1, 0.02), (512, 1, 0.2), (512, 8, 0.2)]
)
def test_fast_equals_reference(dim: int, heads: int, scale: float):
    """The folded scorer gives the reference-math scores (perturbed weights, realistic magnitudes)."""
    pool = _perturbed_pool(dim, heads, scale, seed=dim + heads)
    text, frames = _clip_like(23, 17, 12, dim, seed=heads)
    with torch.no_grad():
        ref = xpool_similarity_reference(pool, text, frames)
        fast = xpool_similarity_fast(pool, text, frames)
        fast64 = xpool_similarity_fast(pool, text, frames, acc_dtype=torch.float64)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast64, ref, atol=1e-5, rtol=0)


def test_fast_with_nearly_cancelling_frames():
    """Alternating opposite frames (pooled output near zero before LN2) stay within 1e-5 of float64 math."""
    pool = _perturbed_pool(128, 1, 0.2, seed=9)
    g = torch.Generator().manual_seed(9)
    base = torch.randn(6, 1, 128, generator=g)
    frames = base * torch.tensor([1.0, -1.0] * 6).view(1, 12, 1) + 0.01 * torch.randn(6, 12, 128, generator=g)
    text = torch.randn(8, 128, generator=g)
    with torch.no_grad():
        exact = xpool_similarity_reference(pool.double(), text.double(), frames.double()).float()
        pool.float()
        torch.testing.assert_close(xpool_similarity_fast(pool, text, frames), exact, atol=1e-5, rtol=0)


def test_fast_with_frame_mask_and_blocks():
    """Padded frames are ignored identically; any text/video block gives the same entries; chunking is exact."""
    pool = _perturbed_pool(64, 2, 0.2, seed=3)
    text, frames = _clip_like(19, 13, 12, 64, seed=4)
    mask = torch.ones(13, 12, dtype=torch.bool)
    mask[2, 7:] = False
    mask[5, 1:] = False
    frames = frames.masked_fill(~mask.unsqueeze(-1), 0.0)
    with torch.no_grad():
        ref = xpool_similarity_reference(pool, text, frames, mask)
        full = xpool_similarity_fast(pool, text, frames, mask)
        tiny = xpool_similarity_fast(pool, text, frames, mask, max_bytes=1)
        torch.testing.assert_close(full, ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(tiny, full, atol=1e-6, rtol=0)
        for ts, vs in [(slice(0, 5), slice(3, 11)), (slice(7, 19), slice(0, 1)), (slice(18, 19), slice(0, 13))]:
            block = xpool_similarity_fast(pool, text[ts], frames[vs], mask[vs])
            torch.testing.assert_close(block, full[ts, vs], atol=1e-6, rtol=0)
    # a masked frame's content does not matter
    noisy = frames + (~mask).unsqueeze(-1) * torch.randn_like(frames)
    with torch.no_grad():
        torch.testing.assert_close(xpool_similarity_fast(pool, text, noisy, mask), full, atol=1e-6, rtol=0)


def test_identity_init_and_key_mapping():
    """Projections start as identity with zero bias; reference names map one-to-one onto ours."""
    pool = TextConditionedPool(16, 2, 0.1)
    for name in ("q_proj", "k_proj", "v_proj", "out_proj", "linear_proj"):
        torch.testing.assert_close(getattr(pool, name).weight, torch.eye(16))
        assert not getattr(pool, name).bias.any()
    ours = set(pool.state_dict())
    ref_names = {
        f"{prefix}{leaf}"
        for prefix in ("cross_attn.q_proj.", "cross_attn.k_proj.", "cross_attn.v_proj.", "cross_attn.out_proj.",
                       "linear_proj.", "layer_norm1.", "layer_norm2.", "layer_norm3.")
        for leaf in ("weight", "bias")
    }  # fmt: skip
    assert set(map_reference_state_dict({k: torch.zeros(1) for k in ref_names})) == ours


def test_fast_refuses_dropout_in_training_mode():
    """The fast scorer is an eval-time identity; it refuses a module with active dropout."""
    pool = TextConditionedPool(16, 1, 0.3).train()
    with pytest.raises(RuntimeError, match="dropout"):
        xpool_similarity_fast(pool, torch.randn(2, 16), torch.randn(3, 4, 16))


@pytest.mark.parametrize(("kind", "k", "temperature"), [("mean", 3, 0.01), ("topk", 3, 0.01), ("topk", 1, 0.01),
                                                        ("attention", 3, 0.01), ("attention", 3, 1.0)])  # fmt: skip
def test_ablation_poolings(kind: str, k: int, temperature: float):
    """Mean / top-k / softmax-attention pooling: Gram-based cosine equals the materialised pooling."""
    text, frames = _clip_like(9, 7, 12, 32, seed=11)
    mask = torch.ones(7, 12, dtype=torch.bool)
    mask[1, 5:] = False
    pooled = baseline_pool_reference(kind, text, frames, mask, k, temperature)
    expected = cosine(text.unsqueeze(1), pooled)
    torch.testing.assert_close(baseline_similarity(kind, text, frames, mask, k, temperature), expected, atol=1e-5, rtol=0)
    if kind == "mean":  # text-independent
        torch.testing.assert_close(pooled[0], pooled[-1])


# ----------------------------------------------------------------------------- training
@pytest.fixture
def one_thread():
    """Tiny problems run faster on one thread (no OpenMP hand-offs on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_gradients_flow_and_loss_decreases(one_thread):
    """Every pooling parameter gets a gradient; a few Adam steps lower the InfoNCE loss on a tiny problem."""
    torch.manual_seed(0)
    pool = TextConditionedPool(32, 2, 0.0).train()
    text, frames = _clip_like(8, 8, 6, 32, seed=5)
    frames = frames + 0.5 * text.unsqueeze(1)  # text i describes video i
    logit_scale = torch.tensor(2.0)

    def loss_fn() -> torch.Tensor:
        return symmetric_infonce(cosine(text.unsqueeze(1), pool(text, frames)), logit_scale)

    loss = loss_fn()
    loss.backward()
    for name, p in pool.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sum(float(p.grad.abs().sum()) for p in pool.parameters()) > 0
    opt = torch.optim.Adam(pool.parameters(), lr=1e-2)
    first = float(loss.detach())
    for _ in range(25):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert float(loss_fn().detach()) < first - 0.1


# ----------------------------------------------------------------------------- LightningModule
def _tiny_batch(model, n_video: int = 3, n_frames: int = 4):
    size = model.backbone.image_size
    frames = torch.randn(n_video, n_frames, 3, size, size)
    mask = torch.ones(n_video, n_frames, dtype=torch.bool)
    mask[1, 2:] = False
    tok = model.backbone.tokenize(["a red circle", "a blue square spins", "green", "a dog"][:n_video], 16)
    return model.encode_text(**tok), model.encode_video(frames, mask)


@pytest.mark.parametrize("pooling", ["transformer", "topk"])
def test_module_blocks_training_mode_and_gradients(pooling: str):
    """XPool: eval scores are block-consistent and equal the reference math; the loss reaches head and backbone."""
    from tvr_bench.methods.xpool import XPool

    torch.manual_seed(0)
    model = XPool(backbone="tiny", pooling=pooling, heads=2 if pooling == "transformer" else 1)
    assert model.method_name == ("xpool" if pooling == "transformer" else f"xpool_{pooling}")
    text, video = _tiny_batch(model)
    model.eval()
    with torch.no_grad():
        full = model.similarity(text, video)
        block = model.similarity({k: v[1:] for k, v in text.items()}, {k: v[:2] for k, v in video.items()})
        torch.testing.assert_close(block, full[1:, :2], atol=1e-6, rtol=0)
        if model.pool is not None:
            ref = xpool_similarity_reference(model.pool, text["embeds"], video["frames"], video["frame_mask"])
            torch.testing.assert_close(full, ref, atol=1e-5, rtol=0)
    assert model.pair_cost_bytes(text, video) > 0
    model.train()
    loss, extra = model.training_loss(text, video)
    assert extra == {}
    loss.backward()
    assert model.backbone.logit_scale.grad is not None
    if model.pool is not None:
        assert model.pool.q_proj.weight.grad is not None
        names = {g["name"] for g in model.param_groups()}
        assert {"backbone", "head"} <= {n.split("_")[0] for n in names}


def test_fast_scorer_is_float32_under_cpu_autocast():
    """Under bf16 autocast (precision: bf16-mixed) the fast scorer still accumulates in float32: float32 scores,
    identical to the fp32 run for float32 features, and computed from float32 casts of bf16 features."""
    g = torch.Generator().manual_seed(0)
    pool = TextConditionedPool(64, 1, 0.3).eval()
    with torch.no_grad():
        for p in pool.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    text, frames = torch.randn(9, 64, generator=g), torch.randn(7, 5, 64, generator=g)
    with torch.no_grad():
        fp32 = xpool_similarity_fast(pool, text, frames)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = xpool_similarity_fast(pool, text, frames)
            from_bf16 = xpool_similarity_fast(pool, text.bfloat16(), frames.bfloat16())
        oracle = xpool_similarity_reference(pool, text.bfloat16().float(), frames.bfloat16().float())
    assert mixed.dtype == torch.float32 and from_bf16.dtype == torch.float32
    torch.testing.assert_close(mixed, fp32, atol=1e-6, rtol=0)
    torch.testing.assert_close(from_bf16, oracle, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_bf16, fp32, atol=5e-2, rtol=0)  # only the bf16 rounding of the inputs
