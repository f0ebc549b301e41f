"""Malformed, wrong-version and hostile control messages are logged and dropped: no worker or gateway
dies of them, and the stack answers exactly as before. Sent with a plain NATS client to every subject
the services listen on."""

from __future__ import annotations

import asyncio
import json

import nats

from services.launcher import Stack
from shared import protocol as p
from shared.servers import NatsServer, RedisServer
from tests.services.conftest import start_stack
from tests.services.test_stack import MODEL, PROMPT, client, kv_in_use, wait_until


def greedy(stack: Stack) -> str:
    reply = client(stack).completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    return reply.choices[0].text


async def test_garbage_on_every_subject_kills_nothing(redis_server: RedisServer) -> None:
    with NatsServer() as server:
        stack = start_stack(server, redis_server)
        try:
            before = await asyncio.to_thread(greedy, stack)
            nc = await nats.connect(server.url)
            inbox: asyncio.Future[str] = asyncio.get_running_loop().create_future()

            async def found(msg: object) -> None:
                if not inbox.done():
                    inbox.set_result(msg.subject)  # type: ignore[attr-defined]

            await nc.subscribe(p.Subjects.all_tokens, cb=found)
            await asyncio.to_thread(greedy, stack)
            gateway_inbox = await asyncio.wait_for(inbox, 10)
            sampling = p.SamplingParams(max_tokens=4).model_dump()
            hostile = [
                b"", b"\xff\xfe garbage", b"{}", b"[1, 2]", b'{"v": 2, "request_id": "x"}', b"null",
                json.dumps({"v": 1, "request_id": "bad-ids", "prompt_token_ids": [-5, 10**12], "sampling": sampling,
                            "reply_to": gateway_inbox, "arrived_at": 0}).encode(),
                json.dumps({"v": 1, "request_id": "no-reply", "prompt_token_ids": [1, 2], "sampling": sampling,
                            "reply_to": "", "arrived_at": 0}).encode(),
                json.dumps({"v": 1, "request_id": "x" * 100_000, "reason": 7}).encode(),
            ]
            subjects = [p.Subjects.submit("prefill", "prefill-0"), p.Subjects.submit("decode", "decode-0"),
                        p.Subjects.release("prefill-0"), p.Subjects.abort, p.Subjects.heartbeat, p.Subjects.bye,
                        gateway_inbox]
            for subject in subjects:
                for payload in hostile:
                    await nc.publish(subject, payload)
            await nc.flush()
            await nc.close()
            await asyncio.sleep(1.0)
            assert stack.dead_child() is None
            assert await asyncio.to_thread(greedy, stack) == before
            assert await asyncio.to_thread(wait_until, lambda: kv_in_use(stack.url) == 0.0, 10)  # nothing held
        finally:
            stack.stop()
