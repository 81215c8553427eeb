"""An offline CLIP tokenizer built from OpenAI's BPE vocabulary shipped with the package."""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources

from transformers import CLIPTokenizer

#: OpenAI's CLIP uses the first 49152 - 256 - 2 merges of its BPE file.
_NUM_MERGES = 49152 - 256 - 2


def byte_to_unicode_table() -> dict[int, str]:
    """Map every byte to a printable unicode character, the reversible table GPT-2/CLIP BPE works on.

    The insertion order (printable bytes first, then the rest) is the order of CLIP's base vocabulary.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """Build CLIP's 49,408-token vocabulary and merge list from the bundled BPE file."""
    data = resources.files("tvr_bench.assets").joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]
    symbols = list(byte_to_unicode_table().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def offline_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """Return a CLIPTokenizer whose ids equal OpenAI's, built without any download."""
    vocab, merges = clip_vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges])
    tokenizer.model_max_length = model_max_length
    return tokenizer
