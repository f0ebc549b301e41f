"""The `distserve generate` and `distserve bench engine` commands, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = "random:" + json.dumps(dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                   num_kv_heads=2, head_dim=16, max_position_embeddings=256))


def distserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)


def test_generate_chat_answers() -> None:
    result = distserve("generate", "--chat", "What is the capital of France?", "--max-tokens", "20")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "finish_reason=stop" in result.stderr


def test_bad_sampling_value_is_a_clear_error() -> None:
    result = distserve("generate", "--top-p", "0", "hello")
    assert result.returncode == 2
    assert "--top-p" in result.stderr and "greater than 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_flag_type_is_a_clear_error() -> None:
    result = distserve("generate", "--max-tokens", "many", "hello")
    assert result.returncode == 2
    assert "--max-tokens" in result.stderr and "Traceback" not in result.stderr


def test_bench_engine_prints_its_tables() -> None:
    # The tokenizer's whole vocabulary, so that the reference text can be scored.
    model = "random:" + json.dumps({**json.loads(TINY.removeprefix("random:")), "vocab_size": 49152})
    result = distserve("bench", "engine", "--model", model, "--variants", "q4_1,int8", "--prefill-lengths", "16",
                       "--decode-batches", "1,2", "--context", "8", "--repeat", "1", "--warmup", "0",
                       "--decode-steps", "2", "--kv-gib", "0.01", "--copy-mib", "4", "--gemm-n", "64",
                       "--quality-tokens", "40")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for title in ("Machine", "GFLOP/s", "Prefill", "Decode", "Quality: 40 tokens"):
        assert title in out
    cells = [line.split("│") for line in out.splitlines()]
    rows = [c for c in cells if len(c) > 2 and c[1].strip() in ("fp32", "q4_1", "int8")]
    # One prefill length, two decode batches for each variant, then each one's quality against fp32's.
    assert [c[1].strip() for c in rows] == ["q4_1", "int8"] + ["q4_1"] * 2 + ["int8"] * 2 + ["fp32", "q4_1", "int8"]
    assert "+0.00%" in rows[-3][3] and "100.0%" in rows[-3][4]


def test_bench_engine_skips_quality_where_the_text_does_not_fit_the_vocabulary() -> None:
    result = distserve("bench", "engine", "--model", TINY, "--prefill-lengths", "16", "--decode-batches", "1",
                       "--context", "8", "--repeat", "1", "--warmup", "0", "--decode-steps", "2", "--kv-gib", "0.01",
                       "--copy-mib", "4", "--gemm-n", "64")
    assert result.returncode == 0, result.stderr
    assert "Quality" not in result.stdout and "vocabulary" in result.stderr


def test_bench_engine_rejects_a_grid_that_does_not_fit() -> None:
    result = distserve("bench", "engine", "--model", TINY, "--prefill-lengths", "16", "--decode-batches", "64",
                       "--kv-gib", "0.0001", "--copy-mib", "4", "--gemm-n", "64", "--repeat", "1")
    assert result.returncode == 2
    assert "--kv-gib" in result.stderr
    assert distserve("bench", "engine", "--quality-tokens", "1").returncode == 2
