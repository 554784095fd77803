"""The server loop every service runs, and the client every caller uses.

Server: one ROUTER socket (wire-compatible with plain REQ clients) in the main thread, and one
thread per model worker. The main thread checks every message (size, version, header, frames),
answers `ping` itself, so a service stays responsive while its workers are busy or still loading,
refuses what is malformed with an ErrorReply, and queues work for the workers (bounded). Workers
hand replies back over an inproc socket; the main thread alone touches the ROUTER.

Client: Lazy Pirate (ZeroMQ guide, ch. 4): send, poll with a timeout, and on timeout close the
REQ socket (linger 0), reopen it and resend, a bounded number of times, then raise
ServiceUnavailable naming the endpoint. A socket monitor ends the wait early when the connection
drops (the service died or restarted), so a crash is noticed in milliseconds, not after the
timeout. Every wait has a timeout.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from editstack.wire.codec import Blobs, Limits, decode_reply, decode_request, encode
from editstack.errors import ProtocolError, RemoteError, ServiceUnavailable
from editstack.wire.protocol import (
    EditReply,
    EditRequest,
    ErrorReply,
    Ping,
    Reply,
    ScoreReply,
    ScoreRequest,
    Status,
)

log = logging.getLogger(__name__)

ENDPOINT_SCHEMES = ("ipc://", "tcp://")
_POLL_MS = 100


class Worker(Protocol):
    """One loaded model: handles a work request, returns the reply and its blobs."""

    def handle(self, request: EditRequest | ScoreRequest, blobs: list[memoryview]) -> tuple[Reply, Blobs | None]: ...


def check_endpoint(endpoint: str) -> str:
    """The endpoint, if it is ipc:// or tcp://; ValueError naming it otherwise."""
    if not endpoint.startswith(ENDPOINT_SCHEMES):
        raise ValueError(f"endpoint {endpoint!r} must start with ipc:// or tcp://")
    return endpoint


