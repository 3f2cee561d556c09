"""``python -m shipyard.server [--host H] [--port P] [--auth | --no-auth] [--no-access-log]``
(``shipyard server``).

Exits with status 2 and a one-line reason when the server may not start (a non-loopback bind
without auth, bad settings); the default is ``127.0.0.1:8340`` and ``SHIPYARD_AUTH`` for auth.
"""

from __future__ import annotations

import argparse
import logging
import sys

from shipyard.errors import ShipyardError
from shipyard.server.app import DEFAULT_HOST, DEFAULT_PORT, serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="shipyard server", description="Serve the shipyard REST API, /metrics and web page."
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)"
    )
    parser.add_argument(
        "--auth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="require API tokens (default: SHIPYARD_AUTH); needed for a non-loopback --host",
    )
    parser.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a line per request (default: on; off saves about a fifth of a gateway request)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per replica probe
    try:
        serve(host=args.host, port=args.port, auth=args.auth, access_log=args.access_log)
    except ShipyardError as exc:
        print(f"shipyard server: error: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
