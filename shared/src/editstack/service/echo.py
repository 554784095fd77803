"""A model-free service that edits by returning each source image unchanged.

It is the transport's reference peer for tests and `scripts/bench transport`: the real server loop,
limits and codec with no model behind them. Its knobs simulate a slow start (`--load-s`), a model
that cannot load (`--fail-load MESSAGE`) and slow requests (`--delay-s` for the first
`--delay-count` work requests).

    python -m editstack.service.echo ipc:///tmp/echo.sock [--load-s S] [--fail-load MESSAGE]
                                                           [--delay-s S --delay-count N]
    python -m editstack.service.echo tcp://127.0.0.1:PORT --curve-secret-key F --curve-clients DIR | --insecure-tcp
"""

from __future__ import annotations

import argparse
import threading
import time

from editstack.wire.codec import Blobs, Limits, read_image
from editstack.errors import ImageError
from editstack.wire.protocol import EditReply, EditRequest, EditResult, ErrorReply, ItemError, Reply, ScoreRequest, Status
from editstack.service.process import run_service
from editstack.wire.curve import ServerSecurity
from editstack.wire.transport import Server


class EchoWorker:
    """Returns every item's first source image as it came (same encoding, same bytes)."""

    def __init__(self, limits: Limits, delay_s: float = 0.0, delay_count: int = 0) -> None:
        self.limits = limits
        self._delay_s = delay_s
        self._delays_left = delay_count
        self._lock = threading.Lock()

    def handle(self, request: EditRequest | ScoreRequest, blobs: list[memoryview]) -> tuple[Reply, Blobs | None]:
        with self._lock:
            delay, self._delays_left = (self._delay_s, self._delays_left - 1) if self._delays_left > 0 else (0.0, 0)
        time.sleep(delay)
        if not isinstance(request, EditRequest):
            return ErrorReply("unsupported", "the echo service only answers edit requests"), None
        out = Blobs()
        results = []
        for item in request.items:
            first = item.images[0] if item.images else None
            try:
                if first is None:
                    raise ImageError("no image was sent")
                image = read_image(first, blobs, self.limits)
            except ImageError as exc:
                error = ItemError("bad_image", f"item {item.id!r} field 'images[0]': {exc}")
                results.append(EditResult(id=item.id, error=error))
                continue
            ref = out.add(blobs[first.frame] if first.encoding == "png" else image)
            results.append(EditResult(id=item.id, image=ref))
        return EditReply(items=results), out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m editstack.service.echo", description=__doc__.splitlines()[0])
    parser.add_argument("endpoint")
    parser.add_argument("--load-s", type=float, default=0.0, help="simulated model load time")
    parser.add_argument("--fail-load", metavar="MESSAGE", help="fail loading, with an OSError(MESSAGE) as the root cause")
    parser.add_argument("--delay-s", type=float, default=0.0, help="extra time for each delayed request")
    parser.add_argument("--delay-count", type=int, default=0, help="how many work requests are delayed")
    parser.add_argument("--max-message-bytes", type=int, default=Limits.max_message_bytes)
    parser.add_argument("--max-image-px", type=int, default=Limits.max_image_px)
    parser.add_argument("--max-batch", type=int, default=Limits.max_batch)
    parser.add_argument("--curve-secret-key", default="", help="tcp: the service's .key_secret file")
    parser.add_argument("--curve-clients", default="", help="tcp: the folder of client .key files admitted")
    parser.add_argument("--insecure-tcp", action="store_true", help="tcp without CURVE, on purpose")
    args = parser.parse_args()
    limits = Limits(args.max_message_bytes, args.max_image_px, args.max_batch)

    def status(server: Server) -> Status:
        state = "ready" if server.workers else "loading"
        return Status(service="echo", state=state, model="echo", backend="echo", devices=["cpu"], workers=server.workers)

    def load() -> EchoWorker:
        time.sleep(args.load_s)
        if args.fail_load:
            # wrapped, as model libraries wrap their causes: the service must name the root
            raise RuntimeError("the echo model failed to load") from OSError(args.fail_load)
        return EchoWorker(limits, args.delay_s, args.delay_count)

    return run_service(args.endpoint, limits, status, [load],
                       security=ServerSecurity(args.curve_secret_key, args.curve_clients, args.insecure_tcp))


if __name__ == "__main__":
    raise SystemExit(main())
