"""The load generator against a real streaming server on loopback with known delays.

Delays are chosen so every SLO verdict has a margin of at least 75 ms against scheduling jitter,
while a wrong formula (TPOT over n instead of n - 1 tokens, TTFT at the role chunk, closed-loop
sending, dropped failures) moves a number far outside its bounds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from services.bench.arrivals import arrival_times
from services.bench.client import ClientConfig, discover_model, make_http_client
from services.bench.loadgen import CANCELLED, NOT_SENT, Run, run_load
from services.bench.metrics import RequestRecord, attainment, summarize
from services.bench.serve import SweepConfig, analyze, sweep
from shared.workloads import SLO, WorkloadRequest
from tests.bench.stub_server import StubServer, StubState


@pytest.fixture
def stub() -> Iterator[StubServer]:
    with StubServer(StubState()) as server:
        yield server


def requests(n: int, output_tokens: int, prompt: str = "hello there") -> list[WorkloadRequest]:
    return [WorkloadRequest(f"{prompt} {i}", 3, output_tokens) for i in range(n)]


async def run(server: StubServer, reqs: list[WorkloadRequest], arrivals: list[float], *,
              api: str = "completions", time_limit_s: float = 30.0, rate: float = 1.0) -> list[RequestRecord]:
    config = ClientConfig(base_url=server.url, model="stub-model", api=api)  # type: ignore[arg-type]
    async with make_http_client(config) as http:
        return await asyncio.wait_for(run_load(http, config, Run(rate, reqs, arrivals, time_limit_s)), 60)


@pytest.mark.parametrize("api", ["completions", "chat"])
async def test_ttft_tpot_and_e2e_follow_the_stream(stub: StubServer, api: str) -> None:
    # First token after 0.6 s, then 2 more 0.2 s apart: TTFT 0.6, e2e 1.0, TPOT (1.0 - 0.6) / 2 = 0.2.
    # Wrong formulas land far outside the bounds: (e2e - TTFT) / 3 = 0.133, e2e / 3 = 0.333.
    stub.state.prefill_s, stub.state.token_gap_s = 0.6, 0.2
    records = await run(stub, requests(4, output_tokens=3), [0.0] * 4, api=api)
    for r in records:
        assert r.ok and r.output_tokens == 3 and r.prompt_tokens == 3
        assert r.ttft is not None and 0.6 <= r.ttft < 0.75  # the chat role chunk (t=0) is not a token
        assert r.e2e is not None and 1.0 <= r.e2e < 1.15
        assert r.tpot is not None and 0.195 <= r.tpot < 0.26
    body = stub.state.bodies[0]
    assert body["stream"] is True and body["max_tokens"] == 3 and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True} and body["model"] == "stub-model"
    assert ("messages" in body) == (api == "chat")


async def test_output_tokens_are_counted_from_chunks_without_usage(stub: StubServer) -> None:
    stub.state.prefill_s, stub.state.token_gap_s, stub.state.send_usage = 0.0, 0.0, False
    records = await run(stub, requests(2, output_tokens=5), [0.0, 0.0])
    assert [r.output_tokens for r in records] == [5, 5] and all(r.prompt_tokens is None for r in records)


async def test_open_loop_sends_on_schedule_while_earlier_requests_run(stub: StubServer) -> None:
    stub.state.prefill_s, stub.state.token_gap_s = 0.8, 0.01
    records = await run(stub, requests(4, output_tokens=2), [0.0, 0.1, 0.2, 0.3])
    assert stub.state.max_in_flight == 4  # a closed-loop client would never exceed 1
    assert [r.scheduled_s for r in records] == [0.0, 0.1, 0.2, 0.3]
    assert all(r.ok for r in records)


async def test_queueing_gives_exact_attainment_and_goodput(stub: StubServer) -> None:
    # One FIFO prefill slot held 0.4 s per request. At 2 req/s (0.5 s apart) nobody waits: TTFT 0.4 s.
    # At 10 req/s (0.1 s apart) request i waits i * 0.3 s: TTFT 0.4, 0.7, 1.0, 1.3.
    # With a 0.85 s TTFT SLO exactly 2 of 4 attain; every verdict has >= 0.15 s of margin.
    stub.state.prefill_s, stub.state.token_gap_s, stub.state.serial_prefill = 0.4, 0.02, True
    slo = SLO(ttft_s=0.85, tpot_s=0.1, attainment_target=0.9)
    config = SweepConfig(rates=(2.0, 10.0), num_requests=4, arrival="constant", cooldown_s=0.0)
    client = ClientConfig(base_url=stub.url, model="stub-model")
    records = await asyncio.wait_for(sweep(client, requests(4, output_tokens=3), config, slo), 60)
    fast = [r.ttft for r in records[10.0]]
    assert [t is not None and t <= slo.ttft_s for t in fast] == [True, True, False, False]
    result = analyze("stub", records, slo)
    assert [(s.rate, s.attainment) for s in result.summaries] == [(2.0, 1.0), (10.0, 0.5)]
    assert result.goodput == 2.0
    assert result.goodput_interpolated == pytest.approx(2.0 + (1.0 - 0.9) / (1.0 - 0.5) * 8.0)
    assert result.scale_rate == 2.0
    # At 2 req/s every TTFT is ~0.4 s: the SLO scaled by 0.25 (0.21 s) fails them all, by 1.0 passes all.
    assert result.scales[0] == 0.25 and result.scale_attainment[0] == 0.0
    assert result.scales[12] == pytest.approx(1.0) and result.scale_attainment[12] == 1.0


async def test_goodput_search_bisects_between_passing_and_failing_rates(stub: StubServer) -> None:
    # Same 0.4 s slot. 1 req/s passes; 9 req/s (0.111 s apart) queues: TTFT 0.4, 0.69, 0.98 (2 of 3).
    # The search probes sqrt(1 * 9) = 3 req/s: TTFT 0.4, 0.47, 0.53, all well inside 0.85 s.
    stub.state.prefill_s, stub.state.token_gap_s, stub.state.serial_prefill = 0.4, 0.02, True
    slo = SLO(ttft_s=0.85, tpot_s=0.1, attainment_target=0.9)
    config = SweepConfig(rates=(1.0, 9.0), num_requests=3, arrival="constant", cooldown_s=0.0, search_steps=1)
    client = ClientConfig(base_url=stub.url, model="stub-model")
    records = await asyncio.wait_for(sweep(client, requests(3, output_tokens=2), config, slo), 60)
    assert sorted(records) == [1.0, pytest.approx(3.0), 9.0]
    result = analyze("stub", records, slo)
    assert [s.attainment for s in result.summaries] == [1.0, 1.0, 2 / 3]
    assert result.goodput == pytest.approx(3.0)


async def test_failures_count_as_misses(stub: StubServer) -> None:
    stub.state.prefill_s, stub.state.token_gap_s = 0.0, 0.0
    reqs = [WorkloadRequest("ok", 1, 3), WorkloadRequest("FAIL", 1, 3), WorkloadRequest("BREAK", 1, 3)]
    records = await run(stub, reqs, [0.0, 0.0, 0.0])
    assert records[0].ok and records[0].error is None
    assert records[1].error is not None and records[1].error.startswith("HTTP 500")
    assert records[2].error is not None and "broke mid-stream" in records[2].error
    slo = SLO(ttft_s=10, tpot_s=10)
    assert attainment(records, slo) == pytest.approx(1 / 3)
    summary = summarize(records, slo)
    assert (summary.completed, summary.errors) == (1, 2)


async def test_time_limit_stops_the_run_and_records_every_request(stub: StubServer) -> None:
    stub.state.prefill_s = 30.0
    records = await run(stub, requests(3, output_tokens=2), [0.0, 0.1, 5.0], time_limit_s=0.5)
    assert [r.error for r in records] == [CANCELLED, CANCELLED, NOT_SENT]
    assert records[0].sent_s is not None and records[2].sent_s is None
    assert attainment(records, SLO(ttft_s=100, tpot_s=100)) == 0.0


async def test_unreachable_server_is_an_error_not_a_hang() -> None:
    with StubServer(StubState()) as server:
        url = server.url
    config = ClientConfig(base_url=url, model="m", request_timeout_s=5)
    async with make_http_client(config) as http:
        records = await run_load(http, config, Run(1.0, requests(1, 2), [0.0], 10))
    assert records[0].error is not None and "Connect" in records[0].error
    with pytest.raises(ConnectionError, match="cannot reach"):
        await discover_model(url)


async def test_discover_model_reads_v1_models(stub: StubServer) -> None:
    assert await discover_model(stub.url) == "stub-model"
    assert await discover_model(stub.url + "/v1/") == "stub-model"


def test_poisson_schedule_feeds_the_run_unchanged() -> None:
    arrivals = arrival_times(5, 4.0, seed=1)
    assert Run(4.0, requests(5, 2), arrivals, 10).arrivals == arrivals
    with pytest.raises(ValueError, match="arrival times"):
        Run(4.0, requests(4, 2), arrivals, 10)
