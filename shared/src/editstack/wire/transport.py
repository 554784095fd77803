"""The server loop every service runs, and the client every caller uses.

Server: one ROUTER socket (wire-compatible with plain REQ clients) in the main thread, and one
thread per model worker. The main thread checks every message (size, version, header, frames),
answers `ping` itself, so a service stays responsive while its workers are busy or still loading,
refuses what is malformed with an ErrorReply, and queues work for the workers (bounded). Workers
hand replies back over an inproc socket; the main thread alone touches the ROUTER. An exception
while handling one request fails that request with an error reply, never the server. A work
request still queued `deadline_s` after it arrived is answered "expired" without being started.
A worker taken off with `remove_worker` (its model is reloading) takes no more work until added again.
After `fail(cause)` (the model cannot load) ping says "failed" with the cause and work is refused.
A stop takes no more requests, drops the queued ones, and passes on busy workers' replies for up
to `stop_drain_s`.

An ipc socket is owner-only (0600), in a folder the server creates 0700 when it is missing; the
default endpoints are in a per-user private folder (`default_endpoint`). A tcp endpoint requires
CURVE keys unless its security says insecure on purpose (editstack.wire.curve); a tcp port of `*`
binds a free port, and `endpoint` then names the bound one.

Client: Lazy Pirate (ZeroMQ guide, ch. 4): send, poll with a timeout, and on timeout close the
REQ socket (linger 0), reopen it and resend, a bounded number of times, then raise
ServiceUnavailable naming the endpoint. A socket monitor ends the wait early when the connection
drops (the service died or restarted), so a crash is noticed in milliseconds, not after the
timeout. Every wait has a timeout, and a call may have a wall-time budget over all its attempts.
A client that has somewhere else to send (the runner's shared queue) passes resend_on_drop=False:
a dropped connection then ends the call at once. The monitor also sees a failed CURVE handshake,
which raises AuthenticationRefused instead of "no reply": at once when the service says why, after
_SILENT_REFUSALS failures in a row when it only closes the connection mid-greeting (libzmq's
HANDSHAKE_FAILED_NO_DETAIL), which a service dying mid-greeting does once too; libzmq reconnects
between them by itself, and a greeting that then succeeds delivers the request.
"""

from __future__ import annotations

import logging
import os
import queue
import socket as unix_socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from editstack.wire.codec import Blobs, Limits, decode_reply, decode_request, encode
from editstack.errors import AuthenticationRefused, EditstackError, ProtocolError, RemoteError, ServiceUnavailable
from editstack.wire.curve import ClientKeys, ServerSecurity
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


