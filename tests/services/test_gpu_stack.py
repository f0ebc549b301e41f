"""A stack on a GPU (deploy/gpu/check.sh runs it where one is lent): prefill and decode workers with
device=cuda, the KV host-staged through the transport, answering as one GPU engine in this process does.
Skipped without a GPU; the model is $DISTSERVE_GPU_TEST_MODEL (tests/engine/test_device.py says why)."""

from __future__ import annotations

import openai
import pytest
import torch

from shared.engine import EngineConfig, LLMEngine, SamplingParams
from shared.servers import NatsServer, RedisServer
from tests.engine.test_device import GPU_TEST_MODEL
from tests.services.conftest import start_stack

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none here)")
ENGINE = {"kv_cache_memory_gib": 0.5, "device": "cuda", "dtype": "float32", "weights": "native"}
PROMPTS = ["The three primary colors are", "def fibonacci(n):"]


def test_a_gpu_stack_answers_as_a_gpu_engine_does(redis_server: RedisServer) -> None:
    engine = LLMEngine(EngineConfig(model=GPU_TEST_MODEL, **ENGINE))  # type: ignore[arg-type]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    expected = []
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), engine.tokenizer.encode(prompt), params)
        text = ""
        while engine.has_unfinished():
            text += "".join(out.text for out in engine.step())
        expected.append(text)
    del engine
    with NatsServer() as nats:
        stack = start_stack(nats, redis_server, model=GPU_TEST_MODEL, prefill=ENGINE, decode=ENGINE)
        try:
            api = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0, timeout=120)
            model = api.models.list().data[0].id
            for prompt, want in zip(PROMPTS, expected, strict=True):
                got = api.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0,
                                             extra_body={"ignore_eos": True})
                assert got.choices[0].text == want
        finally:
            stack.stop()
