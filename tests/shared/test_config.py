"""Settings: flags over environment over file over defaults; bad values are refused."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.config import (
    COMMON_FLAGS,
    ENGINE_FLAGS,
    add_config_flag,
    add_flags,
    load_settings,
    settings_from_args,
)


def test_sources_layer_flags_over_env_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "stack.yaml"
    file.write_text("model: from-file\ngateway:\n  port: 9000\n  max_pending: 7\n"
                    "prefill:\n  max_num_seqs: 3\n")
    monkeypatch.setenv("DISTSERVE_GATEWAY__PORT", "9100")
    monkeypatch.setenv("DISTSERVE_MODEL", "from-env")
    settings = load_settings({"model": "from-flag"}, file)
    assert settings.model == "from-flag"
    assert settings.gateway.port == 9100  # env beats file
    assert settings.gateway.max_pending == 7  # file beats default, merged with env's sibling key
    assert settings.prefill.max_num_seqs == 3


def test_invalid_values_name_the_field() -> None:
    with pytest.raises(ValidationError, match="gateway.port"):
        load_settings({"gateway": {"port": 70000}})
    with pytest.raises(ValidationError, match="nats_url"):
        load_settings({"nats_url": "http://x"})
    with pytest.raises(ValidationError, match="chunked_prefill"):
        load_settings({"prefill": {"chunked_prefill": True}})
    with pytest.raises(ValidationError, match="unknown"):
        load_settings({"unknown": 1})
    with pytest.raises(ValidationError, match="weights=native"):
        load_settings({"decode": {"dtype": "bfloat16", "weights": "fp16"}})  # fp16 weights run float32
    with pytest.raises(ValidationError, match="weights"):
        load_settings({"decode": {"weights": "fp8"}})
    assert load_settings({"decode": {"dtype": "bfloat16", "weights": "native"}}).decode.weights == "native"
    for nice in (-1, 20):  # only ever lowers priority, within Linux's range
        with pytest.raises(ValidationError, match="prefill.nice"):
            load_settings({"prefill": {"nice": nice}})
    with pytest.raises(ValidationError, match="decode workers only"):
        load_settings({"prefill": {"step_interval_s": 0.05}})
    assert load_settings({"decode": {"step_interval_s": 0.05}}).decode.step_interval_s == 0.05


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValidationError):
        settings.model = "x"  # type: ignore[misc]


def test_command_line_flags_map_to_nested_settings(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_config_flag(parser)
    add_flags(parser, COMMON_FLAGS)
    add_flags(parser, ENGINE_FLAGS, prefix="decode.")
    file = tmp_path / "stack.json"
    file.write_text('{"decode": {"max_num_seqs": 5}}')
    args = parser.parse_args(["--config", str(file), "--redis-url", "redis://127.0.0.1:1/0",
                              "--threads", "2"])
    settings = settings_from_args(args)
    assert settings.redis_url == "redis://127.0.0.1:1/0"
    assert settings.decode.num_threads == 2 and settings.decode.max_num_seqs == 5
    assert settings.nats_url is None
