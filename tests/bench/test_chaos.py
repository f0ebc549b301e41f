"""`distserve bench chaos`: its seeded load repeats exactly (the baseline and every fault run send the same
requests at the same times), and its command line takes only known faults. The runs themselves start a
whole supervised stack and kill its parts: docs/reliability.md has their results."""

from __future__ import annotations

import pytest

from services.bench.chaos import FAULTS, seeded_load
from services.bench.metrics import percentile
from services.cli import build_parser


def test_the_load_is_the_same_for_the_same_seed() -> None:
    a, b, c = (seeded_load(20, 4.0, 16, seed, 60.0) for seed in (1, 1, 2))
    assert a == b and a != c
    assert a.offsets[0] == 0.0 and a.offsets == sorted(a.offsets)
    assert 2.0 < a.offsets[-1] < 10.0  # 19 gaps of 1/4 s on average


def test_percentiles_and_fault_names() -> None:
    assert percentile([], 50) is None  # the benchmarks' one percentile, which chaos reports with
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([3.0, 1.0, 2.0], 99) == pytest.approx(2.98)
    args = build_parser().parse_args(["bench", "chaos", "--faults", "decode-kill,redis-restart"])
    assert args.faults == ("decode-kill", "redis-restart") and set(args.faults) <= set(FAULTS)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "chaos", "--faults", "meteor"])