def default_endpoint(service: str) -> str:
    """`service`'s default ipc endpoint, in a folder only this user can enter: $XDG_RUNTIME_DIR/editstack
    when set (a per-user 0700 folder on systemd machines), else /tmp/editstack-<uid> (the server
    creates either 0700). Read once, so a service and its runner must share the variable."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    folder = f"{runtime}/editstack" if runtime else f"/tmp/editstack-{os.getuid()}"
    return f"ipc://{folder}/{service}.sock"


def claim_ipc_path(endpoint: str, timeout_s: float = 1.0) -> str | None:
    """Make `endpoint`'s socket path free to bind: None when it is, else what holds it.

    A socket file with nobody behind it (left by a crash) is removed. One that accepts a connection
    is held, and a ping (waiting up to timeout_s) says by what; without this check ZeroMQ would
    unlink a live service's socket and take its place. tcp and abstract ipc endpoints: None.
    """
    path = _socket_file(endpoint)
    try:
        if path is None or not stat.S_ISSOCK(path.lstat().st_mode):
            return None if path is None else f"a file that is not a socket ({path})"
    except OSError:  # no such file, or a folder this user cannot search: binding will say so
        return None
    probe = unix_socket.socket(unix_socket.AF_UNIX, unix_socket.SOCK_STREAM)
    probe.settimeout(timeout_s)
    try:
        probe.connect(str(path))
    except FileNotFoundError:
        return None
    except ConnectionRefusedError:
        path.unlink(missing_ok=True)
        log.info("removed %s: a stale socket with nobody behind it", path)
        return None
    except OSError as exc:  # another user's socket, or a listener too stuck to accept
        return f"a process this user cannot reach ({type(exc).__name__}: {exc})"
    finally:
        probe.close()
    with Client(endpoint, timeout_s=timeout_s, retries=0) as client:
        try:
            status = client.ping()
        except EditstackError as exc:
            return f"a live process that does not answer ping as a service ({exc})"
    return f"a live {status.service} service ({status.state}, model {status.model})"


class Server:
    """Serves one endpoint: pings from the main thread, work on the workers added with `add_worker`."""

    def __init__(self, endpoint: str, status: Callable[[], Status], limits: Limits, max_queued: int = 64,
                 stop_drain_s: float = 5.0, security: ServerSecurity = ServerSecurity()) -> None:
        self.endpoint = check_endpoint(endpoint)
        self.security = security
        self._authenticator: Any = None  # zmq.auth's, while a CURVE endpoint is bound
        self.limits = limits
        self.stop_drain_s = stop_drain_s
        self._status = status
        self._max_queued = max_queued
        self._context = zmq.Context.instance()
        self._frontend: zmq.Socket | None = None
        # (envelope, request, blobs, arrival time on the monotonic clock)
        self._work: queue.Queue[tuple[list[bytes], Any, list[memoryview], float] | None] = queue.Queue()
        self._replies_endpoint = f"inproc://editstack-replies-{id(self)}"
        self._threads: dict[Worker, threading.Thread] = {}  # the serving workers, each with its thread
        self._started = 0  # worker threads ever started (under _busy_lock: supervisors add workers concurrently)
        self._busy = 0  # read by the main thread for pings; an int store is atomic under the GIL
        self._busy_lock = threading.Lock()
        self._failure: str | None = None
        self.stopped = threading.Event()

    @property
    def workers(self) -> int:
        return len(self._threads)

    @property
    def busy(self) -> int:
        """Workers handling a request right now (after a stop: only fewer, never more)."""
        return self._busy

    @property
    def failure(self) -> str | None:
        """The cause given to `fail`, or None."""
        return self._failure

    def add_worker(self, worker: Worker) -> None:
        """Start serving work on `worker` (callable once its model is loaded, from any thread)."""
        with self._busy_lock:
            thread = threading.Thread(target=self._work_loop, args=(worker,), name=f"worker-{self._started}",
                                      daemon=True)
            self._started += 1
        self._threads[worker] = thread
        thread.start()

    def remove_worker(self, worker: Worker) -> None:
        """Stop serving work on `worker` (from any thread; nothing when it is not serving): its current
        request is still answered, and a request it takes after this goes back to the queue."""
        self._threads.pop(worker, None)

    def fail(self, cause: str) -> None:
        """Enter the failed state (from any thread): ping answers state "failed" with `cause` as its
        error, work requests get ErrorReply("failed", cause). The process stays up to say why."""
        self._failure = cause

    def bind(self) -> None:
        """Bind the endpoint (`run` does it when not done yet). An ipc socket's folder is created 0700
        when missing, and the socket is made owner-only; a tcp one is secured (SettingsError when it
        cannot be), and `endpoint` names the port bound."""
        frontend = self._context.socket(zmq.ROUTER)
        frontend.setsockopt(zmq.LINGER, 0)
        path = _socket_file(self.endpoint)
        try:
            if path is not None:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if self.endpoint.startswith("tcp://"):
                self._authenticator = self.security.apply(frontend, self.endpoint)
            frontend.bind(self.endpoint)
            if self.endpoint.startswith("tcp://"):
                self.endpoint = frontend.last_endpoint.decode()  # tcp://host:* -> the port bound
            if path is not None:
                # connect(2) needs write permission on the socket file. bind made it with the umask's
                # mode, 0755 under the usual 022, which already keeps other users out until this narrows
                # it; a umask around bind would be process-wide while the loader thread writes files.
                path.chmod(0o600)
        except BaseException:
            frontend.close(linger=0)
            self._stop_authenticator()
            raise
        self._frontend = frontend

    def _stop_authenticator(self) -> None:
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None

    def run(self) -> None:
        """Serve until `stopped` is set, then drain. Malformed input is answered or logged, never fatal."""
        if self._frontend is None:
            self.bind()
        frontend = self._frontend
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
            self._drain(frontend, replies)
        finally:
            for _ in range(self._started):  # one each: a removed worker's thread may still wait on the queue
                self._work.put(None)
            frontend.close(linger=0)
            replies.close(linger=0)
            self._frontend = None
            self._stop_authenticator()

    def _drain(self, frontend: zmq.Socket, replies: zmq.Socket) -> None:
        """After a stop: drop the queued work (its clients resend), and pass on the replies of busy
        workers for up to stop_drain_s; what is unanswered then is dropped too."""
        dropped = 0
        while True:
            try:
                self._work.get_nowait()
            except queue.Empty:
                break
            dropped += 1
        log.info("stopping: %d queued request(s) dropped, %d busy worker(s)", dropped, self._busy)
        deadline = time.monotonic() + self.stop_drain_s
        while (self._busy or replies.poll(0)) and (left_s := deadline - time.monotonic()) > 0:
            if replies.poll(int(min(left_s * 1000, _POLL_MS))):
                frontend.send_multipart(replies.recv_multipart(copy=False), copy=False)

    def _on_request(self, frontend: zmq.Socket, frames: list[zmq.Frame]) -> None:
        arrived = time.monotonic()
        # frames: [client identity][empty delimiter][version][header][blob 0]…
        delimiter = next((i for i, f in enumerate(frames) if len(f.buffer) == 0), None)
        if delimiter is None:
            log.warning("dropped a message without a REQ envelope (%d frames)", len(frames))
            return
        envelope, body = [f.bytes for f in frames[: delimiter + 1]], frames[delimiter + 1 :]
        try:
            reply = self._route(envelope, body, arrived)
            if reply is not None:
                self._reply(frontend, envelope, reply)
        except Exception as exc:  # a defect: this request fails, the server goes on
            log.exception("failed to handle a request")
            self._reply(frontend, envelope, ErrorReply("internal", f"{type(exc).__name__}: {exc}"))

    def _route(self, envelope: list[bytes], body: list[zmq.Frame], arrived: float) -> Reply | None:
        """The main thread's answer to a request, or None when it went to the workers' queue."""
        try:
            request, blobs = decode_request(body, self.limits)
        except ProtocolError as exc:
            log.warning("refused a message: %s", exc)
            return ErrorReply(code=exc.code, message=str(exc))
        if isinstance(request, Ping):
            state = {"state": "failed", "error": self._failure} if self._failure is not None else {}
            return msgspec.structs.replace(self._status(), busy=self._busy, **state)
        if self._failure is not None:
            return ErrorReply("failed", self._failure)
        if not self._threads:
            return ErrorReply("loading", "the model is still loading", retryable=True)
        if self._work.qsize() >= self._max_queued:
            return ErrorReply("busy", f"{self._max_queued} requests queued", retryable=True)
        self._work.put((envelope, request, blobs, arrived))
        return None

    @staticmethod
    def _reply(frontend: zmq.Socket, envelope: list[bytes], message: Reply) -> None:
        frontend.send_multipart(envelope + encode(message), copy=False)

    def _work_loop(self, worker: Worker) -> None:
        replies = self._context.socket(zmq.PUSH)
        replies.connect(self._replies_endpoint)
        me = threading.current_thread()
        try:
            while self._threads.get(worker) is me and (job := self._work.get()) is not None:
                if self._threads.get(worker) is not me:  # removed while waiting: the job is the others'
                    self._work.put(job)
                    break
                envelope, request, blobs, arrived = job
                with self._busy_lock:
                    if self.stopped.is_set():  # a stopping server starts nothing new
                        continue
                    self._busy += 1
                try:
                    frames = envelope + self._answer(worker, request, blobs, arrived)
                    try:
                        # never blocks: with the server stopped and its end closed there is no one to take it
                        replies.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        log.warning("dropped the reply to a %s request: the server has stopped", type(request).__name__)
                finally:
                    # counted busy until its reply is handed over, so a stopping server waits for it
                    with self._busy_lock:
                        self._busy -= 1
        finally:
            replies.close(linger=0)

    @staticmethod
    def _answer(worker: Worker, request: EditRequest | ScoreRequest, blobs: list[memoryview],
                arrived: float) -> list[Any]:
        """The reply frames to one work request: "expired" when it waited past its deadline_s, else the
        worker's reply, or "internal" when the worker (or encoding its reply) raised."""
        waited_s = time.monotonic() - arrived
        if request.deadline_s is not None and waited_s > request.deadline_s:
            message = (f"waited {waited_s:.1f}s for a worker, past its deadline_s {request.deadline_s:g}s; "
                       "not started")
            log.info("a %s request expired: %s", type(request).__name__, message)
            return encode(ErrorReply("expired", message))
        try:
            reply, reply_blobs = worker.handle(request, blobs)
            return encode(reply, reply_blobs)
        except Exception as exc:  # a bug or a fatal model error: answer, log, keep serving
            log.exception("worker failed on a %s request", type(request).__name__)
            return encode(ErrorReply("internal", f"{type(exc).__name__}: {exc}"))


