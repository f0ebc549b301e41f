"""The actuator's decisions: a scale-up at once, a scale-down only after the lower plan has held, never
within the cool-down of the last action, and workers of another shape replaced."""

from __future__ import annotations

from services.planner.actuator import Action, Actuator, Running
from shared.protocol import PhaseShape, PlanMessage


def plan(prefill: int, decode: int, decode_tp: int = 1) -> PlanMessage:
    return PlanMessage(model="opt-13b", hardware="a100", rate=4, gpus=prefill + decode * decode_tp,
                       prefill=PhaseShape(tp=1, pp=1, instances=prefill, gpus=prefill),
                       decode=PhaseShape(tp=decode_tp, pp=1, instances=decode, gpus=decode * decode_tp),
                       goodput_per_gpu=1.0, reason="test", observed_rate=4, at=0)


def workers(prefill: int, decode: int) -> list[Running]:
    return ([Running(f"prefill-{i}", "prefill", 1, 1) for i in range(prefill)]
            + [Running(f"decode-{i}", "decode", 1, 1) for i in range(decode)])


def kinds(actions: list[Action]) -> list[tuple[str, str, str | None]]:
    return [(a.kind, a.role, a.instance) for a in actions]


def test_it_scales_up_at_once_and_not_again_within_the_cooldown() -> None:
    actuator = Actuator(cooldown_s=10, scale_down_after_s=30)
    assert actuator.decide(workers(1, 1), now=0) == []  # no plan yet
    actuator.plan = plan(2, 3)
    assert kinds(actuator.decide(workers(1, 1), now=0)) == [("start", "prefill", None), ("start", "decode", None),
                                                           ("start", "decode", None)]
    assert actuator.decide(workers(1, 1), now=5) == []  # cooling down (the starts are not registered yet)
    assert actuator.decide(workers(2, 3), now=20) == []  # as planned


def test_it_drains_the_newest_surplus_only_after_the_lower_plan_held() -> None:
    actuator = Actuator(cooldown_s=10, scale_down_after_s=30)
    actuator.plan = plan(1, 1)
    assert actuator.decide(workers(1, 3), now=0) == []  # lower since 0
    assert actuator.decide(workers(1, 3), now=29) == []
    actuator.plan = plan(1, 3)  # the load came back: the clock restarts
    assert actuator.decide(workers(1, 3), now=35) == []
    actuator.plan = plan(1, 1)
    assert actuator.decide(workers(1, 3), now=40) == []
    drained = actuator.decide(workers(1, 3), now=70)
    assert kinds(drained) == [("drain", "decode", "decode-1"), ("drain", "decode", "decode-2")]
    assert all("1 x TP1xPP1" in a.reason for a in drained)


def test_workers_of_another_shape_are_replaced() -> None:
    actuator = Actuator(cooldown_s=0, scale_down_after_s=0)
    actuator.plan = plan(1, 1, decode_tp=2)
    assert kinds(actuator.decide(workers(1, 2), now=0)) == [("start", "decode", None)]
    running = [*workers(1, 2), Running("decode-2", "decode", 2, 1)]
    assert kinds(actuator.decide(running, now=1)) == [("drain", "decode", "decode-0"), ("drain", "decode", "decode-1")]
