"""Model workers in child processes, one process each, supervised by the service.

Workers that are threads of one process share its GIL: two CPU workers edited at 1.0-1.4x one.
Here the service's main process keeps the server (ping answered in every state) and each worker it
calls is a `WorkerProcess`: a proxy that passes the request to its child over a pipe and returns
the child's reply. The child loads the model with `load` (run there) and serves one request at a
time. Between them travel the wire's own frames, encoded and checked by the codec, never pickle;
only the child's start pickles `load` (the service's own function and settings), as
multiprocessing's spawn does.

    parent → child   [version][request header][blob 0]…   a work request, as the server decoded it
    child → parent   _Started (msgpack)                   once: the model loaded (what Status says of it), or why not
    child → parent   [version][reply header][blob 0]…     the reply to each request

Each message is a frame count, then the frames. States of a worker: loading → serving → (dead →
loading …) or failed. A child that dies (killed, segfault, out of memory) is seen at once through
its process sentinel: the request it held is answered ErrorReply("loading", retryable=True), which
the runner resends after a pause like any retryable error; the worker is taken off the server
while a new child reloads the model, and put back once loaded. A load that raises fails the
service at once with its cause, as a load in the service's own process does; a child that dies
MAX_RESTARTS + 1 times in a row (loads included, no reply in between) fails it too. A child ends
with its service, even one killed mid-edit: it would otherwise edit on, holding its GPU's memory.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import msgspec

from editstack.service.process import configure_logging, fail_service, load_failure_cause
from editstack.wire.codec import Blobs, Limits, decode_reply, decode_request, encode
from editstack.wire.protocol import EditRequest, ErrorReply, Reply, ScoreRequest
from editstack.wire.transport import Server, Worker

log = logging.getLogger(__name__)

# a fork would copy the parent's threads, locks and ZeroMQ context into the child
_SPAWN = multiprocessing.get_context("spawn")
MAX_RESTARTS = 3
_STOP_S = 5.0  # a child's time to exit after SIGTERM, before SIGKILL
_REAP_S = 1.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

class Loaded(msgspec.Struct, frozen=True):
    """What the service's Status says of a model loaded in a child."""

    backend: str  # Status.backend: the library and class serving it
    unavailable_modes: dict[str, str] = {}  # a scorer's ScoreDefaults.unavailable_modes: mode -> why


ChildLoad = Callable[[], tuple[Worker, Loaded]]
"""Loads the model in the child: the worker, and what Status says of it."""


class _Started(msgspec.Struct, frozen=True):
    """The child's first message: its model loaded, or the load's failure cause."""

    loaded: Loaded | None = None
    error: str = ""


class _PipeClosed(Exception):
    """The other end of a worker's pipe is gone: in the service, the child died; in the child, the service."""


class _ChildDied(Exception):
    """A child process ended; the message says how."""


class _LoadFailed(Exception):
    """A child's load raised; the message is its cause (load_failure_cause)."""


class WorkerProcess:
    """A Worker whose model lives in a child process, restarted whenever it dies."""

    def __init__(self, name: str, load: ChildLoad, limits: Limits) -> None:
        """`name`: the device, in logs and errors. `load` runs in the child, so it must pickle (a
        module-level function, or a functools.partial of one)."""
        self.name = name
        self.loaded: Loaded | None = None  # set once a child has loaded
        self._load = load
        self._limits = limits
        self._server: Server | None = None
        self._supervisor: threading.Thread | None = None
        self._exchange = threading.Lock()  # one request at a time on the pipe; a restart swaps it under this
        self._spawning = threading.Lock()  # stop() and a (re)start never interleave: no child outlives a stop
        self._child: tuple[BaseProcess, Connection] | None = None  # the loaded child requests go to
        self._newest: BaseProcess | None = None  # the last child started, loaded or still loading: stop() ends it
        self._stopping = False
        self._answered = False  # the current child has sent a reply

    def start(self, server: Server) -> None:
        """Load the model in a child, then serve it on `server`; returns when the first load has
        ended (the worker serves, or the server is failed, saying why). A supervisor thread restarts
        the child whenever it dies."""
        self._server = server
        loaded = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, args=(loaded,), name=f"supervisor-{self.name}",
                                            daemon=True)
        self._supervisor.start()
        loaded.wait()

    def stop(self) -> None:
        """Stop the child, SIGTERM then SIGKILL after _STOP_S, and wait for its supervisor to see it
        gone; no restart follows."""
        with self._spawning:
            self._stopping = True
            process = self._newest
        if process is not None:
            # only the supervisor reaps (waitpid): a second reaper could signal a pid already reused
            process.terminate()
            if not wait([process.sentinel], _STOP_S):
                log.warning("the worker process on %s ignored SIGTERM for %.0fs: killing it", self.name, _STOP_S)
                process.kill()
        if self._supervisor is not None:
            self._supervisor.join(_STOP_S)

    def handle(self, request: EditRequest | ScoreRequest, blobs: list[memoryview]) -> tuple[Reply, Blobs | None]:
        with self._exchange:
            process, conn = self._child
            try:
                _send_frames(conn, encode(request) + blobs)
                frames = _receive_frames(conn, process)
            except _PipeClosed:
                # off the server before this thread can take another request to a dead child; the
                # supervisor logs how it died
                self._server.remove_worker(self)
                message = (f"the worker process on {self.name} died while handling this request; it is "
                           "restarting: send the request again")
                return ErrorReply("loading", message, retryable=True), None
            self._answered = True
        reply, reply_blobs = decode_reply(frames)
        out = Blobs()
        out.frames = reply_blobs
        return reply, out

    def _supervise(self, loaded: threading.Event) -> None:
        server = self._server
        deaths = 0
        try:
            while True:
                try:
                    process = self._spawn()
                    if process is None:
                        return
                    server.add_worker(self)
                    loaded.set()
                    wait([process.sentinel])  # until it dies, or stop() ends it
                    server.remove_worker(self)
                    cause = _death(process)
                except _ChildDied as exc:  # while loading
                    cause = str(exc)
                except _LoadFailed as exc:  # the cause alone, as a load in the service's process says it
                    fail_service(server, str(exc))
                    return
                if self._stopping:
                    return
                deaths = 1 if self._answered else deaths + 1
                if deaths > MAX_RESTARTS:
                    fail_service(server, f"the worker process on {self.name} {cause}, {deaths} times in a row")
                    return
                log.warning("the worker process on %s %s; restarting it (%d of %d in a row)", self.name, cause,
                            deaths, MAX_RESTARTS)
        finally:
            loaded.set()

    def _spawn(self) -> BaseProcess | None:
        """A new child with its model loaded, in place of the last one; None when the service is
        stopping, _ChildDied when the child dies first, _LoadFailed when its load raised."""
        ours, theirs = _SPAWN.Pipe()
        process = _SPAWN.Process(target=_child_main, args=(theirs, self._load, self._limits, self.name, os.getpid()),
                                 name=f"worker-{self.name}", daemon=True)
        with self._spawning:
            if self._stopping:
                return None
            process.start()
            self._newest = process
        theirs.close()  # the child holds its own copy: its death closes the pipe
        try:
            [first] = _receive_frames(ours, process)
        except _PipeClosed:
            ours.close()
            raise _ChildDied(f"{_death(process)} while loading the model") from None
        started = msgspec.msgpack.decode(first, type=_Started)
        if started.loaded is None:
            ours.close()
            raise _LoadFailed(started.error)
        self.loaded = started.loaded
        # swapped in only now: a request taken before the worker left the server must not reach a
        # child that is still loading, where it and the load's message would share one pipe
        with self._exchange:  # never while a request is on the old pipe
            if self._child:
                self._child[1].close()
            self._child = (process, ours)
            self._answered = False
        return process