class Client:
    """A Lazy Pirate REQ client of one endpoint; not thread-safe (one per thread)."""

    def __init__(self, endpoint: str, timeout_s: float = 30.0, retries: int = 2,
                 miss_log_level: int = logging.WARNING, curve: ClientKeys | None = None,
                 resend_on_drop: bool = True) -> None:
        """`miss_log_level`: how loudly a missed reply is logged; a caller polling a service that may
        not be up yet (waiting for it to start) passes DEBUG and says what it waits for itself.
        `curve`: the keys for a CURVE endpoint. `resend_on_drop`: False ends a call at once with
        ServiceUnavailable when the connection drops, for a caller that resends elsewhere."""
        self.endpoint = check_endpoint(endpoint)
        self.timeout_s = timeout_s
        self.retries = retries
        self.curve = curve
        self.resend_on_drop = resend_on_drop
        self._miss_level = miss_log_level
        self._context = zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._monitor: zmq.Socket

    def request(self, message: Any, blobs: Blobs | None = None,
                budget_s: float | None = None) -> tuple[Reply, list[memoryview]]:
        """Send `message`, return the reply; RemoteError for an error reply, ServiceUnavailable when
        no reply came within (retries + 1) attempts of up to timeout_s each, or within `budget_s`
        (no attempt starts once it is spent, and each waits at most what is left of it).

        An attempt also ends early when the connection to the service drops (the process died or
        restarted): the request is resent at once instead of waiting out the timeout. A work
        request goes out with the attempt's wait as its deadline_s, unless the caller set one: a
        service does not start work its client has stopped waiting for.
        """
        start = time.monotonic()
        for attempt in range(1, self.retries + 2):
            wait_s = self.timeout_s if budget_s is None else min(self.timeout_s, start + budget_s - time.monotonic())
            if wait_s <= 0:
                break
            socket, monitor = self._connect()
            socket.send_multipart(encode(_with_deadline(message, wait_s), blobs), copy=False)
            outcome = self._await_reply(socket, monitor, wait_s)
            if isinstance(outcome, list):
                reply, reply_blobs = decode_reply(outcome)
                if isinstance(reply, ErrorReply):
                    raise RemoteError(self.endpoint, reply.code, reply.message, reply.retryable)
                return reply, reply_blobs
            self._reset()
            log.log(self._miss_level, "no reply from %s (attempt %d of %d)", self.endpoint, attempt, self.retries + 1)
            if outcome == "dropped" and not self.resend_on_drop:
                raise ServiceUnavailable(self.endpoint, attempt, time.monotonic() - start)
        else:
            raise ServiceUnavailable(self.endpoint, self.retries + 1, time.monotonic() - start)
        raise ServiceUnavailable(self.endpoint, attempt - 1, time.monotonic() - start, budget_s)

    def _await_reply(self, socket: zmq.Socket, monitor: zmq.Socket, wait_s: float) -> list[zmq.Frame] | str:
        """The reply's frames, or "timeout" after wait_s, or "dropped" when the connection drops;
        AuthenticationRefused when the CURVE handshake fails."""
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        deadline = time.monotonic() + wait_s
        silent = 0  # greetings in a row the service closed without a word
        while (left_s := deadline - time.monotonic()) > 0:
            events = dict(poller.poll(left_s * 1000))
            if socket in events:
                return socket.recv_multipart(copy=False)
            if monitor not in events:
                continue
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:  # a reconnect got through: the request goes with it
                silent = 0
                continue
            if event == zmq.EVENT_DISCONNECTED:
                if silent:  # the end of a greeting closed mid-way, counted already: libzmq reconnects
                    continue
                log.log(self._miss_level, "connection to %s dropped while waiting for a reply", self.endpoint)
                return "dropped"
            if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and (silent := silent + 1) < _SILENT_REFUSALS:
                continue
            self._reset()
            raise AuthenticationRefused(self.endpoint, _HANDSHAKE_FAILURES[event] if self.curve else
                                        "it requires CURVE, and this client has no keys for it")
        log.log(self._miss_level, "no reply from %s within %.1fs", self.endpoint, wait_s)
        return "timeout"

    def ping(self, budget_s: float | None = None) -> Status:
        reply, _ = self.request(Ping(), budget_s=budget_s)
        return _expect(reply, Status, self.endpoint)

    def edit(self, request: EditRequest, blobs: Blobs,
             budget_s: float | None = None) -> tuple[EditReply, list[memoryview]]:
        reply, reply_blobs = self.request(request, blobs, budget_s)
        return _expect(reply, EditReply, self.endpoint), reply_blobs

    def score(self, request: ScoreRequest, blobs: Blobs, budget_s: float | None = None) -> ScoreReply:
        reply, _ = self.request(request, blobs, budget_s)
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
            if self.curve is not None:
                self.curve.apply(socket)
            # ipc has no security handshake: one that fails there is a peer dying mid-connect, not a refusal
            events = zmq.EVENT_DISCONNECTED | (_HANDSHAKE_EVENTS if self.endpoint.startswith("tcp://") else 0)
            self._monitor = socket.get_monitor_socket(events)
            socket.connect(self.endpoint)
            self._socket = socket
        return self._socket, self._monitor

    def _reset(self) -> None:
        if self._socket is not None:
            self._socket.disable_monitor()
            self._monitor.close(linger=0)
            self._socket.close(linger=0)
            self._socket = None


