"""`distserve generate` and `distserve chat`: the engine on its own, streaming to the terminal."""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO, get_args

from pydantic import ValidationError

from shared.argtypes import positive_int
from shared.engine.api import StepOutput
from shared.engine.config import EngineConfig, Weights
from shared.engine.sequence import SamplingParams

if TYPE_CHECKING:
    from shared.engine.engine import LLMEngine


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a .gguf file, "
                   "a Hugging Face directory or 'random:<preset or JSON>' (default %(default)s)")
    p.add_argument("--threads", type=positive_int, help="torch threads (default: all cores)")
    p.add_argument("--weights", choices=("auto", *get_args(Weights)), default="auto",
                   help="linear weights: auto (chosen for this CPU), native fp32, fp16, int8, or GGUF's q8_0 / q4_1 "
                   "blocks (default %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="compile decode steps at start (faster decode; 15 s to 2 min of compiling first)")


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="default %(default)s")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1, help="-1 disables (default)")
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="complete one prompt with the local engine, streaming")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as one user message")
    add_engine_args(p)
    add_sampling_args(p, max_tokens=256)
    p.set_defaults(func=generate_main)

    c = subparsers.add_parser("chat", help="interactive chat with the local engine (/reset, /exit)")
    add_engine_args(c)
    add_sampling_args(c, max_tokens=512)
    c.set_defaults(func=chat_main)


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)


def error_text(e: Exception) -> str:
    if isinstance(e, ValidationError):  # "--top-p: Input should be greater than 0", one line per field
        return "; ".join(f"--{'.'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}" for err in e.errors())
    return str(e)


def build(args: argparse.Namespace) -> tuple[LLMEngine, SamplingParams]:
    """Validate the sampling flags first: a typo should not cost a model load."""
    from shared.engine.engine import LLMEngine  # torch: loaded by the commands that run the model only
    params = sampling_from_args(args)
    engine = LLMEngine(EngineConfig(model=args.model, num_threads=args.threads, weights=args.weights,
                                    compile=args.compile, max_num_seqs=1, kv_cache_memory_gib=0.25))
    return engine, params


_request_ids = itertools.count()


def stream(engine: LLMEngine, prompt_ids: list[int], params: SamplingParams, out: TextIO) -> dict[str, Any]:
    """Generate one completion, writing text as it comes; the run's statistics."""
    request_id = f"cli-{next(_request_ids)}"
    engine.add_request(request_id, prompt_ids, params)
    start = time.perf_counter()
    first: float | None = None
    last: StepOutput | None = None
    text = ""
    while engine.has_unfinished():
        for output in engine.step():
            first = first or time.perf_counter()
            last = output
            text += output.text
            out.write(output.text)
            out.flush()
    end = time.perf_counter()
    assert last is not None and first is not None  # add_request succeeded, so at least one step ran
    n = last.num_output_tokens
    return {"text": text, "finish_reason": last.finish_reason, "prompt_tokens": last.num_prompt_tokens,
            "output_tokens": n, "ttft_s": first - start,
            "decode_tok_s": (n - 1) / (end - first) if n > 1 and end > first else float("nan")}


def report(stats: dict[str, Any]) -> None:
    print(f"[finish_reason={stats['finish_reason']} prompt={stats['prompt_tokens']} tokens "
          f"output={stats['output_tokens']} tokens TTFT={1000 * stats['ttft_s']:.0f} ms "
          f"decode={stats['decode_tok_s']:.1f} tokens/s]", file=sys.stderr)


def generate_main(args: argparse.Namespace) -> int:
    try:
        engine, params = build(args)
        prompt = args.prompt
        if args.chat:
            prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        stats = stream(engine, engine.tokenizer.encode(prompt), params, sys.stdout)
    except (ValueError, FileNotFoundError) as e:  # pydantic's ValidationError is a ValueError
        print(f"distserve generate: error: {error_text(e)}", file=sys.stderr)
        return 2
    print()
    report(stats)
    return 0


def chat_main(args: argparse.Namespace) -> int:
    try:
        engine, params = build(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"distserve chat: error: {error_text(e)}", file=sys.stderr)
        return 2
    print(f"Chatting with {engine.model_name}. /reset clears the history, /exit (or Ctrl-D) quits.", file=sys.stderr)
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line == "/exit":
            return 0
        if line == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        if not line:
            continue
        messages = [*history, {"role": "user", "content": line}]
        try:
            prompt_ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template(messages))
            stats = stream(engine, prompt_ids, params, sys.stdout)
        except ValueError as e:  # e.g. the conversation outgrew the context: say so, keep the session
            print(f"error: {e} (/reset starts over)", file=sys.stderr)
            continue
        print()
        report(stats)
        history = [*messages, {"role": "assistant", "content": stats["text"]}]
