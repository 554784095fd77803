"""A service process: its entry point, what it says about itself, and its embedded tiny model."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

from editstack.service.tinymodels import TINY_MARKER
from editstack.wire.codec import Limits
from editstack.wire.protocol import Status
from editstack.wire.transport import Server, Worker, serve_forever

log = logging.getLogger(__name__)


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


def run_service(endpoint: str, limits: Limits, status: Callable[[Server], Status],
                loaders: Sequence[Callable[[], Worker]]) -> int:
    """Configure logging, bind `endpoint`, load the workers in the background and serve until SIGTERM."""
    logging.basicConfig(level=os.environ.get("EDITSTACK_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = Server(endpoint, lambda: status(server), limits)
    return serve_forever(server, loaders)
