"""The online planner's policy replayed offline, and the service on a real nats-server."""

from __future__ import annotations

import asyncio
import json
import math
import time

import pytest
from nats.aio.client import Client as NATS

from services.planner.latency import reference_profiles
from services.planner.placement import Scored, best
from services.planner.policy import Observed, Policy, replay, should_replan, window_stats
from services.planner.service import PlannerService, Tracker
from services.planner.simulator import Parallel
from services.planner.specs import Cluster
from shared.protocol import PrefillRequest, SamplingParams, Subjects, TokenBatch, TokenEvent
from shared.workloads import SLO

SLO_ = SLO(0.25, 0.1)


def policy(**kw: object) -> Policy:
    model = reference_profiles()["opt-13b"]
    return Policy(model, Cluster(1, 8), SLO_, num_requests=200, **kw)  # type: ignore[arg-type]


def steady(start: float, seconds: float, rate: float, inp: int = 400, out: int = 100) -> list[Observed]:
    n = int(seconds * rate)
    return [Observed(start + i / rate, inp, out, ttft=0.1, tpot=0.05) for i in range(n)]


def test_window_stats_and_replan_triggers() -> None:
    reqs = steady(0, 60, 2.0) + [Observed(59.9, 400)]  # one just arrived (within its TTFT), max_tokens unknown
    s = window_stats(reqs, now=60, window=30, slo=SLO_)
    # (30, 60]: 59 finished arrivals at 30.5 ... 59.5 plus the running one
    assert s.rate == 60 / 30 and s.mean_output == 100 and s.attainment == 1.0 and len(s.inputs) == 59
    assert s.finished == 59 and s.backlog == 0 and s.demand == s.rate
    p = policy()
    assert should_replan(None, s, p) == "first plan"
    assert should_replan(s, s, p) is None
    busier = window_stats(steady(0, 60, 3.0), now=60, window=30, slo=SLO_)
    assert "demand" in (should_replan(s, busier, p) or "")
    same_rate_late = window_stats([Observed(30.1 + i / 2, 400, 100, ttft=1.0, tpot=0.05) for i in range(60)],
                                  60, 30, SLO_)
    assert "attainment" in (should_replan(s, same_rate_late, p) or "")  # same load, missed SLOs
    assert should_replan(None, window_stats(steady(0, 5, 1.0), 5, 5, SLO_), p) is None  # too few to plan


def test_replay_replans_when_the_load_triples() -> None:
    trace = steady(0, 120, 2.0) + steady(120, 120, 6.0)
    decisions = replay(trace, policy(), window=30, every=15)
    reasons = [r for _, r, _ in decisions]
    assert reasons[0] == "first plan" and any("demand" in r for r in reasons[1:])
    first, last = decisions[0][2], decisions[-1][2]
    assert last.rate > 2.5 * first.rate
    assert last.prefill.instances * last.prefill.config.gpus + last.decode.gpus > first.gpus or \
        last.goodput > 2.5 * first.rate  # more GPUs, or the first plan's deployment already had the headroom
    assert all(t >= 120 for t, r, _ in decisions[1:])  # nothing moved during the steady first half


def test_under_overload_the_window_plans_from_arrivals_and_counts_the_backlog() -> None:
    # Short requests finish; long ones (max_tokens 400) wait: half for their first token, past the TTFT.
    short = [Observed(31 + i, 100, 20, ttft=0.2, tpot=0.05, max_tokens=20) for i in range(20)]
    waiting = [Observed(31 + i, 1500, max_tokens=400) for i in range(0, 20, 2)]
    decoding = [Observed(32 + i, 1500, ttft=0.2, max_tokens=400) for i in range(0, 20, 2)]
    s = window_stats(short + waiting + decoding, now=60, window=30, slo=SLO_)
    assert s.finished == 20 and s.arrivals == 40 and len(s.inputs) == 40
    assert s.mean_output == (20 * 20 + 20 * 400) / 40  # not 20: the long ones count with their max_tokens
    assert s.mean_input == (20 * 100 + 20 * 1500) / 40
    assert s.backlog == 10 and s.demand == s.rate + 10 / 30


