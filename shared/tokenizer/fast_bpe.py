"""tiktoken's BPE over a Hugging Face byte-level BPE vocabulary, used only where it gives the same ids.

Why: the gateway tokenizes every prompt on the request's path, and `tokenizers` spends most of that
time merging words its cache has not seen: 1.4-2.2 ms for a 512-token prompt of fresh words here,
where tiktoken takes about a quarter of that (docs/performance.md).

Why it is exact: tiktoken merges by the rank of the merged token, `tokenizers` by the rank of the
merge rule. `FastBPE.build` accepts only a vocabulary where the two orders agree (token ids increase
with the merge list, every multi-byte token has a rule) and a pre-tokenizer whose split it can
reproduce with one regex; it returns None for anything else, and `encode` returns None for a text
with a byte the vocabulary lacks (`tokenizers` drops such bytes inside a word, tiktoken cannot), so
the caller falls back to `tokenizers`. tests/shared/test_fast_bpe.py checks equality over ShareGPT,
HumanEval, random-token prompts and every Unicode code point in several contexts.
"""

from __future__ import annotations

import json
from itertools import pairwise
from typing import Any

import tiktoken
from tokenizers import Tokenizer as HFTokenizer

# The GPT-2 split `tokenizers` uses for ByteLevel(use_regex=True).
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Digits(individual_digits=True) first, then the GPT-2 split on each piece: a digit stands alone (no
# leading space), and a whitespace run before a digit ends its piece, so it is taken whole.
_DIGITS_THEN_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
_DIGITS = {"type": "Digits", "individual_digits": True}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes, reversed: vocabulary strings -> raw bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in stand_ins:
            stand_ins[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in stand_ins.items()}


def _matches(config: Any, expected: dict[str, Any]) -> bool:
    return isinstance(config, dict) and all(config.get(k) == v for k, v in expected.items())


def _split_pattern(pre_tokenizer: Any) -> str | None:
    if _matches(pre_tokenizer, _BYTE_LEVEL):
        return _GPT2_SPLIT
    if _matches(pre_tokenizer, {"type": "Sequence"}):
        steps = pre_tokenizer.get("pretokenizers") or []
        if len(steps) == 2 and _matches(steps[0], _DIGITS) and _matches(steps[1], _BYTE_LEVEL):
            return _DIGITS_THEN_GPT2_SPLIT
    return None


class FastBPE:
    def __init__(self, encoding: tiktoken.Encoding, missing_bytes: bytes) -> None:
        self._encoding = encoding
        self._missing = missing_bytes  # bytes no token holds

    @classmethod
    def build(cls, backend: HFTokenizer) -> FastBPE | None:
        """The fast path for this tokenizer, or None where it could differ from `tokenizers`."""
        config = json.loads(backend.to_str())
        model = config.get("model") or {}
        pattern = _split_pattern(config.get("pre_tokenizer"))
        plain_bpe = model.get("type") == "BPE" and not any(
            model.get(k) for k in ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix",
                                   "byte_fallback", "ignore_merges"))
        if pattern is None or config.get("normalizer") is not None or not plain_bpe:
            return None
        added = config.get("added_tokens") or []
        if any(a.get(k) for a in added for k in ("lstrip", "rstrip", "single_word", "normalized")):
            return None
        specials = {str(a["content"]): int(a["id"]) for a in added}
        if any(s != t and t.startswith(s) for s in specials for t in specials):
            return None  # tokenizers takes the longest match there; tiktoken's regex may not
        to_byte = _byte_decoder()
        try:
            ranks = {bytes(to_byte[c] for c in text): int(i) for text, i in model["vocab"].items()
                     if text not in specials}
            rules = [m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]]
            merged = [ranks[bytes(to_byte[c] for c in a + b)] for a, b in rules]
        except (KeyError, ValueError, TypeError):
            return None
        if len(ranks) != len(model["vocab"]) - sum(t in model["vocab"] for t in specials):
            return None  # two vocabulary strings for the same bytes
        multi_byte = sum(len(t) > 1 for t in ranks)
        if len(set(merged)) != multi_byte or any(a >= b for a, b in pairwise(merged)):
            return None  # a token without its rule, or rule order != id order: rank-based merging differs
        singles = {t[0] for t in ranks if len(t) == 1}
        encoding = tiktoken.Encoding("distserve-bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
        return cls(encoding, bytes(b for b in range(256) if b not in singles))

    def encode(self, text: str) -> list[int] | None:
        """The ids `tokenizers` would give (special tokens in the text included), or None: use it instead."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: leave it to tokenizers' own handling
            return None
        if self._missing and len(data.translate(None, self._missing)) != len(data):
            return None
        return self._encoding.encode(text, allowed_special="all")
