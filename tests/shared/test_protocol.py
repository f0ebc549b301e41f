"""Every wire message survives encode -> NATS -> decode unchanged; other versions are refused."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client as NATS
from pydantic import ValidationError

from shared import protocol as p

META = p.KVMeta(request_id="req-1", prompt_token_ids=[1, 2, 3], output_token_ids=[42],
                params=p.SamplingParams(max_tokens=8, temperature=0.0), num_kv_tokens=3, num_blocks=1, block_size=16,
                block_nbytes=4096, output_text="é", num_emitted_chars=1)
KV = p.KVHandle(prefill_instance="prefill-0", transport="tcp", address="tcp://127.0.0.1:5000",
                transfer_id="req-1", nbytes=4096, meta=META)

SAMPLES: list[p.Message] = [
    p.WorkerInfo(instance_id="prefill-0", role="prefill", model="default", max_model_len=8192, pid=1,
                 host="h", started_at=1.5, seq=3, transport="tcp", transfer_address="tcp://127.0.0.1:5000",
                 load=p.WorkerLoad(queued_tokens=10, waiting=1, held=2, free_blocks=5, total_blocks=8)),
    p.WorkerBye(instance_id="decode-0"),
    p.PrefillRequest(request_id="req-1", prompt_token_ids=[1, 2, 3], reply_to=p.Subjects.tokens("gw"),
                     sampling=p.SamplingParams(max_tokens=8, temperature=0.0, stop=["\n"], seed=7), arrived_at=2.0),
    p.DecodeRequest(request_id="req-1", reply_to=p.Subjects.tokens("gw"), kv=KV),
    p.KVRelease(request_id="req-1", pulled=False),
    p.AbortRequest(request_id="req-1"),
    p.TokenBatch(instance_id="decode-0", events=[
        p.TokenEvent(request_id="req-1", token_id=42, text="é", num_prompt_tokens=3, num_output_tokens=1,
                     kv=KV),
        p.TokenEvent(request_id="req-2", token_id=2, finished=True, finish_reason="stop",
                     transfer=p.TransferInfo(nbytes=4096, seconds=0.001, transport="tcp")),
        p.TokenEvent(request_id="req-3", error="prompt too long", status=400, finished=True),
    ]),
    p.PlanMessage(model="opt-13b", hardware="a100", rate=10.0, gpus=5,
                  prefill=p.PhaseShape(tp=1, pp=3, instances=1, gpus=3),
                  decode=p.PhaseShape(tp=1, pp=2, instances=1, gpus=2), goodput_per_gpu=2.1, speedup_per_gpu=1.58,
                  reason="first plan", observed_rate=9.5, at=1.0),
]


def test_every_message_kind_has_a_sample() -> None:
    assert {type(m) for m in SAMPLES} == set(p.MESSAGES)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_in_memory(message: p.Message) -> None:
    assert p.decode(type(message), message.encode()) == message


async def test_round_trip_over_nats_with_headers(nats_client: NATS) -> None:
    received: asyncio.Queue[tuple[bytes, dict[str, str] | None]] = asyncio.Queue()

    async def on_message(msg) -> None:  # type: ignore[no-untyped-def]
        await received.put((msg.data, msg.headers))

    await nats_client.subscribe(f"{p.PREFIX}.test.>", cb=on_message)
    for message in SAMPLES:
        await nats_client.publish(f"{p.PREFIX}.test.{type(message).__name__}", message.encode(),
                                  headers={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})
    for message in SAMPLES:
        data, headers = await asyncio.wait_for(received.get(), 5)
        assert p.decode(type(message), data) == message
        assert headers is not None and headers["traceparent"].startswith("00-")


def test_other_version_and_garbage_are_refused() -> None:
    wire = p.AbortRequest(request_id="x").model_dump()
    wire["v"] = 2
    with pytest.raises(ValidationError):
        p.decode(p.AbortRequest, p.AbortRequest.model_construct(**wire).model_dump_json().encode())
    with pytest.raises(ValidationError):
        p.decode(p.AbortRequest, b"not json")
    with pytest.raises(ValidationError):
        p.decode(p.PrefillRequest, b'{"request_id": "x"}')


def test_subjects_are_versioned_and_per_instance() -> None:
    assert p.Subjects.submit("decode", "decode-1") == "distserve.v1.decode.decode-1.submit"
    assert p.Subjects.release("prefill-0").startswith("distserve.v1.prefill.prefill-0.")
    assert p.Subjects.tokens("gw-1").startswith(p.PREFIX)
    assert p.Subjects.heartbeat.startswith(p.PREFIX) and p.Subjects.abort.startswith(p.PREFIX)
