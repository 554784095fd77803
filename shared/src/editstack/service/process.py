"""A service process: its entry point and life (loading, failed, stopping), what it says about
itself, and its embedded tiny model. Its model workers run in its threads (`loaders`) or in child
processes it supervises (`processes`, editstack.service.workers)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import zmq

from editstack.errors import SettingsError
from editstack.service.tinymodels import TINY_MARKER
from editstack.wire.codec import Limits
from editstack.wire.protocol import Status
from editstack.wire.curve import ServerSecurity
from editstack.wire.rendezvous import publish
from editstack.wire.transport import Server, Worker, claim_ipc_path

if TYPE_CHECKING:  # workers imports this module: its child processes configure logging and name load failures
    from editstack.service.workers import WorkerProcess

log = logging.getLogger(__name__)

# Kinds of load failure, each recognised by a class name anywhere in the exception's chain (the
# deepest first): this package imports neither huggingface_hub nor torch, whose classes most are.
_LOAD_FAILURES = (
    ("hub unreachable", {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectionError", "ConnectError",
                         "ConnectTimeout", "Timeout", "TimeoutException", "gaierror"}),
    ("repository or revision not found", {"RepositoryNotFoundError", "RevisionNotFoundError"}),
    # huggingface_hub's verdict on a model name that is no folder here, read as a repository id
    ("no such folder, and not a valid hub repository id", {"HFValidationError"}),
    ("no such file or folder", {"FileNotFoundError", "NotADirectoryError"}),
    ("out of memory", {"OutOfMemoryError", "MemoryError"}),
)
_OUT_OF_MEMORY_TEXTS = ("out of memory", "not enough memory")  # CUDA's and torch's CPU allocator's words
_MAX_CAUSE_CHARS = 500
_LOADER_JOIN_S = 1.0


def package_versions(*packages: str) -> dict[str, str]:
    """Installed versions of editstack and `packages`, read without importing them (ping answers
    while the model library is still being imported)."""
    import editstack

    versions = {"editstack": editstack.__version__}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def embedded_model(folder: str, build: Callable[[Path], Path]) -> str:
    """The embedded tiny model's folder, built by `build` on first use."""
    path = Path(folder).expanduser()
    if not (path / TINY_MARKER).is_file():
        log.info("building the embedded tiny model in %s", path)
    return str(build(path))


def is_tiny_model(model: str) -> bool:
    """Whether `model` is a folder holding an editstack tiny model (its builder's marker file says so)."""
    return (Path(model).expanduser() / TINY_MARKER).is_file()


def load_failure_cause(exc: BaseException) -> str:
    """Why a model failed to load, in one line: its kind when known (hub unreachable, repository or
    revision not found, no such folder, out of memory), then `Type: message` of the root cause, the
    deepest exception of `exc`'s __cause__/__context__ chain."""
    chain = [exc]
    while (inner := chain[-1].__cause__ or (None if chain[-1].__suppress_context__ else chain[-1].__context__)) \
            is not None and inner not in chain:
        chain.append(inner)
    root = chain[-1]
    cause = " ".join(f"{type(root).__name__}: {root}".split())
    if len(cause) > _MAX_CAUSE_CHARS:
        cause = cause[:_MAX_CAUSE_CHARS - 1] + "…"
    for error in reversed(chain):
        names = {cls.__name__ for cls in type(error).__mro__}
        for kind, classes in _LOAD_FAILURES:
            out_of_memory = kind == "out of memory" and any(t in str(error).lower() for t in _OUT_OF_MEMORY_TEXTS)
            if names & classes or out_of_memory:
                return f"{kind}: {cause}"
    return cause


def configure_logging() -> None:
    """Log to stderr at EDITSTACK_LOG_LEVEL (default INFO), one event per line; once per process."""
    logging.basicConfig(level=os.environ.get("EDITSTACK_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def run_service(endpoint: str, limits: Limits, status: Callable[[Server], Status],
                loaders: Sequence[Callable[[], Worker]] = (), *, processes: Sequence[WorkerProcess] = (),
                security: ServerSecurity = ServerSecurity(), rendezvous: str = "") -> int:
    """Configure logging, bind `endpoint`, load the workers in the background and serve until
    SIGTERM or SIGINT. Returns the exit status: 0 after a stop, 1 after a stop when the model had
    failed to load (the service stayed up meanwhile, saying why), 2 when the endpoint is taken or
    cannot be secured (`security`: a tcp endpoint's CURVE keys). With a `rendezvous` folder, the
    endpoint bound is published there (editstack.wire.rendezvous).

    Workers load one after another, `loaders` in this process, then `processes` each in its own
    child (each serves as soon as it is loaded): model libraries patch global state while loading
    (accelerate's empty-weights context), so concurrent loads collide, and N copies of a model in
    host memory at once could exhaust it. A stop stops the children too.
    """
    configure_logging()
    holder = claim_ipc_path(endpoint)
    if holder is not None:
        log.error("not starting: %s is held by %s", endpoint, holder)
        return 2
    server = Server(endpoint, lambda: status(server), limits, security=security)
    try:
        server.bind()
        if rendezvous:
            publish(Path(rendezvous), status(server).service, server.endpoint, security)
    except (zmq.ZMQError, OSError) as exc:  # a tcp port in use, an ipc folder this user cannot create or write
        log.error("not starting: cannot bind %s: %s", endpoint, exc)
        return 2
    except SettingsError as exc:  # tcp without keys, or unusable key files
        log.error("not starting: %s", exc)
        return 2
    loader = threading.Thread(target=_load, args=(server, loaders, processes), name="loader", daemon=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stopped.set())
    loader.start()
    server.run()
    for process in processes:
        process.stop()
    if processes:  # the loader only waits on children, all gone now: it ends at once
        loader.join(_LOADER_JOIN_S)
    exit_status = 0 if server.failure is None else 1
    if server.busy or loader.is_alive():
        # a thread inside model code cannot be interrupted, and interpreter shutdown under it aborts
        # the process ("terminate called without an active exception", exit 134): leave at once;
        # the unanswered requests' clients resend to the next service
        log.warning("abandoning %d busy worker(s)%s", server.busy, " and the model loading" if loader.is_alive() else "")
        logging.shutdown()
        os._exit(exit_status)
    return exit_status


def fail_service(server: Server, cause: str) -> None:
    """Put the server in the failed state: ping says `cause` from now on, and so does the log's last line."""
    server.fail(cause)
    log.error("failed to load: %s", cause)


def _load(server: Server, loaders: Sequence[Callable[[], Worker]], processes: Sequence[WorkerProcess]) -> None:
    """Load the workers in turn; on a failure the server enters the failed state, saying why."""
    try:
        for make in loaders:
            server.add_worker(make())
    except Exception as exc:
        log.exception("the model failed to load")  # the whole traceback, once
        fail_service(server, load_failure_cause(exc))
        return
    for process in processes:
        if server.failure is not None or server.stopped.is_set():
            return
        process.start(server)