def test_a_replan_keeps_the_running_shape_while_it_is_nearly_as_good() -> None:
    tp1, tp4 = Parallel(1, 1), Parallel(4, 1)
    scored = [Scored(tp1, 2.0, 0), Scored(tp4, 9.0, 0)]
    # At 6 req/s: 3 x TP1 give 2.0 req/s per GPU, 1 x TP4 gives 1.5.
    assert best(scored, 6.0).config == tp1
    assert best(scored, 6.0, keep=tp4, margin=0.25).config == tp4  # 1.5 >= 0.75 x 2.0
    assert best(scored, 6.0, keep=tp4, margin=0.2).config == tp1
    assert best(scored, 6.0, keep=Parallel(2, 1), margin=0.9).config == tp1  # a shape not scored is not kept


def test_the_tracker_counts_a_request_whose_tokens_are_handled_before_its_arrival() -> None:
    """Each NATS subscription has its own task: a request's token events may be handled first."""
    tracker = Tracker(keep=60)
    tracker.event("early", False, 1, at=100.5)
    tracker.event("early", True, 11, at=101.5)
    tracker.arrived("early", 100.0, 300)
    tracker.event("half", False, 1, at=100.4)  # first token before arrival, the rest after it
    tracker.arrived("half", 100.2, 200)
    tracker.event("half", True, 3, at=100.6)
    tracker.event("orphan", False, 1, at=100.0)  # arrived before the tracker listened: ages out
    assert tracker.requests(now=102) == [Observed(100.0, 300, 11, ttft=0.5, tpot=0.1),
                                         Observed(100.2, 200, 3, ttft=pytest.approx(0.2), tpot=pytest.approx(0.1))]
    assert "orphan" in tracker.early
    tracker.requests(now=161)
    assert not tracker.early


def test_the_tracker_reports_unfinished_requests_with_their_max_tokens_and_first_token() -> None:
    tracker = Tracker(keep=60)
    tracker.arrived("waiting", 100.0, 300, max_tokens=50)
    tracker.arrived("decoding", 100.0, 200, max_tokens=80)
    tracker.event("decoding", False, 1, at=100.3)
    waiting, decoding = tracker.requests(now=101)
    assert waiting.max_tokens == 50 and math.isnan(waiting.ttft) and waiting.output_tokens == 0
    assert decoding.max_tokens == 80 and decoding.ttft == pytest.approx(0.3)
    stats = window_stats([waiting, decoding], now=101, window=10, slo=SLO_)
    assert stats.backlog == 1 and stats.outputs == (50, 80)


async def test_service_publishes_a_plan_from_live_traffic(nats_client: NATS, nats_server: object) -> None:
    service = PlannerService(policy(min_finished=10), nats_server.url, window=60, interval=0.2)  # type: ignore[attr-defined]
    plans: asyncio.Queue[dict[str, object]] = asyncio.Queue()

    async def got(msg: object) -> None:
        await plans.put(json.loads(msg.data))  # type: ignore[attr-defined]

    await nats_client.subscribe(Subjects.plan, cb=got)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    await asyncio.wait_for(service.ready.wait(), timeout=60)  # traffic sent earlier would go unseen
    now = time.time()
    for i in range(12):
        rid = f"r{i}"
        req = PrefillRequest(request_id=rid, prompt_token_ids=[1] * 300, sampling=SamplingParams(max_tokens=50),
                             reply_to=Subjects.tokens("g"), arrived_at=now - 5 + i * 0.1)
        await nats_client.publish(Subjects.submit("prefill", "p0"), req.encode())
        await nats_client.publish(Subjects.tokens("g"), TokenBatch(instance_id="p0", events=[
            TokenEvent(request_id=rid, token_id=1, num_prompt_tokens=300, num_output_tokens=1)]).encode())
        await nats_client.publish(Subjects.tokens("g"), TokenBatch(instance_id="d0", events=[
            TokenEvent(request_id=rid, token_id=2, finished=True, num_prompt_tokens=300,
                       num_output_tokens=50)]).encode())
    await nats_client.flush()
    plan = await asyncio.wait_for(plans.get(), timeout=60)
    stop.set()
    await task
    assert plan["reason"] == "first plan" and plan["model"] == "opt-13b"
    assert plan["prefill"]["instances"] >= 1 and plan["decode"]["instances"] >= 1  # type: ignore[index]
    assert service.tracker.done and service.tracker.done[0].input_tokens == 300
