"""`distserve plan`: runs on the reference profiles, prints JSON/YAML/tables, refuses bad input with status 2."""

from __future__ import annotations

import json

import pytest
import yaml

from services.cli import main

BASE = ["plan", "--model", "opt-13b", "--nodes", "1", "--gpus-per-node", "8", "--workload", "fixed:512:64",
        "--ttft", "0.25", "--tpot", "0.1", "--rate", "4", "--num-requests", "200"]


def test_plan_json_reference(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*BASE, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"] == "opt-13b" and plan["profile"] == "reference:distserve"
    for phase in ("prefill", "decode"):
        assert plan[phase]["tp"] in (1, 2, 4) and plan[phase]["instances"] >= 1
    assert plan["gpus"] == plan["prefill"]["gpus"] + plan["decode"]["gpus"]
    assert plan["attainment"] >= 0.9 and plan["fits_cluster"]
    assert plan["baseline"]["kind"] == "colocated" and plan["speedup_per_gpu"] > 0
    assert plan["baseline"]["deployed_goodput"] > 0 and plan["speedup_per_gpu_deployed"] > 0


def test_plan_yaml_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*BASE, "--yaml", "--algorithm", "1"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["algorithm"] == 1
    assert main([*BASE, "--profile", "roofline", "--gpu", "h100"]) == 0
    assert "end to end" in capsys.readouterr().out


@pytest.mark.parametrize("change,message", [
    (["--model", "opt-7000b"], "opt-7000b"),
    (["--gpu", "tpu"], "unknown GPU"),
    (["--gpu", "h100"], "roofline"),  # reference profiles are A100 only
    (["--workload", "fixed:0:5"], "fixed workload"),
    (["--profile", "/nonexistent.json"], "cannot read profile"),
    (["--workload", "chatbot", "--tokenizer", "/nonexistent"], "tokenizer model not found: '/nonexistent'"),
    (["--prefill", "2x1"], "--prefill and --decode go together"),
])
def test_bad_input_is_a_clear_error(change: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*BASE, *change]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--rate", "0"), ("--nodes", "-1"), ("--ttft", "abc"),
                                        ("--attainment", "1.5")])
def test_non_positive_numbers_exit_2(flag: str, value: str) -> None:
    with pytest.raises(SystemExit) as e:
        main([*BASE, flag, value])
    assert e.value.code == 2


def test_a_held_placement_is_sized_not_searched(capsys: pytest.CaptureFixture[str]) -> None:
    for prefill, decode in (("4x1", "1x2"), ("1x1", "2x1")):  # neither is what the search picks here
        assert main([*BASE, "--prefill", prefill, "--decode", decode, "--json"]) == 0
        plan = json.loads(capsys.readouterr().out)
        assert [f"{plan[p]['tp']}x{plan[p]['pp']}" for p in ("prefill", "decode")] == [prefill, decode]
        assert plan["attainment"] >= 0.9
    assert main([*BASE, "--prefill", "16x1", "--decode", "1x1"]) == 1  # more GPUs than a node has
    assert "is not a placement here" in capsys.readouterr().err
