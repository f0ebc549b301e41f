"""`distserve gateway`: run the OpenAI-compatible HTTP gateway (what `distserve up` starts)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

import uvicorn

from shared.config import COMMON_FLAGS, GATEWAY_FLAGS, add_config_flag, add_flags, settings_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("gateway", help="run the OpenAI-compatible gateway")
    add_config_flag(parser)
    add_flags(parser, COMMON_FLAGS)
    add_flags(parser, GATEWAY_FLAGS)
    parser.add_argument("--log-level", default=os.environ.get("DISTSERVE_LOG_LEVEL", "INFO"))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s gateway %(levelname)s %(name)s: %(message)s")
    from services.gateway.app import create_app  # after logging is set up: loading the tokenizer logs

    try:
        settings = settings_from_args(args)
        app = create_app(settings)
    except (ValueError, OSError) as exc:  # bad settings, an unreadable API key file
        print(f"distserve gateway: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=settings.gateway.host, port=settings.gateway.port, log_level="warning",
                access_log=False, timeout_graceful_shutdown=5)
    return 0