# what a failed CURVE handshake means, by the monitor event that reports it (libzmq >= 4.3)
_HANDSHAKE_FAILURES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "it does not admit this client's key (add the client's .key file to its "
                                     "CURVE_CLIENTS folder)",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the handshake failed: a plain tcp service, or another protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the handshake failed: is this the service's public key?",
}
# greetings closed mid-way, in a row, that make a refusal (one is also how a dying service looks;
# libzmq retries every 100 ms, its default reconnect interval)
_SILENT_REFUSALS = 3
_HANDSHAKE_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | \
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED


def _expect(reply: Reply, kind: type, endpoint: str) -> Any:
    if not isinstance(reply, kind):
        raise ProtocolError(f"{endpoint} answered {type(reply).__name__}, expected {kind.__name__}")
    return reply


def _with_deadline(message: Any, wait_s: float) -> Any:
    """A work request with deadline_s set to `wait_s`, unless its caller set one; anything else as it is."""
    if isinstance(message, EditRequest | ScoreRequest) and message.deadline_s is None:
        return msgspec.structs.replace(message, deadline_s=wait_s)
    return message


def _socket_file(endpoint: str) -> Path | None:
    """The socket file of an ipc endpoint; None for tcp and for Linux's abstract sockets (ipc://@name)."""
    path = endpoint.removeprefix("ipc://")
    return None if path == endpoint or path.startswith("@") else Path(path)
