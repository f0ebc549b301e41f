"""Tensor parallelism on CPU (gloo over loopback): the sharding, TP2 == TP1, and KV across different TP.

The default model has 9 query heads in 3 KV groups: at TP2 rank 0 holds 2 KV heads and rank 1 one, so
these tests also cover an uneven split. Each TP2 engine starts one child process (rank 1).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
import torch

from shared.config import EngineSettings
from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.engine.loader import load_model
from shared.engine.tensor_parallel import Shard, check_shardable, shard_config, shard_model_
from shared.protocol import KVHandle, KVMeta
from shared.transfer import TransferError, create_transport
from shared.transfer.heads import pull_heads
from tests.engine.conftest import make_engine, run_to_completion
from tests.engine.test_generation import GREEDY, PROMPTS, generate_alone


@pytest.fixture(scope="module")
def tp2() -> Iterator[LLMEngine]:
    engine = make_engine(tp=2, kv_transport="tcp")  # its ranks 1.. pull KV heads on TCP transports of their own
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


async def hand_off(prefill: LLMEngine, decode: LLMEngine, request_id: str) -> tuple[int, int, int]:
    """The worker's KV hand-off in miniature, over real TCP transports: rank 0 of each side on its own (as a
    worker's), the other ranks on theirs. The bytes decode's rank 0 pulled, those its other ranks did, and the
    whole KV's."""
    sender, receiver = create_transport("tcp"), create_transport("tcp")
    await sender.start()
    await receiver.start()
    try:
        export = prefill.kv_export(request_id)
        sender.offer(request_id, export.views)
        kv = KVHandle(prefill_instance="prefill", transport="tcp", address=sender.address, transfer_id=request_id,
                      nbytes=export.nbytes, meta=export.meta, shard_addresses=export.shard_addresses)
        dest = decode.kv_import_begin(kv.meta)
        assert dest is not None
        others = decode.kv_import_ranks(kv, 30)
        own = await pull_heads(receiver, kv, dest, 30)
        theirs = await asyncio.wrap_future(others) if others is not None else 0
        decode.kv_import_commit(request_id)
        return own.nbytes, theirs, kv.meta.nbytes
    finally:
        await sender.close()
        await receiver.close()


@pytest.mark.parametrize("prefill_tp, decode_tp", [(2, 1), (1, 2), (2, 2)])
async def test_each_rank_moves_only_its_own_kv_heads(engine: LLMEngine, tp2: LLMEngine, prefill_tp: int,
                                                      decode_tp: int) -> None:
    """TP2 -> TP1, TP1 -> TP2 and TP2 -> TP2 continue exactly as one engine would, and each decode rank pulls
    only its heads (2 of the model's 3 on rank 0, 1 on rank 1), from the prefill ranks that have them."""
    prompt = PROMPTS[1]
    expected = generate_alone(engine, prompt)
    prefill = make_engine(role="prefill", tp=prefill_tp, kv_transport="tcp")
    decode = tp2 if decode_tp == 2 else make_engine(role="decode")
    try:
        prefill.add_request("r", prefill.tokenizer.encode(prompt), GREEDY)
        (first,) = prefill.step()
        own, theirs, whole = await hand_off(prefill, decode, "r")
        assert whole == engine.block_nbytes * len(prefill.sequences["r"].block_table)  # the whole model's, at any tp
        assert (own, theirs) == ((whole, 0) if decode_tp == 1 else (whole * 2 // 3, whole // 3))
        prefill.release("r")
        assert [first.token_id, *run_to_completion(decode)["r"]] == expected
    finally:
        prefill.close()


async def test_a_rank_that_cannot_pull_fails_the_import_which_recomputes(engine: LLMEngine, tp2: LLMEngine) -> None:
    prompt = PROMPTS[2]
    prefill = make_engine(role="prefill", tp=2, kv_transport="tcp")
    try:
        prefill.add_request("gone", prefill.tokenizer.encode(prompt), GREEDY)
        (first,) = prefill.step()
        export = prefill.kv_export("gone")
        prefill.abort("gone")  # its ranks withdraw their offers: the KV is gone before the pull
        kv = KVHandle(prefill_instance="prefill", transport="tcp", address="tcp://127.0.0.1:1", transfer_id="gone",
                      nbytes=export.nbytes, meta=export.meta, shard_addresses=export.shard_addresses)
        assert tp2.kv_import_begin(kv.meta) is not None
        others = tp2.kv_import_ranks(kv, 30)
        assert others is not None
        with pytest.raises(TransferError, match="tp rank 1.*no transfer"):
            await asyncio.wrap_future(others)
        tp2.kv_import_recompute("gone")  # the worker's failure policy: the ranks drop what they have of it
        assert [first.token_id, *run_to_completion(tp2)["gone"]] == generate_alone(engine, prompt)
    finally:
        prefill.close()


def test_pulls_and_forgets_do_not_wait_for_the_step_under_way(engine: LLMEngine, tp2: LLMEngine) -> None:
    """They come from the worker's event loop, which a step of the ranks must not stall."""
    assert tp2.tp is not None
    meta = KVMeta(request_id="q", prompt_token_ids=[5, 6], output_token_ids=[7], params=GREEDY, num_kv_tokens=2,
                  num_blocks=1, block_size=tp2.config.block_size, block_nbytes=tp2.block_nbytes, output_text=None,
                  num_emitted_chars=0)
    kv = KVHandle(prefill_instance="prefill", transport="tcp", address="tcp://127.0.0.1:1", transfer_id="q",
                  nbytes=meta.nbytes, meta=meta)
    returned = threading.Event()

    def from_the_event_loop() -> None:
        pulled = tp2.kv_import_ranks(kv, 5)
        tp2.abort("q")  # the ranks forget it: its pull fails here, whatever rank 1 reports later
        assert pulled is not None and isinstance(pulled.exception(), TransferError)
        returned.set()

    with tp2.tp._lock:  # a step under way
        threading.Thread(target=from_the_event_loop, daemon=True).start()
        assert returned.wait(30), "a pull or a forget waited for the step"
    assert generate_alone(tp2, PROMPTS[0]) == generate_alone(engine, PROMPTS[0])  # the ranks took the commands


def test_a_tp_engine_without_a_kv_transport_says_so() -> None:
    prefill = make_engine(role="prefill", tp=2)  # as in process: no worker gave it a transport
    try:
        prefill.add_request("r", prefill.tokenizer.encode(PROMPTS[0]), SamplingParams(max_tokens=2))
        prefill.step()
        with pytest.raises(RuntimeError, match="no KV transport"):
            prefill.kv_export("r")
    finally:
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
