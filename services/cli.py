"""The `distserve` command line: one entry point, one subcommand per job.

Each area of the project owns its subcommands in its own module, which exposes
``register(subparsers)``; this file only lists those modules. ``bench`` is a group
whose children register themselves the same way.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that add top-level subcommands (each has `register(subparsers)`).
COMMAND_MODULES: list[str] = [
    "shared.engine.cli",
    "services.planner.cli",
    "services.planner.service",
    "services.launcher",
    "services.gateway.cli",
    "services.prefill.worker",
    "services.decode.worker",
    "services.colocated.worker",
    "services.requests_cli",
]

# Modules that add `distserve bench <name>` subcommands.
BENCH_MODULES: list[str] = [
    "services.bench.engine",
    "services.bench.serve",
    "services.bench.overhead",
    "services.bench.compare",
    "services.bench.transfer",
    "services.bench.chaos",
    "services.bench.scale",
    "services.bench.autoscale",
]


def build_parser(with_bench: bool = True) -> argparse.ArgumentParser:
    """The whole command line; `with_bench=False` leaves the benchmarks' subcommands out (they import
    torch, which the other commands, the emulated engine's workers among them, never load)."""
    parser = argparse.ArgumentParser(prog="distserve", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    bench = subparsers.add_parser("bench", help="benchmarks that print measured numbers")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    if with_bench:
        for name in BENCH_MODULES:
            importlib.import_module(name).register(bench_sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(with_bench="bench" in words[:1]).parse_args(words)
    try:
        result = args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: what a command started is stopped on the way out (its finally blocks)
        print("distserve: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
