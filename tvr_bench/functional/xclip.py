"""X-CLIP (Ma et al., ACM MM 2022): multi-grained similarity with attention over similarity matrices (AOSM).

Notation (every feature unit length): sentence s_t [D] (the EOT token), words w_ti [W, D] (every token
state), video v_u [D] (the normalised masked mean of the normalised seqTransf frames), frames f_uk [F, D]
(the raw CLIP frames, normalised). AOSM of a score vector x [N] with a learned N x N matrix M (identity
at init) and temperature tau = 0.01:

    aosm_M(x) = sum_j x_j (softmax(x / tau) M)_j.

The four scores of a pair (t, u):

    video-sentence  s_t^T G v_u                                   G: D x D          (`global_mat_weight`)
    video-word      aosm_Mw([<w_ti, v_u>]_i)                      Mw: W x W         (`word_logit_weight`)
    sentence-frame  aosm_Mf([<s_t, f_uk>]_k)                      Mf: F x F         (`frame_logit_weight`)
    frame-word      1/2 [aosm_Mf2(a) + aosm_Mw2(b)] over A_ik = w_ti^T L f_uk   L: D x D (`local_mat_weight`),
                    a_k = aosm_Mw'(A_.k) over words (`word_mat_weight`), b_i = aosm_Mf'(A_i.) over frames
                    (`frame_mat_weight`); Mf2 = `frame_mat_weight2`, Mw2 = `word_mat_weight2`

score = the mean of the four; training: symmetric InfoNCE on exp(logit_scale) * score (the reference scales
each term by exp(logit_scale) also at evaluation: the ranks are the same). Names in back-ticks are the
reference's parameter names (xuguohai/X-CLIP modules/modeling_xclip.py L130-141).

Padding (`PADDINGS`): 'masked' (the paper) - a padded word or frame gets softmax weight 0 and its score
leaves the sum, in every term; 'reference' (the code) - the text mask is never used and padded frames
take part in the sentence-frame and frame-word terms (only the video mean is masked).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tvr_bench.functional.steps import step_bytes

#: Softmax temperature of every AOSM (modeling_xclip.py L324, L328, L342-346: `/ 1e-2`).
AOSM_TEMPERATURE = 1e-2
#: 'masked': the paper's definition; 'reference': xuguohai/X-CLIP's code (no text mask, padded frames in two terms).
PADDINGS = ("masked", "reference")
#: Names of the eight AOSM matrices, as in the reference (state dicts load with these keys).
AOSM_NAMES = (
    "global_mat_weight",
    "word_logit_weight",
    "frame_logit_weight",
    "local_mat_weight",
    "frame_mat_weight",
    "word_mat_weight",
    "frame_mat_weight2",
    "word_mat_weight2",
)


class AOSMWeights(nn.Module):
    """The eight learned matrices of X-CLIP's similarity head, identity at init (modeling_xclip.py L130-141).

    `dim` is the embedding width, `words` the fixed token count W (= max_words) and `frames` the fixed frame
    count F: the word and frame matrices act on positions, so every text has W token states and every video
    F frame slots.
    """

    def __init__(self, dim: int, words: int, frames: int):
        super().__init__()
        if min(dim, words, frames) < 1:
            raise ValueError(f"X-CLIP's AOSM needs positive sizes, got dim={dim}, words={words}, frames={frames}")
        self.dim, self.words, self.frames = dim, words, frames
        sizes = {"global_mat_weight": dim, "word_logit_weight": words, "frame_logit_weight": frames,
                 "local_mat_weight": dim, "frame_mat_weight": frames, "word_mat_weight": words,
                 "frame_mat_weight2": frames, "word_mat_weight2": words}  # fmt: skip
        for name in AOSM_NAMES:
            self.register_parameter(name, nn.Parameter(torch.eye(sizes[name])))

    def check(self, n_words: int | None = None, n_frames: int | None = None) -> None:
        """Refuse features whose token or frame count differs from the matrices' (a clear one-line error)."""
        if n_words is not None and n_words != self.words:
            raise ValueError(
                f"X-CLIP's word matrices are {self.words} x {self.words} but the text features have {n_words} token "
                f"positions; set model.init_args.max_words to the tokens the captions are padded to (at most CLIP's 77)"
            )
        if n_frames is not None and n_frames != self.frames:
            raise ValueError(
                f"X-CLIP's frame matrices are {self.frames} x {self.frames} but the videos have {n_frames} frame slots; "
                f"set model.init_args.num_frames to data.init_args.num_frames"
            )


