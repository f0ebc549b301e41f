"""Which bytes of which tensor-parallel source a rank pulls (shared/transfer/heads.py); the pulls themselves
run between real engines in tests/engine/test_tensor_parallel.py."""

from __future__ import annotations

import numpy as np
import pytest

from shared.engine.api import HeadShare, KVImport
from shared.protocol import KVHandle, KVMeta
from shared.sampling_params import SamplingParams
from shared.transfer import TransferError
from shared.transfer.base import Rows
from shared.transfer.heads import Source, plan, pull_heads

U = 8  # bytes of one head's vector in a row


def handle(shard_heads: list[int]) -> KVHandle:
    meta = KVMeta(request_id="r", prompt_token_ids=[1], output_token_ids=[2], params=SamplingParams(),
                  num_kv_tokens=1, num_blocks=1, block_size=16, block_nbytes=64, output_text=None,
                  num_emitted_chars=0, shard_heads=shard_heads)
    addresses = [f"tcp://127.0.0.1:{1000 + i}" for i in range(max(1, len(shard_heads)))]
    return KVHandle(prefill_instance="p", transport="tcp", address=addresses[0], transfer_id="r", nbytes=64,
                    meta=meta, shard_addresses=addresses[1:])


def test_tp2_to_tp3_takes_each_rank_its_heads_from_whoever_has_them() -> None:
    kv = handle([2, 1])  # prefill TP2 of 3 heads: [0, 2) and [2, 3)
    assert plan(kv, HeadShare(0, 1, 3, U)) == [Source("tcp://127.0.0.1:1000", Rows(2 * U, 0, U), (0, U))]
    assert plan(kv, HeadShare(1, 2, 3, U)) == [Source("tcp://127.0.0.1:1000", Rows(2 * U, U, U), (0, U))]
    assert plan(kv, HeadShare(2, 3, 3, U)) == [Source("tcp://127.0.0.1:1001", None, (0, U))]  # all of rank 1's
    assert plan(kv, HeadShare(0, 3, 3, U)) == [Source("tcp://127.0.0.1:1000", None, (0, 2 * U)),
                                               Source("tcp://127.0.0.1:1001", None, (2 * U, 3 * U))]


def test_one_source_offers_every_head() -> None:
    assert plan(handle([]), HeadShare(1, 3, 3, U)) == [Source("tcp://127.0.0.1:1000", Rows(3 * U, U, 2 * U),
                                                              (0, 2 * U))]


@pytest.mark.parametrize("shard_heads", [[2, 2], [3, 0], [1, 1, 1]])  # 4 heads; an empty rank; 3 sources, 2 addresses
def test_a_split_that_does_not_fit_the_model_is_a_transfer_error(shard_heads: list[int]) -> None:
    kv = handle(shard_heads)
    if len(shard_heads) == 3:
        kv = kv.model_copy(update={"shard_addresses": kv.shard_addresses[:1]})
    with pytest.raises(TransferError, match="sources"):
        plan(kv, HeadShare(0, 3, 3, U))


async def test_an_engine_without_heads_takes_no_split_kv() -> None:
    with pytest.raises(TransferError, match="takes KV from one source"):
        await pull_heads(None, handle([2, 1]), KVImport([np.zeros(64, np.uint8)]), 1.0)  # type: ignore[arg-type]
