"""What search's two stages lose against exhaustive scoring, measured on a test set (the result JSON's `search`).

A text-conditioned method (``SEARCH_SCORING = "rerank"``) is searched in two stages: an exact vector search over
the first-stage vectors (`RetrievalModule.search_vectors`: mean-pooled frames, the text embedding) keeps the K best
videos of each query, and the method's own score orders those K. The query's ranking is then the K candidates by
method score, followed by every other video; a correct video outside the K counts as a miss. Since the method's
score of a candidate is its exhaustive score (contract 2: any block is the block of the full matrix), the
two-stage ranks follow from the exhaustive score matrix and the first-stage matrix alone.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from tvr_bench.metrics import rank_metrics, t2v_ranks

#: Candidates K of the second stage reported in the result JSON (the issue's K = 50, 200, 1000).
REPORT_KS: tuple[int, ...] = (50, 200, 1000)
RECALLS = ("R@1", "R@5", "R@10")


def two_stage_scores(sim: Tensor, first_stage: Tensor, k: int) -> Tensor:
    """`sim` where a video is among the `k` best of its row by `first_stage`, -inf elsewhere ([T, V])."""
    if sim.shape != first_stage.shape:
        raise ValueError(f"sim {tuple(sim.shape)} and first_stage {tuple(first_stage.shape)} differ")
    k = min(int(k), sim.shape[1])
    keep = torch.topk(first_stage.float().nan_to_num(nan=float("-inf")), k, dim=1).indices
    out = torch.full_like(sim, float("-inf"), dtype=torch.float32)
    return out.scatter_(1, keep, sim.float().gather(1, keep))


def two_stage_loss(sim: Tensor, first_stage: Tensor, text_to_video: Tensor,
                   ks: tuple[int, ...] = REPORT_KS) -> dict[str, Any]:
    """For each K: t2v R@1/5/10 of the two stages, their difference to exhaustive scoring (points; negative = lost)
    and the share of queries whose correct video the first stage kept (`first_stage_recall`, %)."""
    exhaustive = rank_metrics(t2v_ranks(sim.float(), text_to_video))
    n_video = sim.shape[1]
    out: dict[str, Any] = {"exhaustive": {m: exhaustive[m] for m in RECALLS}, "by_k": {}}
    first_ranks = t2v_ranks(first_stage.float(), text_to_video)
    for k in ks:
        ranks = t2v_ranks(two_stage_scores(sim, first_stage, k), text_to_video)
        two = rank_metrics(ranks)
        out["by_k"][str(k)] = {
            "k": int(k),
            "covers_gallery": k >= n_video,
            **{m: two[m] for m in RECALLS},
            **{f"diff/{m}": two[m] - exhaustive[m] for m in RECALLS},
            "first_stage_recall": 100.0 * float((first_ranks <= k).float().mean()),
        }
    first = rank_metrics(first_ranks)
    out["first_stage_alone"] = {m: first[m] for m in RECALLS}
    return out


@torch.no_grad()
def search_report(model: Any, text: dict[str, Tensor], video: dict[str, Tensor], sim: Tensor,
                  text_to_video: Tensor, ks: tuple[int, ...] = REPORT_KS) -> dict[str, Any] | None:
    """The result JSON's `search` block of a test run: the method's search scoring and, for ``rerank`` methods, the
    two-stage loss of :func:`two_stage_loss` on this test set (None for a model that is no RetrievalModule)."""
    scoring = getattr(model, "SEARCH_SCORING", None)
    if scoring is None or not hasattr(model, "search_vectors"):
        return None
    refusal = model.search_refusal()
    block: dict[str, Any] = {"scoring": scoring, "videos": int(sim.shape[1]), "texts": int(sim.shape[0])}
    if refusal:
        return {**block, "refused": refusal}
    if scoring != "rerank":
        block["note"] = "one vector per video, searched exactly: search ranks equal the exhaustive ranks"
        return block
    try:
        q = model.search_vectors({k: v.cpu() for k, v in text.items()}, "text").float()
        g = model.search_vectors({k: v.cpu() for k, v in video.items()}, "video").float()
    except (KeyError, ValueError, RuntimeError) as exn:  # a method without first-stage vectors: the test result stays
        warnings.warn(f"no two-stage search report: {type(exn).__name__}: {exn}", stacklevel=2)
        return {**block, "error": f"{type(exn).__name__}: {exn}"}
    block["two_stage"] = two_stage_loss(sim, q @ g.T, text_to_video, ks)
    block["note"] = ("first stage: exact inner product of the unit text embedding and the mean of the unit frame "
                     "embeddings (search_vectors), top K kept; second stage: the method's score; a correct video "
                     "outside the K is a miss. diff = two-stage minus exhaustive, in points")
    return block