# ------------------------------------------------------------------------------------------ AOSM
def _neg(dtype: torch.dtype) -> float:
    """The most negative finite value of `dtype` (a masked softmax logit that never makes a NaN)."""
    return torch.finfo(dtype).min


def _mix(attn: Tensor, weight: Tensor, dim: int) -> Tensor:
    """sum_i attn_i M_ij along `dim` (the AOSM's learned mixing of positions): the position axis moved last, one
    product with M, moved back, as the reference orders it (L324, L342, L346), so float rounding matches it."""
    if dim == attn.ndim - 1:
        return attn @ weight
    return torch.matmul(attn.movedim(dim, -1), weight).movedim(-1, dim)


def _mix_lean(attn: Tensor, weight: Tensor, dim: int) -> Tensor:
    """`_mix` for a contiguous `attn` without a permuted copy: M^T applied along `dim` as one batched product."""
    if dim == attn.ndim - 1:
        return attn @ weight
    shape = attn.shape
    lead, n = math.prod(shape[:dim]), shape[dim]
    return torch.matmul(weight.t(), attn.reshape(lead, n, -1)).reshape(shape)


def aosm(scores: Tensor, weight: Tensor, dim: int = -1, mask: Tensor | None = None,
         temperature: float = AOSM_TEMPERATURE, scores_first: bool = False) -> Tensor:  # fmt: skip
    """Attention over a similarity vector along `dim`: sum_j x_j (softmax(x / tau) M)_j, differentiable.

    `mask` (broadcastable to `scores`, True = real) gives padded positions softmax weight 0 and drops their
    score from the sum; None uses every position (the reference). `scores_first` only orders the operands of
    the last product as the reference does (the memory layout of the product, hence the order of the sum's
    float additions: with tau = 0.01 a rounding difference is amplified 100x by the next AOSM).
    """
    dim = dim % scores.ndim
    logits = scores / temperature
    if mask is not None:
        logits = logits.masked_fill(~mask, _neg(logits.dtype))
    attn = _mix(torch.softmax(logits, dim=dim), weight, dim)
    if mask is not None:
        attn = attn.masked_fill(~mask, 0.0)
    return (scores * attn if scores_first else attn * scores).sum(dim)


def _aosm_lean(scores: Tensor, weight: Tensor, dim: int, mask: Tensor | None, temperature: float = AOSM_TEMPERATURE) -> Tensor:
    """`aosm` without autograd for the evaluation scorer: an in-place softmax (reductions over `dim`, faster on CPU than
    `torch.softmax` over an inner dim), so at most two more copies of `scores` are alive at once."""
    dim = dim % scores.ndim
    a = scores / temperature
    if mask is not None:
        a.masked_fill_(~mask, _neg(a.dtype))
    a.sub_(a.amax(dim, keepdim=True)).exp_()
    a.div_(a.sum(dim, keepdim=True))
    w = _mix_lean(a, weight, dim)
    del a
    if mask is not None:
        w.masked_fill_(~mask, 0.0)
    return w.mul_(scores).sum(dim)


# ------------------------------------------------------------------------------------------ features
def normalise(x: Tensor) -> Tensor:
    """Unit-length rows (x / |x|, as the reference; a zero row stays zero instead of NaN)."""
    return F.normalize(x, dim=-1)


def video_level(frames: Tensor, frame_mask: Tensor) -> Tensor:
    """The video-level feature [N, D]: masked mean of the normalised (temporal-module) frames, normalised again
    (modeling_xclip.py L293-295; a video without a real frame divides by 1, as the reference's L244)."""
    m = frame_mask.to(frames.dtype).unsqueeze(-1)
    mean = (normalise(frames) * m).sum(1) / m.sum(1).clamp_min(1.0)
    return normalise(mean)