def _send_frames(conn: Connection, frames: Sequence[Any]) -> None:
    """One message: its frame count, then each frame; _PipeClosed when the other end is gone."""
    try:
        conn.send_bytes(len(frames).to_bytes(4, "little"))
        for frame in frames:
            conn.send_bytes(memoryview(frame).cast("B"))  # send_bytes measures len(): 1-D bytes, not an image's rows
    except OSError as exc:  # BrokenPipeError, ConnectionResetError
        raise _PipeClosed(str(exc)) from exc


def _receive_frames(conn: Connection, process: BaseProcess | None = None) -> list[bytes]:
    """The next message's frames; _PipeClosed when the other end is gone, or `process` ended, first."""
    if process is not None and conn not in wait([conn, process.sentinel]):
        raise _PipeClosed("the process ended")
    try:
        count = int.from_bytes(conn.recv_bytes(), "little")
        return [conn.recv_bytes() for _ in range(count)]
    except (EOFError, OSError) as exc:
        raise _PipeClosed(str(exc)) from exc


def _death(process: BaseProcess) -> str:
    """How a child ended, as a phrase: "was killed by SIGKILL", "exited with status 1" (only the
    supervisor calls this: it alone reaps its children)."""
    process.join(_REAP_S)  # its pipe closes a moment before its exit status can be read
    code = process.exitcode
    if code is None:
        return "closed its pipe"
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def _die_with_service(service_pid: int) -> None:
    """End this process when the service's supervising thread ends, the service's death included: a
    child busy loading or editing would otherwise hold its GPU memory until it next reads its pipe,
    and a service restarted meanwhile (compose, a Slurm requeue) would find the memory taken. Linux's
    PR_SET_PDEATHSIG; elsewhere only the pipe tells."""
    if not sys.platform.startswith("linux"):
        return
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        log.warning("cannot ask to end with the service: prctl: %s", os.strerror(ctypes.get_errno()))
    if os.getppid() != service_pid:  # it died before the request took effect
        os._exit(1)


def _child_main(conn: Connection, load: ChildLoad, limits: Limits, name: str, service_pid: int) -> None:
    """A worker process: load the model, say so, then answer requests until the service closes its end."""
    _die_with_service(service_pid)
    # Ctrl-C reaches the whole process group; the service stops its children itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM ends it as an exit, not a kill: multiprocessing's resource tracker then sees the locks
    # the model libraries made (tqdm's) released instead of warning about leaked semaphores
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    configure_logging()
    try:
        try:
            worker, loaded = load()
        except Exception as exc:
            log.exception("the model failed to load on %s", name)  # the whole traceback, in the child
            _send_frames(conn, [msgspec.msgpack.encode(_Started(error=load_failure_cause(exc)))])
            return
        _send_frames(conn, [msgspec.msgpack.encode(_Started(loaded))])
        while True:
            frames = _receive_frames(conn)
            try:
                request, blobs = decode_request(frames, limits)
                reply, reply_blobs = worker.handle(request, blobs)
                out = encode(reply, reply_blobs)
            except Exception as exc:  # a bug or a fatal model error: answer, log, keep serving
                log.exception("the worker on %s failed on a request", name)
                out = encode(ErrorReply("internal", f"{type(exc).__name__}: {exc}"))
            _send_frames(conn, out)
    except _PipeClosed:
        pass  # the service closed its end: it stopped, or died
