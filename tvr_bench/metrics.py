"""Retrieval metrics over a text x video score matrix (DESIGN.md contract 1).

Pure torch: no Lightning, no numpy, no I/O. Every function works on CPU or GPU tensors and is
vectorised; text rows are processed in chunks so that the temporary matrices stay below
``chunk_bytes`` (64 MiB by default) whatever the size of the evaluation set.

Layout
    ``sim`` is ``[n_text, n_video]`` (higher = more similar), ``text_to_video`` is a long tensor
    ``[n_text]`` giving the column of each text's ground-truth video. Several texts may point to the
    same video (multi-caption benchmarks such as MSVD); they need not be consecutive.

Protocol
    * text -> video: every caption is a query, ranked among all ``n_video`` columns.
    * video -> text: CLIP4Clip's multi-sentence protocol. A video's caption group scores
      ``max`` over the group's captions, which gives a ``V x V`` matrix
      (:func:`video_to_text_sim`); each video with at least one caption is a query and its own
      group is the target. With one caption per video this is exactly ``sim.T``. Videos without
      any caption are neither queries nor candidates in this direction (they stay distractors
      for text -> video).
    * R@k is the percentage (0-100) of queries whose target has rank <= k (hit rate at k; the
      field's "recall"). Ranks are 1-based. MnR is the mean rank.

Median (MdR)
    MdR follows ``np.median`` everywhere: for an even number of queries it is the mean of the two
    middle ranks (so it can be x.5). This is what CLIP4Clip's ``compute_metrics`` and X-Pool /
    T-MASS use. CLIP4Clip's multi-caption text -> video function (``tensor_text_to_video_metrics``)
    uses ``torch.median``, the *lower* median, instead; we deliberately do not copy that, so on
    MSVD-style inputs our MdR can be half a rank above that code's value.

Tie policy (pessimistic)
    A target tied with other candidates takes the worst of the tied ranks:
    ``rank = 1 + #(scores > s_pos) + #(other scores == s_pos)``. A constant ("collapsed") score
    matrix therefore gets rank ``n_candidates`` for every query: R@k = 0 unless
    ``n_candidates <= k`` (never better than chance), MdR = MnR = ``n_candidates``. The
    reference code differs: CLIP4Clip's ``compute_metrics`` emits one entry per tied position
    (a tied query is counted several times), and argsort-based code (X-Pool, CLIP4Clip's
    multi-caption path) breaks ties by sort order. Without ties all of them agree with us.

Missing scores
    NaN and -inf are "missing": such a negative never beats or ties a finite target, and a target
    whose own score is NaN or -inf gets the last rank (``n_candidates``). In the video -> text
    direction NaN captions are ignored by the group max. (X-Pool / CLIP4Clip instead drop queries
    whose target is non-finite, which only matters for their padding layout, not for ours; and
    their ``torch.argsort(descending=True)`` puts NaN *negatives* first, which T-MASS's
    multi-caption sims trigger. Here a NaN never helps or hurts a finite target.)

Dual softmax (DSL)
    :func:`dual_softmax` is T-MASS's ``--DSL`` post-processing. It reweights each score by a
    softmax over all *queries* (texts) of the same video column, so it uses the whole test set
    (transductive): report it separately from the plain metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

DEFAULT_CHUNK_BYTES = 64 * 2**20
DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
# Temporary bytes per compared element: the boolean mask plus the int32 copy a CPU reduction makes.
_COUNT_BYTES = 5


def _check_inputs(sim: Tensor, text_to_video: Tensor) -> Tensor:
    """Validate shapes/dtypes and return `text_to_video` as a long tensor on `sim`'s device."""
    if not isinstance(sim, Tensor) or sim.dim() != 2:
        got = getattr(sim, "shape", type(sim))
        raise ValueError(f"sim must be a 2-D tensor [n_text, n_video], got {got}")
    if not sim.is_floating_point():
        raise TypeError(f"sim must be a floating-point tensor, got {sim.dtype}")
    n_text, n_video = sim.shape
    if n_text == 0 or n_video == 0:
        raise ValueError(f"sim needs at least one text and one video, got shape {tuple(sim.shape)}")
    text_to_video = torch.as_tensor(text_to_video)
    if text_to_video.dim() != 1 or text_to_video.shape[0] != n_text:
        raise ValueError(
            f"text_to_video must be 1-D with n_text={n_text} entries, got shape {tuple(text_to_video.shape)}"
        )
    if text_to_video.dtype == torch.bool or text_to_video.is_floating_point() or text_to_video.is_complex():
        raise TypeError(f"text_to_video must be an integer tensor, got {text_to_video.dtype}")
    text_to_video = text_to_video.to(device=sim.device, dtype=torch.long)
    lo, hi = int(text_to_video.min()), int(text_to_video.max())
    if lo < 0 or hi >= n_video:
        raise ValueError(f"text_to_video values must lie in [0, {n_video - 1}], got range [{lo}, {hi}]")
    return text_to_video


