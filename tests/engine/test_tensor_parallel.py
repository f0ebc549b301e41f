"""Tensor parallelism on CPU (gloo over loopback): the sharding, TP2 == TP1, and KV across different TP.

The default model has 9 query heads in 3 KV groups: at TP2 rank 0 holds 2 KV heads and rank 1 one, so
these tests also cover an uneven split. Each TP2 engine starts one child process (rank 1).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from shared.config import EngineSettings
from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.engine.loader import load_model
from shared.engine.tensor_parallel import Shard, check_shardable, shard_config, shard_model_
from tests.engine.conftest import make_engine, move_kv, run_to_completion
from tests.engine.test_generation import GREEDY, PROMPTS, generate_alone


@pytest.fixture(scope="module")
def tp2() -> Iterator[LLMEngine]:
    engine = make_engine(tp=2)
    yield engine
    engine.close()


def test_shares_cover_every_item_once() -> None:
    for n in (1, 3, 7, 1536):
        for world in range(1, min(n, 5) + 1):
            parts = [Shard(rank, world).part(n) for rank in range(world)]
            assert [i for part in parts for i in part] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_sharded_layers_sum_to_the_whole_layer() -> None:
    """Each rank's attention and MLP outputs, summed, are the unsharded layer's (the all-reduce's job)."""
    model = load_model("random:smollm2-135m")
    x = torch.randn(5, model.config.hidden_size)
    whole = model.layers[0].mlp(x)
    parts = []
    for rank in range(2):
        shard = load_model("random:smollm2-135m")
        shard_model_(shard, Shard(rank, 2), lambda t: None)
        assert shard.layers[0].attn.config == shard_config(model.config, Shard(rank, 2))
        assert shard.computes_logits == (rank == 0)
        parts.append(shard.layers[0].mlp(x))
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-5, atol=1e-5)


def test_tp_beyond_the_kv_heads_is_refused() -> None:
    config = load_model("random:smollm2-135m").config
    with pytest.raises(ValueError, match="tp=4 exceeds the model's 3 KV heads"):
        check_shardable(config, 4)
    with pytest.raises(ValueError, match="tp=4 exceeds the model's 3 KV heads"):  # the ranks it started: killed
        make_engine(tp=4)
    with pytest.raises(ValueError, match="compile applies to tp=1"):
        EngineSettings(tp=2, compile=True)


def test_two_ranks_generate_what_one_does(engine: LLMEngine, tp2: LLMEngine) -> None:
    assert tp2.tp is not None and len(tp2.tp.pids) == 1
    assert tp2.cache.num_blocks == engine.cache.num_blocks  # the instance's budget, whatever the tp
    assert tp2.cache.data.shape[-2] == 2  # rank 0's KV heads
    for prompt in PROMPTS[:3]:
        assert generate_alone(tp2, prompt) == generate_alone(engine, prompt), prompt
    for i, prompt in enumerate(PROMPTS):  # batched: decodes and prefills in one step
        tp2.add_request(str(i), tp2.tokenizer.encode(prompt), GREEDY)
    got = run_to_completion(tp2)
    assert {PROMPTS[int(k)]: v for k, v in got.items()} == {p: generate_alone(engine, p) for p in PROMPTS}


def test_kv_moves_between_different_tp(engine: LLMEngine, tp2: LLMEngine) -> None:
    """TP2 prefill -> TP1 decode and TP1 prefill -> TP2 decode continue exactly as one engine would."""
    prompt = PROMPTS[1]
    expected = generate_alone(engine, prompt)
    for prefill, decode in ((make_engine(role="prefill", tp=2), make_engine(role="decode")),
                            (make_engine(role="prefill"), tp2)):
        prefill.add_request("r", prefill.tokenizer.encode(prompt), GREEDY)
        (first,) = prefill.step()
        export = prefill.kv_export("r")
        assert export.meta.block_nbytes == engine.block_nbytes  # the whole model's layout at any tp
        move_kv(prefill, decode, "r")
        prefill.release("r")
        assert [first.token_id, *run_to_completion(decode)["r"]] == expected
        prefill.close()


def test_a_dead_rank_fails_the_step_instead_of_hanging() -> None:
    engine = make_engine(tp=2)
    assert engine.tp is not None
    engine.tp._processes[0].kill()
    engine.tp._processes[0].wait()
    engine.add_request("r", engine.tokenizer.encode(PROMPTS[0]), SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError):
        engine.step()
    engine.close()


def test_the_other_ranks_exit_on_close() -> None:
    engine = LLMEngine(EngineConfig(kv_cache_memory_gib=0.05, weights="native", tp=3))
    assert engine.tp is not None
    processes = list(engine.tp._processes)
    assert len(processes) == 2
    engine.close()
    assert all(p.poll() is not None for p in processes)
