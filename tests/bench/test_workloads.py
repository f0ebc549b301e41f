"""Workloads parsed from the packaged datasets, with a word counter standing in for the tokenizer."""

from __future__ import annotations

import json

import pytest

from shared import workloads
from shared.workloads import SLO, WorkloadRequest, default_api, default_slo, load_workload


def count_words(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="module", autouse=True)
def cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Build the ShareGPT index in a fresh cache directory, once for the module."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DISTSERVE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    workloads.sharegpt.cache_clear()
    yield
    workloads.sharegpt.cache_clear()
    mp.undo()


def test_truncated_json_array_yields_the_complete_items() -> None:
    text = '[{"a": 1},\n {"b": [2, 3]} , {"c": "unterminat'
    items = [item for _, _, item in workloads.iter_json_array(text)]
    assert items == [{"a": 1}, {"b": [2, 3]}]


def test_sharegpt_index_spans_decode_to_the_exchanges_they_index(tmp_path) -> None:
    conversations = [
        {"id": "1", "conversations": [{"from": "human", "value": "héllo ✓"}, {"from": "gpt", "value": "hi"}]},
        {"id": "2", "conversations": [{"from": "gpt", "value": "no human first"}]},
        {"id": "3", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a" * 4000}]},
    ]
    text = json.dumps(conversations, ensure_ascii=False, indent=1)[:-40]  # truncated like the package
    path = tmp_path / "sharegpt.json"
    path.write_text(text, encoding="utf-8")
    exchanges, documents = workloads.index_sharegpt(text)
    data = workloads.ShareGPT(path, exchanges, documents)
    assert [data.exchange(i) for i in range(len(exchanges))] == [("héllo ✓", "hi")]  # item 3 is cut off

    full = json.dumps(conversations, ensure_ascii=False)
    path.write_text(full, encoding="utf-8")
    data = workloads.ShareGPT(path, *workloads.index_sharegpt(full))
    assert [data.exchange(i) for i in range(2)] == [("héllo ✓", "hi"), ("q", "a" * 4000)]
    assert len(data.document_spans) == 1
    assert data.document(0).startswith("User: q\n\nAssistant: aaa")


def test_packaged_sharegpt_parses_item_by_item_and_caches_its_index() -> None:
    data = workloads.sharegpt()
    assert 17_000 < len(data.exchange_spans) < 17_671  # 17,671 complete items, most with an exchange
    assert len(list(workloads.cache_dir().glob("sharegpt-index-*.json"))) == 1
    workloads.sharegpt.cache_clear()
    again = workloads.sharegpt()  # from the cache file this time
    assert again.exchange_spans == data.exchange_spans and again.document_spans == data.document_spans


def test_chatbot_requests_are_first_turns_with_reply_lengths() -> None:
    requests = load_workload("chatbot", 50, seed=3, count_tokens=count_words, max_input_tokens=400)
    assert len(requests) == 50
    assert requests == load_workload("chatbot", 50, seed=3, count_tokens=count_words, max_input_tokens=400)
    assert requests != load_workload("chatbot", 50, seed=4, count_tokens=count_words, max_input_tokens=400)
    data = workloads.sharegpt()
    exchanges = {(p, count_words(reply)) for p, reply in map(data.exchange, range(len(data.exchange_spans)))}
    for r in requests:
        assert r.input_tokens == count_words(r.prompt) <= 400
        assert (r.prompt, r.output_tokens) in exchanges


def test_code_requests_are_humaneval_prompts_and_solution_lengths() -> None:
    problems = dict(workloads.humaneval_problems())
    assert len(problems) == 164
    requests = load_workload("code", 200, seed=0, count_tokens=count_words)
    assert len(requests) == 200 and len({r.prompt for r in requests}) == 164  # repeats after one pass
    for r in requests:
        assert r.output_tokens == count_words(problems[r.prompt])


def test_summarization_has_long_inputs_and_short_outputs() -> None:
    requests = load_workload("summarization", 20, seed=0, count_tokens=count_words)
    for r in requests:
        assert 1000 <= r.input_tokens <= 3064 and r.input_tokens == count_words(r.prompt)
        assert 32 <= r.output_tokens <= 128
        assert r.prompt.startswith("Summarize the following conversation")
    with pytest.raises(ValueError, match="summarization"):
        load_workload("summarization", 5, count_tokens=count_words, max_input_tokens=500)


def test_synthetic_fixed_and_uniform_lengths() -> None:
    fixed = load_workload("synthetic:37:5", 10, count_tokens=count_words)
    assert {(r.input_tokens, r.output_tokens) for r in fixed} == {(37, 5)}
    assert len({r.prompt for r in fixed}) == 10  # distinct prompts: no accidental prefix sharing
    spread = load_workload("synthetic:10-100:1-50", 200, 1, count_tokens=count_words, max_total_tokens=120)
    assert all(10 <= r.input_tokens <= 100 and 1 <= r.output_tokens <= 50 for r in spread)
    assert all(r.input_tokens + r.output_tokens <= 120 for r in spread)
    assert len({r.input_tokens for r in spread}) > 30


def test_synthetic_lengths_are_exact_with_a_real_bpe_tokenizer() -> None:
    from shared.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("default")
    requests = load_workload("synthetic:300:8", 5, count_tokens=lambda s: len(tokenizer.encode(s)))
    assert [r.input_tokens for r in requests] == [300] * 5
    assert all(len(tokenizer.encode(r.prompt)) == 300 for r in requests)


@pytest.mark.parametrize(
    ("name", "limits", "message"),
    [
        ("lmsys", {}, "unknown workload"),
        ("synthetic:12", {}, "synthetic:<in>:<out>"),
        ("synthetic:0:5", {}, "bad length"),
        ("synthetic:9-3:5", {}, "bad length"),
        ("synthetic:x:5", {}, "bad length"),
        ("synthetic:100:5", {"max_input_tokens": 50}, "fits the limits"),
        ("code", {"max_output_tokens": 0}, "max_output_tokens"),
        ("code", {"max_input_tokens": 3}, "fits the limits"),
    ],
)
def test_bad_workloads_are_clear_errors(name: str, limits: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_workload(name, 4, count_tokens=count_words, **limits)


def test_default_slos_and_scaling() -> None:
    assert default_slo("synthetic:128:32") == workloads.DEFAULT_SLOS["synthetic"]
    for name in ("chatbot", "code", "summarization"):
        assert 0 < default_slo(name).attainment_target <= 1
    slo = SLO(ttft_s=2.0, tpot_s=0.1, attainment_target=0.9)
    assert slo.scaled(0.5) == SLO(ttft_s=1.0, tpot_s=0.05, attainment_target=0.9)
    with pytest.raises(ValueError):
        SLO(ttft_s=0, tpot_s=0.1)
    with pytest.raises(ValueError):
        SLO(ttft_s=1, tpot_s=0.1, attainment_target=1.5)
    assert WorkloadRequest("p", 1, 2).output_tokens == 2


def test_chatbot_prompts_go_to_the_chat_api_unless_told_otherwise() -> None:
    from services.bench.serve import api_from_args
    from services.cli import build_parser

    assert [default_api(n) for n in ("chatbot", "code", "summarization", "synthetic:8:8")] == [
        "chat", "completions", "completions", "completions"]
    args = build_parser().parse_args(["bench", "serve", "--url", "http://127.0.0.1:1", "--workload", "chatbot"])
    assert api_from_args(args) == "chat"
    args = build_parser().parse_args(["bench", "compare", "--workload", "chatbot", "--api", "completions"])
    assert api_from_args(args) == "completions"
