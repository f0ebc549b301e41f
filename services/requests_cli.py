"""`distserve requests list|show ID`: request timelines from the state the services keep in Redis."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from redis.exceptions import RedisError

from services.launcher import stack_file
from shared.state import connect_redis, format_request, read_request, recent_requests


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("requests", help="show request timelines (from Redis)")
    parser.add_argument("--redis-url", default=None, help="default: the running `distserve up` stack's")
    sub = parser.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="one request's phases and timings")
    show.add_argument("request_id")
    listing = sub.add_parser("list", help="the most recent requests")
    listing.add_argument("-n", type=int, default=20)
    parser.set_defaults(func=run)


def redis_url(given: str | None) -> str:
    if given:
        return given
    try:
        return str(json.loads(stack_file().read_text())["redis_url"])
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError("no running `distserve up` stack found; pass --redis-url") from exc


async def _run(args: argparse.Namespace) -> int:
    client = connect_redis(redis_url(args.redis_url))
    try:
        if args.action == "show":
            state = await read_request(client, args.request_id)
            if state is None:
                print(f"no request {args.request_id!r} (unknown, or its state expired)", file=sys.stderr)
                return 1
            print(format_request(args.request_id, state))
        else:
            for request_id in await recent_requests(client, args.n):
                state = await read_request(client, request_id) or {}
                print(f"{request_id}  {state.get('status', '?'):<9} prompt={state.get('prompt_tokens', '?'):>5} "
                      f"output={state.get('output_tokens', '?'):>5}")
        return 0
    finally:
        await client.aclose()


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except (ValueError, RedisError, OSError) as exc:
        print(f"distserve requests: {exc}", file=sys.stderr)
        return 2