def _rows_per_chunk(n_cols: int, bytes_per_element: int, chunk_bytes: int) -> int:
    """Number of rows of width `n_cols` whose temporaries fit in `chunk_bytes`."""
    return max(1, int(chunk_bytes) // max(1, n_cols * bytes_per_element))


def t2v_ranks(sim: Tensor, text_to_video: Tensor, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
    """1-based pessimistic rank of each text's video among all videos (long `[n_text]`)."""
    target = _check_inputs(sim, text_to_video)
    n_text, n_video = sim.shape
    ranks = torch.empty(n_text, dtype=torch.long, device=sim.device)
    step = _rows_per_chunk(n_video, _COUNT_BYTES, chunk_bytes)
    for start in range(0, n_text, step):
        block = sim[start : start + step]
        pos = block.gather(1, target[start : start + step, None])
        # Counts the target itself when its score is a number, so this is 1 + #(others >= pos).
        count = (block >= pos).sum(dim=1, dtype=torch.int32).long()
        missing = ~(pos.squeeze(1) > float("-inf"))  # NaN or -inf target
        ranks[start : start + step] = torch.where(missing, torch.full_like(count, n_video), count)
    return ranks


def video_to_text_sim(
    sim: Tensor, text_to_video: Tensor, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Tensor:
    """`[n_video (query), n_video (caption group)]` scores: max over each group's captions, NaN ignored."""
    target = _check_inputs(sim, text_to_video)
    n_text, n_video = sim.shape
    dtype = sim.dtype if sim.dtype in (torch.float32, torch.float64) else torch.float32
    neg_inf = float("-inf")
    # group_max[g, v] = max over captions c of video g of sim[c, v]; empty groups stay -inf.
    group_max = torch.full((n_video, n_video), neg_inf, dtype=dtype, device=sim.device)
    # Per element: the NaN-free copy plus the int64 index that scatter_reduce_ materialises.
    step = _rows_per_chunk(n_video, torch.finfo(dtype).bits // 8 + 8, chunk_bytes)
    for start in range(0, n_text, step):
        block = sim[start : start + step].to(dtype)
        block = block.nan_to_num(nan=neg_inf, posinf=float("inf"), neginf=neg_inf)
        index = target[start : start + step, None].expand_as(block)
        group_max.scatter_reduce_(0, index, block, "amax", include_self=True)
    return group_max.t()


def v2t_ranks(sim: Tensor, text_to_video: Tensor, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
    """1-based pessimistic rank of each captioned video's own caption group (long, in column order)."""
    target = _check_inputs(sim, text_to_video)
    n_video = sim.shape[1]
    scores = video_to_text_sim(sim, target, chunk_bytes=chunk_bytes)  # [query video, group]
    has_caption = torch.bincount(target, minlength=n_video) > 0
    n_groups = int(has_caption.sum())
    group_by_query = scores.t()  # contiguous [group, query video]
    pos = group_by_query.diagonal()
    count = torch.zeros(n_video, dtype=torch.long, device=sim.device)
    step = _rows_per_chunk(n_video, _COUNT_BYTES, chunk_bytes)
    for start in range(0, n_video, step):
        count += (group_by_query[start : start + step] >= pos[None, :]).sum(dim=0, dtype=torch.int32)
    missing = ~(pos > float("-inf"))
    ranks = torch.where(missing, torch.full_like(count, n_groups), count)
    return ranks[has_caption]


def median_rank(ranks: Tensor) -> float:
    """Median with `np.median` semantics (mean of the two middle values for an even count)."""
    if ranks.numel() == 0:
        raise ValueError("median of an empty rank tensor")
    ordered = ranks.flatten().sort().values.double()
    n = ordered.numel()
    return float((ordered[(n - 1) // 2] + ordered[n // 2]) / 2)


def rank_metrics(ranks: Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """`R@k` (percent) for each k, `MdR` (np.median) and `MnR` from 1-based ranks."""
    if ranks.numel() == 0:
        raise ValueError("no queries to score")
    ranks = ranks.flatten()
    n = ranks.numel()
    out = {f"R@{k}": 100.0 * float((ranks <= k).sum()) / n for k in ks}
    out["MdR"] = median_rank(ranks)
    out["MnR"] = float(ranks.double().mean())
    return out


def retrieval_metrics(
    sim: Tensor, text_to_video: Tensor, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> dict[str, float]:
    """Contract-1 metrics: `t2v/` and `v2t/` R@1, R@5, R@10 (percent), MdR and MnR (1-based ranks)."""
    return metrics_from_ranks(query_ranks(sim, text_to_video, chunk_bytes=chunk_bytes))


def metrics_from_ranks(ranks: dict[str, Tensor]) -> dict[str, float]:
    """The `retrieval_metrics` dict from the per-query ranks of :func:`query_ranks`."""
    return {f"{direction}/{key}": value for direction in ("t2v", "v2t") for key, value in rank_metrics(ranks[direction]).items()}


def query_ranks(
    sim: Tensor, text_to_video: Tensor, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> dict[str, Tensor]:
    """Per-query ranks behind :func:`retrieval_metrics`: `t2v` `[n_text]`, `v2t` per captioned video, and
    `v2t_video`, the column of each `v2t` query (same tie, NaN and multi-caption rules as the metrics)."""
    with torch.no_grad():
        target = _check_inputs(sim, text_to_video)
        has_caption = torch.bincount(target, minlength=sim.shape[1]) > 0
        return {
            "t2v": t2v_ranks(sim, target, chunk_bytes=chunk_bytes),
            "v2t": v2t_ranks(sim, target, chunk_bytes=chunk_bytes),
            "v2t_video": has_caption.nonzero().flatten(),
        }


def text_to_video_from_keys(caption_video_keys: Sequence[str], video_keys: Sequence[str]) -> Tensor:
    """Long `[n_text]` column index of each caption's video key within `video_keys`."""
    column = {}
    for i, key in enumerate(video_keys):
        if key in column:
            raise ValueError(f"duplicate video key {key!r} at positions {column[key]} and {i}")
        column[key] = i
    missing = sorted({k for k in caption_video_keys if k not in column})
    if missing:
        shown = ", ".join(repr(k) for k in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise KeyError(f"{len(missing)} caption video key(s) not among the videos: {shown}{more}")
    return torch.tensor([column[k] for k in caption_video_keys], dtype=torch.long)


def dual_softmax(
    sim: Tensor, temperature: float = 100.0, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Tensor:
    """T-MASS DSL: `sim * softmax(temperature * sim, dim=0)` over texts; non-finite entries skipped, kept.

    With one caption per video this is exactly T-MASS's ``sims * np_softmax(100 * sims, axis=0)``
    on its ``[groups, max_caps, videos]`` tensor. With several captions T-MASS normalises over the
    queries of one caption *slot* at a time and a single NaN (padding) poisons a whole slot
    column; here every column is normalised over all of its finite text scores instead.
    """
    if not isinstance(sim, Tensor) or sim.dim() != 2:
        raise ValueError("sim must be a 2-D tensor [n_text, n_video]")
    if not sim.is_floating_point():
        raise TypeError(f"sim must be a floating-point tensor, got {sim.dtype}")
    dtype = torch.promote_types(sim.dtype, torch.float32)
    n_text, n_video = sim.shape
    out = torch.empty((n_text, n_video), dtype=dtype, device=sim.device)
    # Column blocks: the softmax needs whole columns; ~4 temporaries of the block's size.
    cols = max(1, int(chunk_bytes) // max(1, n_text * (4 * (torch.finfo(dtype).bits // 8) + 1)))
    for start in range(0, n_video, cols):
        block = sim[:, start : start + cols].to(dtype)
        valid = torch.isfinite(block)
        logits = torch.where(valid, block * temperature, torch.full_like(block, float("-inf")))
        weights = torch.softmax(logits, dim=0)  # an all-missing column gives NaN, masked below
        out[:, start : start + cols] = torch.where(valid, block * weights, block)
    return out