class Server:
    """Serves one endpoint: pings from the main thread, work on the workers added with `add_worker`."""

    def __init__(self, endpoint: str, status: Callable[[], Status], limits: Limits, max_queued: int = 64) -> None:
        self.endpoint = check_endpoint(endpoint)
        self.limits = limits
        self._status = status
        self._max_queued = max_queued
        self._context = zmq.Context.instance()
        self._work: queue.Queue[tuple[bytes, Any, list[memoryview]] | None] = queue.Queue()
        self._replies_endpoint = f"inproc://editstack-replies-{id(self)}"
        self._threads: list[threading.Thread] = []
        self._busy = 0  # read by the main thread for pings; an int store is atomic under the GIL
        self._busy_lock = threading.Lock()
        self.stopped = threading.Event()

    @property
    def workers(self) -> int:
        return len(self._threads)

    def add_worker(self, worker: Worker) -> None:
        """Start serving work on `worker` (callable once its model is loaded, from any thread)."""
        thread = threading.Thread(target=self._work_loop, args=(worker,), name=f"worker-{len(self._threads)}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def run(self) -> None:
        """Serve until `stopped` is set. Malformed input is answered or logged, never fatal."""
        frontend = self._context.socket(zmq.ROUTER)
        frontend.setsockopt(zmq.LINGER, 0)
        if self.endpoint.startswith("ipc://"):
            Path(self.endpoint.removeprefix("ipc://")).parent.mkdir(parents=True, exist_ok=True)
        frontend.bind(self.endpoint)
        replies = self._context.socket(zmq.PULL)
        replies.bind(self._replies_endpoint)
        poller = zmq.Poller()
        poller.register(frontend, zmq.POLLIN)
        poller.register(replies, zmq.POLLIN)
        log.info("serving %s", self.endpoint)
        try:
            while not self.stopped.is_set():
                events = dict(poller.poll(_POLL_MS))
                if replies in events:
                    frontend.send_multipart(replies.recv_multipart(copy=False), copy=False)
                if frontend in events:
                    self._on_request(frontend, frontend.recv_multipart(copy=False))
        finally:
            for _ in self._threads:
                self._work.put(None)
            frontend.close(linger=0)
            replies.close(linger=0)

    def _on_request(self, frontend: zmq.Socket, frames: list[zmq.Frame]) -> None:
        # frames: [client identity][empty delimiter][version][header][blob 0]…
        delimiter = next((i for i, f in enumerate(frames) if len(f.buffer) == 0), None)
        if delimiter is None:
            log.warning("dropped a message without a REQ envelope (%d frames)", len(frames))
            return
        envelope, body = [f.bytes for f in frames[: delimiter + 1]], frames[delimiter + 1 :]
        try:
            request, blobs = decode_request(body, self.limits)
        except ProtocolError as exc:
            log.warning("refused a message: %s", exc)
            self._reply(frontend, envelope, ErrorReply(code=exc.code, message=str(exc)))
            return
        if isinstance(request, Ping):
            self._reply(frontend, envelope, msgspec.structs.replace(self._status(), busy=self._busy))
        elif not self._threads:
            self._reply(frontend, envelope, ErrorReply("loading", "the model is still loading", retryable=True))
        elif self._work.qsize() >= self._max_queued:
            self._reply(frontend, envelope, ErrorReply("busy", f"{self._max_queued} requests queued", retryable=True))
        else:
            self._work.put((envelope, request, blobs))

    @staticmethod
    def _reply(frontend: zmq.Socket, envelope: list[bytes], message: Reply) -> None:
        frontend.send_multipart(envelope + encode(message), copy=False)

    def _work_loop(self, worker: Worker) -> None:
        replies = self._context.socket(zmq.PUSH)
        replies.connect(self._replies_endpoint)
        try:
            while (job := self._work.get()) is not None:
                envelope, request, blobs = job
                with self._busy_lock:
                    self._busy += 1
                try:
                    reply, reply_blobs = worker.handle(request, blobs)
                except Exception as exc:  # a bug or a fatal model error: answer, log, keep serving
                    log.exception("worker failed on a %s request", type(request).__name__)
                    reply, reply_blobs = ErrorReply("internal", f"{type(exc).__name__}: {exc}"), None
                finally:
                    with self._busy_lock:
                        self._busy -= 1
                replies.send_multipart(envelope + encode(reply, reply_blobs), copy=False)
        finally:
            replies.close(linger=0)


class Client:
    """A Lazy Pirate REQ client of one endpoint; not thread-safe (one per thread)."""

    def __init__(self, endpoint: str, timeout_s: float = 30.0, retries: int = 2) -> None:
        self.endpoint = check_endpoint(endpoint)
        self.timeout_s = timeout_s
        self.retries = retries
        self._context = zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._monitor: zmq.Socket

    def request(self, message: Any, blobs: Blobs | None = None) -> tuple[Reply, list[memoryview]]:
        """Send `message`, return the reply; RemoteError for an error reply, ServiceUnavailable when
        no reply came within (retries + 1) attempts of up to timeout_s each.

        An attempt also ends early when the connection to the service drops (the process died or
        restarted): the request is resent at once instead of waiting out the timeout.
        """
        frames = encode(message, blobs)
        start = time.monotonic()
        for attempt in range(1, self.retries + 2):
            socket, monitor = self._connect()
            socket.send_multipart(frames, copy=False)
            outcome = self._await_reply(socket, monitor)
            if outcome is not None:
                reply, reply_blobs = decode_reply(outcome)
                if isinstance(reply, ErrorReply):
                    raise RemoteError(self.endpoint, reply.code, reply.message, reply.retryable)
                return reply, reply_blobs
            self._reset()
            log.warning("no reply from %s (attempt %d of %d)", self.endpoint, attempt, self.retries + 1)
        raise ServiceUnavailable(self.endpoint, self.retries + 1, time.monotonic() - start)

    def _await_reply(self, socket: zmq.Socket, monitor: zmq.Socket) -> list[zmq.Frame] | None:
        """The reply's frames, or None after timeout_s or when the connection drops."""
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        deadline = time.monotonic() + self.timeout_s
        while (left_s := deadline - time.monotonic()) > 0:
            events = dict(poller.poll(left_s * 1000))
            if socket in events:
                return socket.recv_multipart(copy=False)
            if monitor in events and recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED:
                log.warning("connection to %s dropped while waiting for a reply", self.endpoint)
                return None
        log.warning("no reply from %s within %.1fs", self.endpoint, self.timeout_s)
        return None

    def ping(self) -> Status:
        reply, _ = self.request(Ping())
        return _expect(reply, Status, self.endpoint)

    def edit(self, request: EditRequest, blobs: Blobs) -> tuple[EditReply, list[memoryview]]:
        reply, reply_blobs = self.request(request, blobs)
        return _expect(reply, EditReply, self.endpoint), reply_blobs

    def score(self, request: ScoreRequest, blobs: Blobs) -> ScoreReply:
        reply, _ = self.request(request, blobs)
        return _expect(reply, ScoreReply, self.endpoint)

    def close(self) -> None:
        self._reset()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> tuple[zmq.Socket, zmq.Socket]:
        if self._socket is None:
            socket = self._context.socket(zmq.REQ)
            socket.setsockopt(zmq.LINGER, 0)
            # ZMTP heartbeats: a peer that vanished without closing (a host gone) shows as a disconnect
            socket.setsockopt(zmq.HEARTBEAT_IVL, 1000)
            socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
            self._monitor = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            socket.connect(self.endpoint)
            self._socket = socket
        return self._socket, self._monitor

    def _reset(self) -> None:
        if self._socket is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._socket.close(linger=0)
            self._socket = None


def _expect(reply: Reply, kind: type, endpoint: str) -> Any:
    if not isinstance(reply, kind):
        raise ProtocolError(f"{endpoint} answered {type(reply).__name__}, expected {kind.__name__}")
    return reply


def serve_forever(server: Server, load: Sequence[Callable[[], Worker]], install_signals: bool = True) -> int:
    """Run `server`, loading the workers in a background thread so ping answers `loading` meanwhile.

    Workers load one after another (each serves as soon as it is loaded): model libraries patch
    global state while loading (accelerate's empty-weights context), so concurrent loads collide.
    Returns the process exit status: 0 after SIGTERM/SIGINT, 1 when a worker failed to load.
    """
    import signal

    failed = threading.Event()

    def loader() -> None:
        try:
            for make in load:
                server.add_worker(make())
        except Exception:
            log.exception("a worker failed to load; stopping")
            failed.set()
            server.stopped.set()

    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: server.stopped.set())
    threading.Thread(target=loader, name="loader", daemon=True).start()
    server.run()
    return 1 if failed.is_set() else 0
