"""The one dispatch policy of the gateway and the simulator: the least-loaded instance of each role."""

from __future__ import annotations

from shared.dispatch_policy import Load, least_loaded, score


def pick(role: str, *loads: Load) -> int:
    chosen = least_loaded(role, list(range(len(loads))), lambda i: loads[i])  # type: ignore[arg-type]
    assert chosen is not None
    return chosen


def test_prefill_goes_where_the_fewest_prompt_tokens_wait() -> None:
    assert pick("prefill", Load(queued_tokens=900, waiting=1), Load(queued_tokens=300, waiting=3)) == 1
    assert pick("prefill", Load(queued_tokens=300, waiting=3), Load(queued_tokens=300, waiting=2)) == 1


def test_decode_goes_where_the_fewest_sequences_run_or_wait_then_the_most_memory() -> None:
    assert pick("decode", Load(running=10, waiting=2), Load(running=11)) == 1
    assert pick("decode", Load(running=4, free_blocks=10), Load(running=4, free_blocks=90)) == 1


def test_colocated_keeps_a_new_prompt_away_from_an_instance_in_mid_prefill() -> None:
    busy = Load(queued_tokens=1500, waiting=1, running=3)  # a long prompt in progress, few decodes
    idle_prefill = Load(running=8)  # more decodes, but a new prompt starts at once (prefill first)
    assert pick("colocated", busy, idle_prefill) == 1
    assert score("colocated", idle_prefill) == (0, 8)


def test_ties_go_to_the_first_and_an_empty_pool_to_nobody() -> None:
    assert pick("prefill", Load(), Load()) == 0
    assert least_loaded("decode", [], lambda i: Load()) is None
