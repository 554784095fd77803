"""Shared fixtures: real service processes on short ipc paths, started and stopped with bounds."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from editstack.errors import EditstackError
from editstack.wire.transport import Client


class ServiceProcess:
    """A service started as a real process; `wait_ready` pings it until ready (bounded)."""

    def __init__(self, args: list[str], endpoint: str, env: dict[str, str] | None = None, log: Path | None = None) -> None:
        self.args, self.endpoint, self.env, self.log = args, endpoint, env, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServiceProcess:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.args, env={**os.environ, **(self.env or {})}, stdout=out, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        with Client(self.endpoint, timeout_s=1.0, retries=0) as client:
            while time.monotonic() < deadline:
                assert self.proc and self.proc.poll() is None, f"{self.args} exited with {self.proc.returncode}: {self.tail()}"
                try:
                    if client.ping().state == "ready":
                        return
                except EditstackError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"{self.endpoint} not ready within {timeout_s}s: {self.tail()}")

    def tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log and self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout_s)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short folder for ipc sockets (their paths are limited to ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="es-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def service_python(service: str) -> str:
    """The python of a service's own venv, as scripts/test exports it (EDITSTACK_<SERVICE>_VENV)."""
    venv = os.environ.get(f"EDITSTACK_{service.upper()}_VENV")
    if not venv:
        message = f"EDITSTACK_{service.upper()}_VENV is not set: run the suite through scripts/test"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return str(Path(venv).resolve() / "bin" / "python")


def build_tiny_model(service: str, folder: Path) -> Path:
    """The service's embedded tiny model, built into `folder` by the service package's own command."""
    subprocess.run([service_python(service), "-m", f"editstack_{service}.tiny", str(folder)], check=True, timeout=300)
    return folder


@pytest.fixture
def start_service(sockdir: Path, tmp_path: Path) -> Iterator:
    """start_service(name, argv, env=None, wait=True) -> ServiceProcess on ipc://<sockdir>/<name>.sock.

    `argv` may use "{endpoint}"; the endpoint is also passed as <NAME>_ENDPOINT in the environment.
    Every service started is stopped at the end of the test.
    """
    started: list[ServiceProcess] = []

    def start(name: str, argv: list[str], env: dict[str, str] | None = None, wait: bool = True,
              timeout_s: float = 120.0) -> ServiceProcess:
        endpoint = f"ipc://{sockdir}/{name}.sock"
        service = ServiceProcess([a.format(endpoint=endpoint) for a in argv], endpoint,
                                 env={f"{name.upper()}_ENDPOINT": endpoint, **(env or {})},
                                 log=tmp_path / f"{name}.log").start()
        started.append(service)
        if wait:
            service.wait_ready(timeout_s)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture
def start_echo(start_service) -> Iterator:
    """start_echo(*extra_args, name="echo", wait=True) -> a ready echo service process."""

    def start(*extra: str, name: str = "echo", wait: bool = True) -> ServiceProcess:
        return start_service(name, [sys.executable, "-m", "editstack.service.echo", "{endpoint}", *extra], wait=wait,
                             timeout_s=30)

    return start


@pytest.fixture(scope="session")
def tiny_editor_dir(tmp_path_factory) -> Path:
    """The embedded tiny model, built once per session by the editor package's own command."""
    return build_tiny_model("editor", tmp_path_factory.mktemp("editor-model") / "tiny")


@pytest.fixture(scope="session")
def tiny_judge_dir(tmp_path_factory) -> Path:
    """The embedded tiny judge, built once per session by the scorer package's own command."""
    return build_tiny_model("scorer", tmp_path_factory.mktemp("scorer-model") / "tiny")


@pytest.fixture
def start_editor(start_service, tiny_editor_dir) -> Callable[..., ServiceProcess]:
    """start_editor(wait=True, **EDITOR_settings) -> the real editor on the tiny model (conditioning capped)."""

    def start(wait: bool = True, **env: str) -> ServiceProcess:
        settings = {"EDITOR_TINY_DIR": str(tiny_editor_dir), "EDITOR_CONDITION_MAX_PX": str(64 * 64),
                    **{f"EDITOR_{k.upper()}": v for k, v in env.items()}}
        return start_service("editor", [service_python("editor"), "-m", "editstack_editor"], env=settings, wait=wait)

    return start
