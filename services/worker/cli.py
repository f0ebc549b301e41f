"""`distserve prefill|decode|colocated`: run one worker process (what `distserve up` starts)."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import uuid

import uvloop

from services.worker.base import Worker
from shared.config import COMMON_FLAGS, ENGINE_FLAGS, add_config_flag, add_flags, check_instance_id, settings_from_args


def add_worker_command(subparsers: argparse._SubParsersAction, worker: type[Worker], help_text: str,
                       chunked_prefill: bool = False) -> None:
    """`distserve <role>`: one worker process of `worker`'s role (each role module registers its own)."""
    role = worker.role
    parser = subparsers.add_parser(role, help=help_text)
    add_config_flag(parser)
    add_flags(parser, COMMON_FLAGS)
    add_flags(parser, ENGINE_FLAGS, prefix=f"{role}.")
    if chunked_prefill:
        parser.add_argument("--chunked-prefill", dest=f"cfg:{role}.chunked_prefill", action="store_true",
                            default=None, help="Sarathi-style chunked prefill mixed with decodes")
    parser.add_argument("--instance-id", default=None, help="unique worker name (default: role-random)")
    parser.add_argument("--log-level", default=os.environ.get("DISTSERVE_LOG_LEVEL", "INFO"))
    parser.set_defaults(func=functools.partial(run, worker=worker))


def run(args: argparse.Namespace, worker: type[Worker]) -> int:
    instance_id = check_instance_id(args.instance_id or f"{worker.role}-{uuid.uuid4().hex[:8]}")
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s {instance_id} %(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(args)
    # uvloop (as the gateway runs under uvicorn): cheaper loop iterations and cross-thread wake-ups
    # (the engine thread hands every step back with call_soon_threadsafe) on the token path.
    return uvloop.run(_serve(worker(settings, instance_id)))


async def _serve(worker: Worker) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, worker.stop)
    return await worker.run()