# ------------------------------------------------------------------------------------------ the four terms
def _masks(word_mask: Tensor | None, frame_mask: Tensor | None, padding: str) -> tuple[Tensor | None, Tensor | None]:
    """The masks each padding mode applies inside the terms: both ('masked'), none ('reference')."""
    if padding not in PADDINGS:
        raise ValueError(f"unknown X-CLIP padding {padding!r}; choose one of {PADDINGS}")
    if padding == "reference":
        return None, None
    return (None if word_mask is None else word_mask.bool()), (None if frame_mask is None else frame_mask.bool())


def video_sentence_scores(sentence: Tensor, video: Tensor, global_mat: Tensor) -> Tensor:
    """Coarse-grained score [T, V]: s_t^T G v_u."""
    return (sentence @ global_mat) @ video.t()


def video_word_scores(words: Tensor, video: Tensor, weight: Tensor, word_mask: Tensor | None = None) -> Tensor:
    """Cross-grained video-word score [T, V]: AOSM over each text's words of <w_ti, v_u> (modeling_xclip.py L323-324)."""
    x = torch.matmul(words, video.t())  # [T, W, V]
    return aosm(x, weight, dim=1, mask=None if word_mask is None else word_mask[:, :, None], scores_first=True)


def sentence_frame_scores(sentence: Tensor, frames: Tensor, weight: Tensor, frame_mask: Tensor | None = None) -> Tensor:
    """Cross-grained sentence-frame score [T, V]: AOSM over each video's frames of <s_t, f_uk> (L327-328, computed
    [V, T] and transposed as there)."""
    x = torch.matmul(sentence, frames.transpose(1, 2))  # [V, T, F]
    mask = None if frame_mask is None else frame_mask[:, None, :]
    return aosm(x, weight, dim=-1, mask=mask, scores_first=True).t()


def fine_grained_scores(words: Tensor, frames: Tensor, local_mat: Tensor) -> Tensor:
    """The word-frame matrix A [T, W, V, F] = w_ti^T L f_uk, one [T·W, D] x [D, V·F] product (L340)."""
    nt, nw, d = words.shape
    nv, nf, _ = frames.shape
    return ((words.reshape(nt * nw, d) @ local_mat) @ frames.reshape(nv * nf, d).t()).view(nt, nw, nv, nf)


