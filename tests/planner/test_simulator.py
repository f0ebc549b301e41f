"""The simulator against closed forms: one request alone, an M/D/1 prefill queue, memory limits, seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.planner.latency import LatencyModel
from services.planner.simulator import Colocated, Disaggregated, Limits, Parallel, simulate
from services.planner.workload import Trace, make_trace, synthetic_lengths
from tests.planner.conftest import toy_model


def one_request(inp: int, out: int) -> Trace:
    return Trace(np.array([1.0]), np.array([inp]), np.array([out]))


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 3)])
def test_one_request_matches_the_latency_model(toy: LatencyModel, tp: int, pp: int) -> None:
    inp, out = 300, 12
    d = Disaggregated(Parallel(tp, pp), 1, Parallel(tp, pp), 1)
    r = simulate(d, toy, one_request(inp, out))
    step = toy.step(tp)
    assert r.ttft[0] == pytest.approx(step.prefill_time(inp, inp * inp))  # pp stages of T/pp, back to back
    # decode rounds: context inp+1, inp+2, ... for out-1 rounds, one sequence (pp does not help a batch of 1)
    rounds = [step.decode_time(1, inp + 1 + j) for j in range(out - 1)]
    assert r.tpot[0] == pytest.approx(sum(rounds) / (out - 1))


def test_kv_transfer_time_adds_to_tpot(toy: LatencyModel) -> None:
    inp, out, bw = 300, 11, 1e6  # 1000 bytes/token: 301 tokens take 0.301 s
    fast = simulate(Disaggregated(Parallel(1), 1, Parallel(1), 1), toy, one_request(inp, out))
    slow = simulate(Disaggregated(Parallel(1), 1, Parallel(1), 1, kv_bandwidth=bw), toy, one_request(inp, out))
    assert slow.tpot[0] - fast.tpot[0] == pytest.approx((inp + 1) * 1000 / bw / (out - 1))


def test_prefill_queue_is_md1(toy: LatencyModel) -> None:
    """One prompt per batch, fixed length, Poisson arrivals: mean TTFT = D + R*D^2 / (2*(1 - R*D))."""
    length = 400
    step = toy.step(1)
    service = step.prefill_time(length, length * length)  # D
    trace = make_trace(synthetic_lengths(length, 2), 40_000, seed=3)
    for load in (0.3, 0.6):
        rate = load / service
        r = simulate(Disaggregated(Parallel(1), 1, Parallel(1), 1), toy, trace.at_rate(rate),
                     limits=Limits(prefill_token_budget=length), mode="prefill")
        expected = service + rate * service**2 / (2 * (1 - rate * service))
        assert r.ttft.mean() == pytest.approx(expected, rel=0.04)


def test_decode_memory_limit_is_respected_by_preempting() -> None:
    model = toy_model(tps=(1,), capacity={(1, 1): 3000})
    trace = make_trace(synthetic_lengths(200, 300), 300, seed=1)
    r = simulate(Disaggregated(Parallel(1), 1, Parallel(1), 1), model, trace.at_rate(50.0))
    assert r.preemptions > 0  # the load needs more than 3000 tokens of KV
    assert all(peak <= cap for peak, cap in zip(r.peak_kv_tokens, r.kv_capacity, strict=True))
    assert not np.isnan(r.tpot).any()  # every request still finishes


def test_colocated_memory_limit_is_respected() -> None:
    model = toy_model(tps=(1,), capacity={(1, 1): 2500})
    trace = make_trace(synthetic_lengths(200, 300), 200, seed=2)
    r = simulate(Colocated(Parallel(1)), model, trace.at_rate(20.0))
    assert r.peak_kv_tokens[0] <= 2500 and r.preemptions > 0


def test_pooled_colocated_instances_count_the_prompt_they_are_prefilling(toy: LatencyModel) -> None:
    """A request arriving while one instance prefills goes to the idle one: a prompt being prefilled
    is outstanding work (it was once counted nowhere, and pooled instances queued behind each other)."""
    trace = Trace(np.array([0.0, 0.01]), np.array([1000, 1000]), np.array([1, 1]))
    r = simulate(Colocated(Parallel(1), 2), toy, trace)
    alone = toy.step(1).prefill_time(1000, 1000 * 1000)
    assert alone > 0.01 and r.ttft == pytest.approx([alone, alone])


def test_a_request_larger_than_memory_is_refused() -> None:
    model = toy_model(tps=(1,), capacity={(1, 1): 100})
    with pytest.raises(ValueError, match="KV memory holds 100 tokens"):
        simulate(Disaggregated(Parallel(1), 1, Parallel(1), 1), model, one_request(90, 20))


def test_deterministic_under_a_seed(toy: LatencyModel) -> None:
    lengths = synthetic_lengths(100, 50)
    a, b = make_trace(lengths, 500, seed=7), make_trace(lengths, 500, seed=7)
    assert np.array_equal(a.arrivals, b.arrivals)
    assert not np.array_equal(a.arrivals, make_trace(lengths, 500, seed=8).arrivals)
    d = Disaggregated(Parallel(1), 2, Parallel(2), 1)
    r1, r2 = simulate(d, toy, a.at_rate(10)), simulate(d, toy, b.at_rate(10))
    assert np.array_equal(r1.ttft, r2.ttft) and np.array_equal(r1.tpot, r2.tpot)
    assert math.isfinite(r1.ttft.mean())
