"""The `editstack` command line.

    editstack ping ENDPOINT [--json] [--timeout S]

Exit status: 0 success (for ping: the service is ready), 1 the service is up but not ready,
3 the service is unreachable or refused the request. Container healthchecks call `ping`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import msgspec

from editstack.errors import EditstackError
from editstack.transport import Client

EXIT_OK, EXIT_NOT_READY, EXIT_UNAVAILABLE = 0, 1, 3


def _ping(args: argparse.Namespace) -> int:
    with _client(args.endpoint, args.timeout, retries=0) as client:
        try:
            status = client.ping()
        except EditstackError as exc:
            print(json.dumps({"endpoint": args.endpoint, "error": str(exc)}) if args.json else str(exc),
                  file=sys.stdout if args.json else sys.stderr)
            return EXIT_UNAVAILABLE
    if args.json:
        print(json.dumps(msgspec.to_builtins(status)))
    else:
        versions = " ".join(f"{k}={v}" for k, v in status.versions.items())
        print(f"{status.service} {status.state}: {status.model}@{status.revision or '-'} on {status.device} "
              f"({status.workers} worker(s)) {versions}".rstrip())
    return EXIT_OK if status.state == "ready" else EXIT_NOT_READY


def _client(endpoint: str, timeout_s: float, retries: int) -> Client:
    try:
        return Client(endpoint, timeout_s=timeout_s, retries=retries)
    except ValueError as exc:
        raise SystemExit(f"editstack: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="editstack", description="Benchmark image editors with a VLM judge.")
    commands = parser.add_subparsers(dest="command", required=True)
    ping = commands.add_parser("ping", help="print a service's state; exit 0 only when it is ready")
    ping.add_argument("endpoint", help="ipc:///path/to.sock or tcp://host:port")
    ping.add_argument("--json", action="store_true", help="print the full status as JSON")
    ping.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    ping.set_defaults(func=_ping)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
