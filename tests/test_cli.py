"""`editstack` command line against real service processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time

EDITSTACK = [sys.executable, "-m", "editstack.runner.cli"]


def _ping(endpoint: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EDITSTACK, "ping", endpoint, *extra], capture_output=True, text=True, timeout=60)


def test_ping_exits_0_for_a_ready_service_and_prints_its_status(start_echo) -> None:
    service = start_echo()
    result = _ping(service.endpoint, "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["state"] == "ready" and status["service"] == "echo" and status["protocol"] == "editstack/3"
    plain = _ping(service.endpoint)
    assert plain.returncode == 0 and plain.stdout.startswith("echo ready")


def test_ping_exits_1_while_the_model_is_loading(start_echo) -> None:
    service = start_echo("--load-s", "60", wait=False)
    deadline = time.monotonic() + 30
    while (result := _ping(service.endpoint, "--timeout", "1")).returncode == 3 and time.monotonic() < deadline:
        pass
    assert result.returncode == 1 and result.stdout.startswith("echo loading")


def test_ping_exits_3_for_an_unreachable_service_within_its_timeout(sockdir) -> None:
    start = time.monotonic()
    result = _ping(f"ipc://{sockdir}/nobody.sock", "--timeout", "0.5")
    assert result.returncode == 3 and "service unavailable" in result.stderr
    assert time.monotonic() - start < 15  # interpreter start-up plus the 0.5 s wait


def test_ping_rejects_an_endpoint_that_is_not_ipc_or_tcp() -> None:
    result = _ping("http://localhost:1")
    assert result.returncode != 0 and "must start with ipc:// or tcp://" in result.stderr
