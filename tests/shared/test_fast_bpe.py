"""The tiktoken fast path gives exactly the ids `tokenizers` gives, or steps aside."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers

from shared.tokenizer import Tokenizer, load_tokenizer
from shared.tokenizer.fast_bpe import FastBPE
from shared.workloads import _turns, humaneval_problems, iter_json_array, sharegpt


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer("default")


def reference(tokenizer: Tokenizer, text: str) -> list[int]:
    return list(tokenizer.backend.encode(text, add_special_tokens=False).ids)


def assert_same(tokenizer: Tokenizer, texts: list[str]) -> None:
    fast = tokenizer._fast
    assert fast is not None
    for text in texts:
        assert fast.encode(text) == reference(tokenizer, text), repr(text[:200])


def test_default_model_takes_the_fast_path(tokenizer: Tokenizer) -> None:
    assert tokenizer._fast is not None
    text = "<|im_start|>user\nWhat is 12+30?<|im_end|>\n"
    assert tokenizer.encode(text) == reference(tokenizer, text)
    assert tokenizer.encode(text)[0] == 1  # <|im_start|> as its special id, as tokenizers splits it out


def test_sharegpt_and_humaneval(tokenizer: Tokenizer) -> None:
    # Every 40th conversation of the packaged ShareGPT (multilingual, code, markdown) and all of HumanEval.
    # The whole file (129k turns, 27.8M tokens) gave 0 differences (docs/performance.md).
    texts: list[str] = []
    for n, (_, _, item) in enumerate(iter_json_array(sharegpt().path.read_text(encoding="utf-8"))):
        if n % 40 == 0:
            texts.extend(turn["value"] for turn in _turns(item))
    texts.extend(prompt + solution for prompt, solution in humaneval_problems())
    assert len(texts) > 1000
    assert_same(tokenizer, texts)


def test_random_token_prompts(tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    assert_same(tokenizer, [tokenizer.decode([rng.randrange(tokenizer.vocab_size) for _ in range(256)],
                                             skip_special_tokens=False) for _ in range(200)])


def test_every_code_point_in_context(tokenizer: Tokenizer) -> None:
    # Letters, digits, spaces and punctuation around each character: the regex classes and the digit split.
    fast = tokenizer._fast
    assert fast is not None
    checked = 0
    for cp in range(0x30000):
        if 0xD800 <= cp < 0xE000:
            continue
        c = chr(cp)
        text = f"a{c}b x {c}{c}1 '{c}s !{c}! {c}  y\t{c} 2"
        ids = fast.encode(text)
        if ids is not None:
            checked += 1
            assert ids == reference(tokenizer, text), hex(cp)
    assert checked > 0x30000 - 0x800 - 100  # only the few characters with an unknown byte step aside


def test_text_with_bytes_the_vocabulary_lacks_falls_back(tokenizer: Tokenizer) -> None:
    fast = tokenizer._fast
    assert fast is not None
    for text in ("a\x04b", "!!\x06!!", "x\U00050000y", "lone \ud800 surrogate"):
        assert fast.encode(text) is None
    for text in ("a\x04b", "!!\x06!!", "x\U00050000y"):
        assert tokenizer.encode(text) == reference(tokenizer, text)


def _tiny(merges: list[tuple[str, str]], vocab: dict[str, int]) -> HFTokenizer:
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return backend


def test_declines_what_it_cannot_reproduce() -> None:
    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4}
    assert FastBPE.build(_tiny([("a", "b"), ("b", "c")], vocab)) is not None
    # Rule order no longer follows id order: rank-based merging would pick "ab" first in "abc".
    assert FastBPE.build(_tiny([("b", "c"), ("a", "b")], vocab)) is None
    # A token with no rule: tokenizers can never produce it, tiktoken would.
    assert FastBPE.build(_tiny([("a", "b")], vocab)) is None
    normalized = _tiny([("a", "b"), ("b", "c")], vocab)
    normalized.normalizer = normalizers.Lowercase()
    assert FastBPE.build(normalized) is None
    other_split = _tiny([("a", "b"), ("b", "c")], vocab)
    other_split.pre_tokenizer = pre_tokenizers.Whitespace()
    assert FastBPE.build(other_split) is None