def frame_word_parts(
    words: Tensor,
    frames: Tensor,
    weights: AOSMWeights,
    word_mask: Tensor | None = None,
    frame_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """The fine-grained term's stages (L337-348): `fine` [T, W, V, F]; `word_level` [T, V, F] (AOSM over words) and
    `frame_level` [T, W, V] (over frames); `sent2frame` and `video2word` [T, V] (the second AOSM of each path)."""
    fine = fine_grained_scores(words, frames, weights.local_mat_weight)
    wm4 = None if word_mask is None else word_mask[:, :, None, None]
    fm4 = None if frame_mask is None else frame_mask[None, None]
    word_level = aosm(fine, weights.word_mat_weight, dim=1, mask=wm4)
    frame_level = aosm(fine, weights.frame_mat_weight, dim=-1, mask=fm4)
    sent2frame = aosm(word_level, weights.frame_mat_weight2, dim=-1, mask=None if frame_mask is None else frame_mask[None])
    video2word = aosm(frame_level, weights.word_mat_weight2, dim=1, mask=None if word_mask is None else word_mask[:, :, None])
    return {"fine": fine, "word_level": word_level, "frame_level": frame_level, "sent2frame": sent2frame, "video2word": video2word}


def frame_word_scores(
    words: Tensor,
    frames: Tensor,
    weights: AOSMWeights,
    word_mask: Tensor | None = None,
    frame_mask: Tensor | None = None,
) -> Tensor:
    """Fine-grained frame-word score [T, V]: AOSM over words then frames, and over frames then words, averaged."""
    parts = frame_word_parts(words, frames, weights, word_mask, frame_mask)
    return (parts["sent2frame"] + parts["video2word"]) / 2


def xclip_terms(
    sentence: Tensor,
    words: Tensor,
    word_mask: Tensor,
    video: Tensor,
    frames: Tensor,
    frame_mask: Tensor,
    weights: AOSMWeights,
    padding: str = "masked",
) -> dict[str, Tensor]:
    """The four unscaled scores [T, V] of every text x video, one shot and differentiable (unit-length inputs)."""
    wm, fm = _masks(word_mask, frame_mask, padding)
    return {
        "video_sentence": video_sentence_scores(sentence, video, weights.global_mat_weight),
        "video_word": video_word_scores(words, video, weights.word_logit_weight, wm),
        "sentence_frame": sentence_frame_scores(sentence, frames, weights.frame_logit_weight, fm),
        "frame_word": frame_word_scores(words, frames, weights, wm, fm),
    }


def xclip_similarity(
    sentence: Tensor,
    words: Tensor,
    word_mask: Tensor,
    video: Tensor,
    frames: Tensor,
    frame_mask: Tensor,
    weights: AOSMWeights,
    padding: str = "masked",
) -> Tensor:
    """The X-CLIP score [T, V] (mean of the four terms, unscaled), one shot and differentiable."""
    terms = xclip_terms(sentence, words, word_mask, video, frames, frame_mask, weights, padding)
    return 0.25 * (terms["video_sentence"] + terms["video_word"] + terms["sentence_frame"] + terms["frame_word"])


# ------------------------------------------------------------------------------------------ blocked evaluation
#: Bytes of one step of `xclip_similarity_blocked` on CPU: the [t, W, v, F] word-frame block and its two working
#: copies should stay near cache size (each is read by a softmax, a mixing product and a weighted sum).
XCLIP_CHUNK_BYTES = 4 * 2**20
#: Copies of the word-frame block alive at once in a step (the block, the AOSM's weights and its mixed weights).
FINE_COPIES = 3


def xclip_pair_bytes(n_words: int, n_frames: int, itemsize: int = 4) -> int:
    """Memory one (text, video) pair costs in the blocked scorer: FINE_COPIES word-frame blocks, the word- and
    frame-level vectors and their AOSM copies, and the cross-grained vectors."""
    return itemsize * (FINE_COPIES * n_words * n_frames + 3 * (n_words + n_frames) + 3 * (n_words + n_frames) + 8)


def _extent(mask: Tensor) -> Tensor:
    """Per row, one past the last real position (0 for an empty row)."""
    pos = torch.arange(1, mask.shape[-1] + 1, device=mask.device)
    return (mask.bool() * pos).amax(-1)


def _chunk_sizes(n_text: int, n_video: int, pair_bytes: int, max_bytes: int) -> tuple[int, int]:
    """Text and video chunk sizes whose pairs fit `max_bytes` (at least 1 x 1), near square."""
    pairs = max(1, max_bytes // max(1, pair_bytes))
    bt = min(n_text, max(1, math.isqrt(pairs)))
    bv = min(n_video, max(1, pairs // bt))
    if bv == n_video:
        bt = min(n_text, max(1, pairs // bv))
    return bt, bv


def xclip_similarity_blocked(
    sentence: Tensor,
    words: Tensor,
    word_mask: Tensor,
    video: Tensor,
    frames: Tensor,
    frame_mask: Tensor,
    weights: AOSMWeights,
    padding: str = "masked",
    max_bytes: int = 256 * 2**20,
    chunk_bytes: int | None = None,
) -> Tensor:
    """Memory-bounded X-CLIP score [T, V], equal to `xclip_similarity` (no autograd; float32, autocast off).

    Each step scores a chunk of texts x videos whose word-frame blocks stay under min(`max_bytes`,
    `chunk_bytes`) (default: cache-sized XCLIP_CHUNK_BYTES on CPU, `max_bytes` on accelerators). G and L are
    applied once per text chunk. With padding 'masked' items are sorted by length and each chunk is cut to its
    longest member (and the position matrices to that many rows and columns): padded positions take no part,
    so the cut changes nothing but the work.
    """
    kind = sentence.device.type if sentence.device.type in ("cpu", "cuda", "xpu", "mps") else "cpu"
    chunk_bytes = step_bytes(sentence.device, XCLIP_CHUNK_BYTES, max_bytes, chunk_bytes)
    with torch.no_grad(), torch.autocast(device_type=kind, enabled=False):
        return _blocked(
            sentence.float(), words.float(), word_mask.bool(), video.float(), frames.float(), frame_mask.bool(),
            weights, padding, min(max_bytes, chunk_bytes),
        )  # fmt: skip


def _blocked(
    sentence: Tensor, words: Tensor, word_mask: Tensor, video: Tensor, frames: Tensor, frame_mask: Tensor,
    weights: AOSMWeights, padding: str, step: int,
) -> Tensor:  # fmt: skip
    nt, nw, d = words.shape
    nv, nf, _ = frames.shape
    out = sentence.new_empty(nt, nv)
    if nt == 0 or nv == 0:
        return out
    masked = padding == "masked"
    if padding not in PADDINGS:
        raise ValueError(f"unknown X-CLIP padding {padding!r}; choose one of {PADDINGS}")
    w = {name: getattr(weights, name).float() for name in AOSM_NAMES}
    if masked:  # longest first, so each chunk is cut to its first member's length
        t_ext, v_ext = _extent(word_mask), _extent(frame_mask)
        t_order = torch.argsort(t_ext, descending=True, stable=True)
        v_order = torch.argsort(v_ext, descending=True, stable=True)
    else:
        t_ext = torch.full((nt,), nw, device=words.device)
        v_ext = torch.full((nv,), nf, device=frames.device)
        t_order, v_order = torch.arange(nt, device=words.device), torch.arange(nv, device=frames.device)
    bt, bv = _chunk_sizes(nt, nv, xclip_pair_bytes(nw, nf, words.element_size()), step)
    v_chunks = []
    for vs in range(0, nv, bv):
        vi = v_order[vs : vs + bv]
        fb = max(1, int(v_ext[vi[0]]))
        fm = frame_mask[vi, :fb] if masked else None
        v_chunks.append((vi, fb, frames[vi, :fb], None if fm is None or bool(fm.all()) else fm, video[vi]))  # no mask: fewer passes
    global_t = sentence @ w["global_mat_weight"]
    for ts in range(0, nt, bt):
        ti = t_order[ts : ts + bt]
        lb = max(1, int(t_ext[ti[0]]))
        words_c = words[ti, :lb]
        wm = word_mask[ti, :lb] if masked else None
        wm = None if wm is None or bool(wm.all()) else wm
        words_l = (words_c.reshape(-1, d) @ w["local_mat_weight"]).view(len(ti), lb, d)
        sent_c, glob_c = sentence[ti], global_t[ti]
        for vi, fb, frames_c, fm, video_c in v_chunks:
            nvc = len(vi)
            coarse = glob_c @ video_c.t()  # video-sentence [t, v]
            x = (words_c.reshape(-1, d) @ video_c.t()).view(len(ti), lb, nvc)
            v_word = _aosm_lean(x, w["word_logit_weight"][:lb, :lb], 1, None if wm is None else wm[:, :, None])
            x = (sent_c @ frames_c.reshape(-1, d).t()).view(len(ti), nvc, fb)
            s_frame = _aosm_lean(x, w["frame_logit_weight"][:fb, :fb], -1, None if fm is None else fm[None])
            fine = (words_l.reshape(-1, d) @ frames_c.reshape(-1, d).t()).view(len(ti), lb, nvc, fb)
            word_level = _aosm_lean(fine, w["word_mat_weight"][:lb, :lb], 1, None if wm is None else wm[:, :, None, None])
            frame_level = _aosm_lean(fine, w["frame_mat_weight"][:fb, :fb], -1, None if fm is None else fm[None, None])
            del fine
            s2f = _aosm_lean(word_level, w["frame_mat_weight2"][:fb, :fb], -1, None if fm is None else fm[None])
            v2w = _aosm_lean(frame_level, w["word_mat_weight2"][:lb, :lb], 1, None if wm is None else wm[:, :, None])
            score = coarse.add_(v_word).add_(s_frame).add_(s2f.add_(v2w).mul_(0.5)).mul_(0.25)
            out[ti[:, None], vi[None, :]] = score
    return out
