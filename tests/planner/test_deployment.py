"""A plan as settings: what `up --plan` and `bench compare --plan` start."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services.cli import build_parser, main
from services.launcher import up_settings
from services.planner.deployment import PlannedDeployment
from shared.config import load_settings
from tests.planner.test_cli import BASE


def test_a_plan_printed_by_plan_yaml_deploys_on_emulated_gpus(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*BASE, "--yaml"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(printed))
    plan = PlannedDeployment.load(tmp_path / "plan.yaml")
    settings = load_settings(plan.overrides())
    assert settings.engine == "emulated" and settings.model == "opt-13b"
    assert settings.emulation.gpu == "a100" and settings.emulation.profile == "reference"
    assert settings.emulation.link_gbps == printed["kv_bandwidth_gbps"]
    assert (settings.prefill_instances, settings.prefill.tp, settings.prefill.pp) == \
        (printed["prefill"]["instances"], printed["prefill"]["tp"], printed["prefill"]["pp"])
    assert (settings.decode_instances, settings.decode.tp, settings.decode.pp) == \
        (printed["decode"]["instances"], printed["decode"]["tp"], printed["decode"]["pp"])
    assert plan.gpus == printed["gpus"]
    baseline = load_settings(plan.overrides(baseline=True))
    assert baseline.mode == "colocated" and baseline.colocated_instances == printed["baseline"]["instances"]
    assert baseline.colocated.tp == printed["baseline"]["tp"]


def test_flags_override_the_plan_and_bad_plans_are_refused(tmp_path: Path) -> None:
    plan = {"model": "opt-13b", "hardware": "a100-80g", "profile": "reference:distserve", "rate": 4,
            "prefill": {"tp": 1, "pp": 3, "instances": 1}, "decode": {"tp": 2, "pp": 1, "instances": 2},
            "kv_bandwidth_gbps": 2400}
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    parse = build_parser(with_bench=False).parse_args
    settings, _ = up_settings(parse(["up", "--plan", str(path), "--decode", "1"]))
    assert (settings.prefill.pp, settings.decode.tp, settings.decode_instances) == (3, 2, 1)
    with pytest.raises(ValueError, match="no colocated baseline"):
        up_settings(parse(["up", "--plan", str(path), "--baseline"]))
    with pytest.raises(ValueError, match="give --plan"):
        up_settings(parse(["up", "--baseline"]))
    path.write_text(yaml.safe_dump({**plan, "profile": "measured:default"}))
    with pytest.raises(ValueError, match="emulated engine"):  # the torch engine runs one pipeline stage
        up_settings(parse(["up", "--plan", str(path)]))
    path.write_text(yaml.safe_dump({**plan, "profile": "measured:default", "prefill": {"tp": 2, "instances": 1}}))
    settings, _ = up_settings(parse(["up", "--plan", str(path)]))  # tensor parallelism: the torch engine's ranks
    assert (settings.engine, settings.prefill.tp, settings.decode.tp) == ("torch", 2, 2)
    path.write_text(yaml.safe_dump({**plan, "baseline": {"tp": 2, "instances": 0}}))  # no baseline meets the SLO
    with pytest.raises(ValueError, match="at no rate"):
        up_settings(parse(["up", "--plan", str(path), "--baseline"]))
    assert PlannedDeployment.load(path).colocated(same_gpus=True).instances == 3  # 7 GPUs: three TP2 instances
    path.write_text(yaml.safe_dump({**plan, "decode": {"tp": 0, "instances": 1}}))
    with pytest.raises(ValueError, match="decode.tp"):
        PlannedDeployment.load(path)
    path.write_text("[not, a, plan")
    with pytest.raises(ValueError, match="plan"):
        PlannedDeployment.load(path)
