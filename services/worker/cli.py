"""`distserve prefill|decode|colocated`: run one worker process (what `distserve up` starts)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import uuid

import uvloop

from services.worker.base import Worker
from shared.config import COMMON_FLAGS, ENGINE_FLAGS, add_config_flag, add_flags, check_instance_id, settings_from_args


def _worker_class(role: str) -> type[Worker]:
    if role == "prefill":
        from services.prefill.worker import PrefillWorker
        return PrefillWorker
    if role == "decode":
        from services.decode.worker import DecodeWorker
        return DecodeWorker
    from services.colocated.worker import ColocatedWorker
    return ColocatedWorker


def register(subparsers: argparse._SubParsersAction) -> None:
    helps = {"prefill": "run a prefill worker", "decode": "run a decode worker",
             "colocated": "run a colocated (prefill + decode) worker: the baseline"}
    for role, help_text in helps.items():
        parser = subparsers.add_parser(role, help=help_text)
        add_config_flag(parser)
        add_flags(parser, COMMON_FLAGS)
        add_flags(parser, ENGINE_FLAGS, prefix=f"{role}.")
        if role == "colocated":
            parser.add_argument("--chunked-prefill", dest="cfg:colocated.chunked_prefill", action="store_true",
                                default=None, help="Sarathi-style chunked prefill mixed with decodes")
        parser.add_argument("--instance-id", default=None, help="unique worker name (default: role-random)")
        parser.add_argument("--log-level", default=os.environ.get("DISTSERVE_LOG_LEVEL", "INFO"))
        parser.set_defaults(func=run, role=role)


def run(args: argparse.Namespace) -> int:
    instance_id = check_instance_id(args.instance_id or f"{args.role}-{uuid.uuid4().hex[:8]}")
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s {instance_id} %(levelname)s %(name)s: %(message)s")
    settings = settings_from_args(args)
    worker = _worker_class(args.role)(settings, instance_id)
    # uvloop (as the gateway runs under uvicorn): cheaper loop iterations and cross-thread wake-ups
    # (the engine thread hands every step back with call_soon_threadsafe) on the token path.
    return uvloop.run(_serve(worker))


async def _serve(worker: Worker) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, worker.stop)
    return await worker.run()
