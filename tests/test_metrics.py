"""Tests for tvr_bench.metrics: parity with the reference repos' metric code, torchmetrics, edge cases."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch
from torch import Tensor

from tests.conftest import load_parity
from tvr_bench.metrics import (
    dual_softmax,
    median_rank,
    rank_metrics,
    retrieval_metrics,
    t2v_ranks,
    text_to_video_from_keys,
    v2t_ranks,
    video_to_text_sim,
)

ATOL = 1e-5  # parity/README.md: floats at atol 1e-5 (float32 R@k in the reference), ranks exact
KEYS = [f"{d}/{m}" for d in ("t2v", "v2t") for m in ("R@1", "R@5", "R@10", "MdR", "MnR")]


# ------------------------------------------------------------------------------------------------
# helpers


def flat_from_padded(sim3d: Tensor) -> tuple[Tensor, Tensor]:
    """[groups, max_caps, videos] padded layout (CLIP4Clip -inf / X-Pool NaN) -> flat sim, text_to_video.

    Group g's ground-truth video is column g. A (g, m) row is a real caption iff its positive
    sim3d[g, m, g] is finite (the reference metrics' own query mask); padding rows must be entirely
    non-finite.
    """
    n_groups, _, n_video = sim3d.shape
    assert n_groups == n_video, "padded layout needs one caption group per video"
    idx = torch.arange(n_groups)
    positive = sim3d[idx, :, idx]  # [groups, max_caps]
    valid = torch.isfinite(positive)
    assert not torch.isfinite(sim3d[~valid]).any(), "a padding row holds finite scores"
    text_to_video = idx[:, None].expand_as(valid)[valid]
    return sim3d[valid], text_to_video


def check_against_reference(ref: dict, ranks: Tensor, *, lower_median: bool = False) -> int:
    """Compare every key of a reference metrics dict with values derived from our 1-based `ranks`.

    Returns the number of keys compared. `lower_median` marks dicts from CLIP4Clip's
    tensor_text_to_video_metrics, whose MedianR/MR is torch.median (lower median).
    """
    r = ranks.double().numpy()
    compared = 0
    for key, value in ref.items():
        if isinstance(value, Tensor):
            value = value.numpy()
        if m := re.fullmatch(r"R(\d+)", key):
            ours = 100.0 * float((ranks <= int(m.group(1))).double().mean())
            assert ours == pytest.approx(float(value), abs=ATOL), key
        elif key in ("MR", "MedianR", "MedR"):
            expected = float(torch.median(ranks)) if lower_median else float(np.median(r))
            assert float(value) == expected, key
        elif key == "MeanR":
            assert float(value) == pytest.approx(float(np.mean(r)), abs=ATOL), key
        elif key == "Std_Rank":
            assert float(value) == pytest.approx(float(np.std(r)), abs=ATOL), key
        elif key == "cols":  # 0-based rank of the ground truth per query
            assert np.array_equal(np.asarray(value), r - 1), key
        else:
            raise AssertionError(f"unknown reference key {key!r}: extend check_against_reference")
        compared += 1
    return compared


def check_metrics_dict(
    ref: dict, ours: dict[str, float], direction: str, *, lower_median: bool = False
) -> None:
    """Compare one direction of our retrieval_metrics output with the reference's R1/R5/R10/MeanR/median."""
    names = {"R1": "R@1", "R5": "R@5", "R10": "R@10", "MeanR": "MnR"}
    for key, name in names.items():
        if key in ref:
            assert ours[f"{direction}/{name}"] == pytest.approx(float(ref[key]), abs=ATOL), key
    for key in ("MedR", "MedianR", "MR"):
        if key in ref and not lower_median:
            assert ours[f"{direction}/MdR"] == float(ref[key]), key


def brute_force_pessimistic_rank(row: list[float], target: int) -> int:
    """Rank by hand: sort the row descending and take the last position holding the target's value."""
    s = row[target]
    if s != s or s == float("-inf"):
        return len(row)
    ordered = sorted((v for v in row if v == v), reverse=True)
    return max(i for i, v in enumerate(ordered) if v == s) + 1


def random_multi(n_video: int, caps: int, seed: int) -> tuple[Tensor, Tensor]:
    """A shuffled multi-caption problem with strictly positive, tie-free scores and a mild GT boost."""
    g = torch.Generator().manual_seed(seed)
    text_to_video = torch.arange(n_video).repeat_interleave(caps)
    text_to_video = text_to_video[torch.randperm(text_to_video.numel(), generator=g)]
    sim = torch.rand(text_to_video.numel(), n_video, generator=g, dtype=torch.float64) + 0.01
    sim[torch.arange(sim.shape[0]), text_to_video] += 0.3
    assert all(row.unique().numel() == n_video for row in sim)
    return sim, text_to_video


# ------------------------------------------------------------------------------------------------
# parity: CLIP4Clip metrics.py


def test_clip4clip_single_caption_parity():
    """Square matrix, GT on the diagonal: equals compute_metrics(sim) and compute_metrics(sim.T)."""
    p = load_parity("clip4clip_metrics.pt")
    sim = p["sim_single"]
    target = torch.arange(sim.shape[0])
    ours = retrieval_metrics(sim, target)
    assert list(ours) == KEYS
    for direction, ranks in (("t2v", t2v_ranks(sim, target)), ("v2t", v2t_ranks(sim, target))):
        ref = p[f"{direction}_single"]
        assert check_against_reference(ref, ranks) == len(ref)
        check_metrics_dict(ref, ours, direction)


def test_clip4clip_multi_caption_parity():
    """MSVD-style consecutive captions: t2v = tensor_text_to_video_metrics, v2t = max over captions."""
    p = load_parity("clip4clip_metrics.pt")
    sim, caps = p["multi_sim_flat"], p["multi_caps_per_video"]
    n_video = caps.numel()
    assert sim.shape == (int(caps.sum()), n_video)
    target = torch.arange(n_video).repeat_interleave(caps)

    # The file's padded tensor is exactly our flat input in the reference layout.
    flat, flat_target = flat_from_padded(p["multi_sim_3d"])
    assert torch.equal(flat_target, target)
    assert torch.equal(flat, sim.to(flat.dtype))

    ours = retrieval_metrics(sim, target)
    t2v = t2v_ranks(sim, target)
    assert check_against_reference(p["t2v_multi"], t2v, lower_median=True) == len(p["t2v_multi"])
    check_metrics_dict(p["t2v_multi"], ours, "t2v", lower_median=True)
    assert ours["t2v/MdR"] == float(np.median(t2v.numpy()))

    v2t_sim = video_to_text_sim(sim, target)
    ref_v2t_sim = p["v2t_multi_sim"]
    assert v2t_sim.shape == ref_v2t_sim.shape
    torch.testing.assert_close(v2t_sim.to(ref_v2t_sim.dtype), ref_v2t_sim, rtol=0, atol=0)
    v2t = v2t_ranks(sim, target)
    assert check_against_reference(p["v2t_multi"], v2t) == len(p["v2t_multi"])
    check_metrics_dict(p["v2t_multi"], ours, "v2t")


def test_clip4clip_lower_median_differs_deliberately():
    """multi_hard: the reference's torch.median is the lower median; ours is np.median (documented)."""
    p = load_parity("clip4clip_metrics.pt")
    ref = p["t2v_multi_hard"]
    sim, target = flat_from_padded(p["multi_hard_sim_3d"])
    ranks = t2v_ranks(sim, target)
    # Everything except the median agrees with the reference ...
    check_against_reference(ref, ranks, lower_median=True)
    ours = retrieval_metrics(sim, target)
    check_metrics_dict(ref, ours, "t2v", lower_median=True)
    # ... the reference's value is the lower median of the very same ranks (for the record) ...
    lower = float(ranks.sort().values[(ranks.numel() - 1) // 2])
    assert ref["MedianR"] == float(torch.median(ranks)) == lower
    # ... while ours is np.median, which here lies strictly above it (the point of this case).
    assert ours["t2v/MdR"] == float(np.median(ranks.numpy()))
    assert ours["t2v/MdR"] > ref["MedianR"]


def test_clip4clip_ties_case_uses_pessimistic_policy():
    """sim_ties: the reference counts a tied query once per tied position; we count it once, worst rank."""
    p = load_parity("clip4clip_metrics.pt")
    sim, ref = p["sim_ties"], p["t2v_ties"]
    n = sim.shape[0]
    target = torch.arange(n)

    # Reproduce the reference's duplicated entries: every sorted position tied with the diagonal.
    tied_positions = []
    for i, row in enumerate(sim.tolist()):
        ordered = sorted(row, reverse=True)
        tied_positions.append([j for j, v in enumerate(ordered) if v == row[i]])
    assert [c for cs in tied_positions for c in cs] == ref["cols"].tolist()
    assert len(ref["cols"]) > n  # the reference averages over more "queries" than there are texts

    # Ours: one rank per text, the worst tied position, computed by hand from the matrix.
    by_hand = [brute_force_pessimistic_rank(row, i) for i, row in enumerate(sim.tolist())]
    assert by_hand == [max(cs) + 1 for cs in tied_positions]
    ranks = t2v_ranks(sim, target)
    assert ranks.tolist() == by_hand
    ours = retrieval_metrics(sim, target)
    expected = rank_metrics(torch.tensor(by_hand))
    for key, value in expected.items():
        assert ours[f"t2v/{key}"] == pytest.approx(value, abs=1e-12)
    # v2t by hand too (transpose: one caption per video).
    by_hand_v2t = [brute_force_pessimistic_rank(row, i) for i, row in enumerate(sim.t().tolist())]
    assert v2t_ranks(sim, target).tolist() == by_hand_v2t
    # Our numbers differ from the reference's (its averages run over the duplicated entries) ...
    assert (ours["t2v/R@1"], ours["t2v/MnR"]) != pytest.approx((ref["R1"], ref["MeanR"]), abs=ATOL)
    # ... and are never better than an optimistic one-rank-per-query policy (best tied position).
    optimistic = rank_metrics(torch.tensor([min(cs) + 1 for cs in tied_positions]))
    for k in (1, 5, 10):
        assert ours[f"t2v/R@{k}"] <= optimistic[f"R@{k}"]
    assert ours["t2v/MnR"] >= optimistic["MnR"] and ours["t2v/MdR"] >= optimistic["MdR"]
    assert ours["t2v/R@1"] < optimistic["R@1"]  # the case does contain a tie at the top


# ------------------------------------------------------------------------------------------------
# parity: X-Pool modules/metrics.py (T-MASS has identical t2v/v2t metrics)


def test_xpool_single_caption_parity():
    """X-Pool's [videos, 1, videos] layout: t2v_metrics / v2t_metrics, including R50/R100 from our ranks."""
    p = load_parity("xpool_metrics.pt")
    sim, target = flat_from_padded(p["sims_single_3d"])
    assert torch.equal(target, torch.arange(sim.shape[1]))
    ours = retrieval_metrics(sim, target)
    for direction, ranks in (("t2v", t2v_ranks(sim, target)), ("v2t", v2t_ranks(sim, target))):
        ref = p[f"{direction}_single"]
        assert check_against_reference(ref, ranks) == len(ref)
        check_metrics_dict(ref, ours, direction)


def test_xpool_multi_caption_interleaved_parity():
    """Interleaved captions (multi_pair_vid_index) with NaN padding in the reference's 3-d sims."""
    p = load_parity("xpool_metrics.pt")
    sims3d, pair_vid = p["multi_sims_avg"], p["multi_pair_vid_index"]
    ids = p["multi_all_vid_ids"]
    n_text = pair_vid.numel()

    # Groups (and video columns) are in first-appearance order of the video ids.
    video_keys = list(dict.fromkeys(ids))
    target = text_to_video_from_keys(ids, video_keys)
    assert torch.equal(target, pair_vid)
    assert sims3d.shape[0] == sims3d.shape[2] == len(video_keys)

    # Our flat matrix in the original (interleaved) text order: text i is slot m of its group.
    slot = torch.tensor([ids[:i].count(ids[i]) for i in range(n_text)])
    sim = sims3d[target, slot]
    assert torch.isfinite(sim).all()
    # It is the plain cosine of the saved embeddings ('avg' pooling), i.e. the same matrix.
    t = torch.nn.functional.normalize(p["multi_text_embeds"], dim=-1)
    v = torch.nn.functional.normalize(p["multi_vid_embeds_pooled_avg"], dim=-1)
    torch.testing.assert_close(sim, t @ v.t(), rtol=0, atol=ATOL)

    ours = retrieval_metrics(sim, target)
    for direction, ranks in (("t2v", t2v_ranks(sim, target)), ("v2t", v2t_ranks(sim, target))):
        ref = p[f"{direction}_multi_avg"]
        assert check_against_reference(ref, ranks) == len(ref)
        check_metrics_dict(ref, ours, direction)

    # Text order does not matter: the grouped (padded-layout) order gives the same numbers.
    grouped, grouped_target = flat_from_padded(sims3d)
    assert retrieval_metrics(grouped, grouped_target) == pytest.approx(ours, abs=1e-12)


# ------------------------------------------------------------------------------------------------
# DSL (T-MASS --DSL)


def test_dual_softmax_matches_tmass_reference():
    """sims_DSL = sims * softmax(100 sims, axis=0) over queries, per caption slot of X-Pool's layout.

    Slots where every group has a caption are complete [n_query, n_video] matrices: our flat DSL
    must reproduce them. In the reference, a NaN anywhere in a slot's column (groups with fewer
    captions, or T-MASS's own-caption pooling quirk) poisons the whole slot via np.max; we instead
    skip NaN entries (tested below), so those slots are not comparable.
    """
    p = load_parity("tmass_eval_loop.pt")
    sims, ref = p["sims"], p["sims_DSL"]
    compared = 0
    for m in range(sims.shape[1]):
        slot, ref_slot = sims[:, m, :], ref[:, m, :]
        if torch.isfinite(slot).all():
            torch.testing.assert_close(dual_softmax(slot, 100.0), ref_slot, rtol=0, atol=ATOL)
            compared += 1
        else:  # reference quirk, recorded: NaN in the input slot -> NaN everywhere in that column
            assert torch.isnan(ref_slot[:, torch.isnan(slot).any(dim=0)]).all()
    assert compared >= 1


def test_dual_softmax_skips_missing_entries():
    """NaN/-inf entries are left as they are and do not take part in their column's softmax."""
    g = torch.Generator().manual_seed(3)
    sim = torch.rand(7, 5, generator=g, dtype=torch.float64) * 2 - 1
    sim[2, 1] = float("nan")
    sim[4, 3] = float("-inf")
    sim[:, 4] = float("nan")  # an all-missing column
    out = dual_softmax(sim, temperature=30.0, chunk_bytes=1)  # one column per block
    assert torch.isnan(out[2, 1]) and out[4, 3] == float("-inf") and torch.isnan(out[:, 4]).all()
    for col in range(4):
        valid = torch.isfinite(sim[:, col])
        s = sim[valid, col]
        torch.testing.assert_close(out[valid, col], s * torch.softmax(30.0 * s, dim=0))
    full = torch.rand(6, 4, generator=g)
    torch.testing.assert_close(dual_softmax(full), full * torch.softmax(100.0 * full, dim=0))


# ------------------------------------------------------------------------------------------------
# torchmetrics as an independent oracle (random, tie-free, positive scores)


@pytest.mark.parametrize("caps", [1, 3])
def test_torchmetrics_hit_rate_and_mrr(caps: int):
    """t2v R@k = 100 * RetrievalHitRate(top_k=k); mean 1/rank = RetrievalMRR; v2t too when caps == 1."""
    from torchmetrics.retrieval import RetrievalHitRate, RetrievalMRR

    sim, target = random_multi(n_video=20, caps=caps, seed=11 + caps)
    cases = [("t2v", sim, target, t2v_ranks(sim, target))]
    if caps == 1:  # caption-level v2t equals the group protocol only with one caption per video
        order = torch.argsort(target)
        video_major = sim[order].t().contiguous()  # [video query, caption ordered by its video]
        cases.append(("v2t", video_major, torch.arange(video_major.shape[0]), v2t_ranks(sim, target)))
    ours = retrieval_metrics(sim, target)
    for direction, scores, gt, ranks in cases:
        n_q, n_c = scores.shape
        preds = scores.flatten().float()
        relevant = torch.zeros(n_q, n_c, dtype=torch.bool)
        relevant[torch.arange(n_q), gt] = True
        indexes = torch.arange(n_q).repeat_interleave(n_c)
        for k in (1, 5, 10):
            hit = RetrievalHitRate(top_k=k)(preds, relevant.flatten(), indexes=indexes)
            assert ours[f"{direction}/R@{k}"] == pytest.approx(100.0 * float(hit), abs=ATOL)
        mrr = RetrievalMRR()(preds, relevant.flatten(), indexes=indexes)
        assert float((1.0 / ranks.double()).mean()) == pytest.approx(float(mrr), abs=ATOL)


# ------------------------------------------------------------------------------------------------
# known matrices, tie/NaN policy


@pytest.mark.parametrize("caps", [1, 4])
def test_identity_like_is_perfect(caps: int):
    """A clear diagonal gives R@1 = 100 and MdR = MnR = 1 in both directions."""
    n_video = 25
    target = torch.arange(n_video).repeat_interleave(caps)
    sim = 0.1 * torch.rand(target.numel(), n_video, generator=torch.Generator().manual_seed(0))
    sim[torch.arange(target.numel()), target] += 1.0
    out = retrieval_metrics(sim, target)
    for d in ("t2v", "v2t"):
        assert out[f"{d}/R@1"] == out[f"{d}/R@5"] == out[f"{d}/R@10"] == 100.0
        assert out[f"{d}/MdR"] == out[f"{d}/MnR"] == 1.0


@pytest.mark.parametrize(("n_video", "caps"), [(30, 1), (30, 3), (5, 2), (1, 2)])
def test_collapsed_model_gets_no_credit(n_video: int, caps: int):
    """All scores equal: every target takes the worst tied rank, so recall is never above chance."""
    target = torch.arange(n_video).repeat_interleave(caps)
    sim = torch.full((target.numel(), n_video), 0.37)
    out = retrieval_metrics(sim, target)
    for d in ("t2v", "v2t"):
        for k in (1, 5, 10):
            assert out[f"{d}/R@{k}"] == (100.0 if n_video <= k else 0.0)
            assert out[f"{d}/R@{k}"] <= 100.0 * k / n_video  # at most chance level
        assert out[f"{d}/MdR"] == out[f"{d}/MnR"] == float(n_video)
    if n_video > 1:
        assert out["t2v/R@1"] == 0.0 != 100.0


def test_random_is_monotone_and_bounded():
    """Random scores: R@1 <= R@5 <= R@10 and 1 <= MdR, MnR <= n_video."""
    sim, target = random_multi(n_video=40, caps=2, seed=5)
    out = retrieval_metrics(sim, target)
    for d in ("t2v", "v2t"):
        assert 0.0 <= out[f"{d}/R@1"] <= out[f"{d}/R@5"] <= out[f"{d}/R@10"] <= 100.0
        assert 1.0 <= out[f"{d}/MdR"] <= 40.0 and 1.0 <= out[f"{d}/MnR"] <= 40.0


def test_pessimistic_ties_by_hand():
    """rank = 1 + #(greater) + #(other equal), checked on small rows and against a brute-force sort."""
    sim = torch.tensor([[0.5, 0.5, 0.9, 0.1], [0.2, 0.7, 0.7, 0.7], [0.3, 0.3, 0.3, 0.3]])
    target = torch.tensor([0, 1, 3])
    assert t2v_ranks(sim, target).tolist() == [3, 3, 4]
    g = torch.Generator().manual_seed(9)
    quant = torch.randint(0, 4, (50, 12), generator=g).float()  # many ties
    tgt = torch.randint(0, 12, (50,), generator=g)
    by_hand = [brute_force_pessimistic_rank(row, int(t)) for row, t in zip(quant.tolist(), tgt)]
    assert t2v_ranks(quant, tgt).tolist() == by_hand


def test_nan_and_neg_inf_rank_last():
    """NaN / -inf negatives never beat the positive; a NaN / -inf positive takes the last rank."""
    nan, ninf = float("nan"), float("-inf")
    sim = torch.tensor(
        [
            [0.1, nan, nan, 0.0],  # NaN negatives ignored -> rank 1
            [nan, 0.9, 0.8, 0.7],  # NaN positive -> last (4)
            [0.2, ninf, ninf, ninf],  # -inf negatives (padding) ignored -> rank 1
            [0.5, 0.4, 0.3, ninf],  # -inf positive -> last (4)
            [ninf, ninf, ninf, ninf],  # all padding -> last
            [nan, nan, nan, nan],  # all NaN -> last
            [nan, 0.3, nan, ninf],  # -inf positive among NaNs -> still last, like NaN
        ]
    )
    target = torch.tensor([0, 0, 0, 3, 2, 1, 3])
    assert t2v_ranks(sim, target).tolist() == [1, 4, 1, 4, 4, 4, 4]
    # v2t: the group max ignores NaN captions; a video whose captions are all missing ranks last.
    v2t = video_to_text_sim(sim, target)
    assert v2t[0, 0] == 0.2 and v2t[3, 3] == ninf
    assert torch.isfinite(v2t).sum() > 0 and not torch.isnan(v2t).any()
    ranks = v2t_ranks(sim, target)
    assert ranks.numel() == 4  # every video has a caption here
    assert ranks[1].item() == 4 and ranks[2].item() == 4  # NaN-only / -inf-only caption groups
    everything_nan = torch.full((6, 3), nan)
    out = retrieval_metrics(everything_nan, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert out["t2v/R@1"] == out["v2t/R@1"] == 0.0 and out["t2v/MdR"] == out["v2t/MdR"] == 3.0


def test_videos_without_captions_are_distractors_only():
    """A caption-less video is a t2v candidate but neither a v2t query nor a v2t candidate."""
    sim = torch.tensor([[0.9, 0.95, 0.1], [0.1, 0.2, 0.8]])
    target = torch.tensor([0, 2])  # video 1 has no caption
    assert t2v_ranks(sim, target).tolist() == [2, 1]
    # v2t: query videos 0 and 2, candidate groups {0, 2}
    assert v2t_ranks(sim, target).tolist() == [1, 1]
    out = retrieval_metrics(sim, target)
    assert out["v2t/R@1"] == 100.0 and out["t2v/R@1"] == 50.0


def test_chunking_and_dtype_do_not_change_results():
    """Tiny chunks (one row at a time) and float64/float16 inputs give the same metrics."""
    sim, target = random_multi(n_video=30, caps=3, seed=21)
    sim[::7, ::5] = float("nan")
    base = retrieval_metrics(sim, target)
    assert retrieval_metrics(sim, target, chunk_bytes=1) == base
    assert retrieval_metrics(sim, target, chunk_bytes=700) == base
    assert retrieval_metrics(sim.float(), target, chunk_bytes=1) == retrieval_metrics(sim.float(), target)
    half = sim.half()
    assert retrieval_metrics(half, target) == retrieval_metrics(half.double(), target)
    torch.testing.assert_close(
        video_to_text_sim(sim, target, chunk_bytes=1), video_to_text_sim(sim, target), rtol=0, atol=0
    )


def test_median_uses_numpy_semantics():
    """Even counts average the two middle ranks."""
    assert median_rank(torch.tensor([1, 2])) == 1.5
    assert median_rank(torch.tensor([4, 1, 3])) == 3.0
    x = torch.randint(1, 100, (101,), generator=torch.Generator().manual_seed(1))
    assert median_rank(x) == float(np.median(x.numpy()))
    assert median_rank(x[:100]) == float(np.median(x[:100].numpy()))


def test_msvd_scale_is_fast():
    """27,763 captions x 670 videos (MSVD test) in well under a few seconds, chunked."""
    g = torch.Generator().manual_seed(0)
    n_video, n_text = 670, 27_763
    target = torch.randint(0, n_video, (n_text,), generator=g).sort().values
    sim = torch.randn(n_text, n_video, generator=g)
    sim[torch.arange(n_text), target] += 2.0
    start = time.perf_counter()
    out = retrieval_metrics(sim, target)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"{elapsed:.2f}s"
    assert 0 < out["t2v/R@1"] < 100 and 0 < out["v2t/R@1"] <= 100


# ------------------------------------------------------------------------------------------------
# keys helper and input validation


def test_text_to_video_from_keys():
    """Maps caption video keys to column indices; unknown or duplicate keys raise."""
    out = text_to_video_from_keys(["b", "a", "b", "c"], ["a", "b", "c"])
    assert out.dtype == torch.long and out.tolist() == [1, 0, 1, 2]
    with pytest.raises(KeyError, match="'z'"):
        text_to_video_from_keys(["a", "z"], ["a", "b"])
    with pytest.raises(ValueError, match="duplicate"):
        text_to_video_from_keys(["a"], ["a", "a"])


def test_input_validation():
    """Bad shapes, dtypes and out-of-range targets fail loudly."""
    sim = torch.rand(3, 2)
    with pytest.raises(ValueError):
        retrieval_metrics(sim, torch.tensor([0, 1]))  # wrong length
    with pytest.raises(ValueError):
        retrieval_metrics(sim, torch.tensor([0, 1, 2]))  # column 2 does not exist
    with pytest.raises(TypeError):
        retrieval_metrics(sim, torch.tensor([0.0, 1.0, 1.0]))
    with pytest.raises(TypeError):
        retrieval_metrics(torch.ones(3, 2, dtype=torch.long), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError):
        retrieval_metrics(torch.rand(3), torch.tensor([0, 1, 1]))
