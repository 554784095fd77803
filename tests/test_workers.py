"""Worker processes (editstack.service.workers) in the real editor and scorer services: one child process per
worker, a killed child's batch answered with a retryable error while ping keeps answering, the
child restarted (and the service failed when it keeps dying), and no child left after SIGTERM or
after the service is killed."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from editstack.errors import EditstackError, RemoteError
from editstack.wire.codec import Blobs
from editstack.wire.protocol import EditItem, EditParams, EditReply, EditRequest, ScoreItem, ScoreRequest, Status
from editstack.wire.transport import Client

from conftest import service_python

SOURCE = np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def _process(pid: int) -> tuple[int, str] | None:
    """A live process's parent pid and command line (from /proc); None once it has ended (a zombie too)."""
    try:
        state, ppid = (Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split())[:2]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None
    return None if state == "Z" else (int(ppid), cmdline)


def _children(pid: int) -> dict[int, str]:
    """The live child processes of `pid`, by pid, with their command lines."""
    found = {}
    for entry in Path("/proc").glob("[0-9]*"):
        process = _process(int(entry.name))
        if process is not None and process[0] == pid:
            found[int(entry.name)] = process[1]
    return found


def _workers(pid: int) -> list[int]:
    """The worker processes of service `pid`."""
    return _workers_of(_children(pid))


def _workers_of(children: dict[int, str]) -> list[int]:
    """The worker processes among a service's `children` (multiprocessing's spawned children, not its
    resource tracker)."""
    return sorted(child for child, cmdline in children.items() if "spawn_main" in cmdline)


def _wait_for(condition: Callable[[], object], timeout_s: float, what: str) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not within {timeout_s}s")


def _ping(client: Client) -> Status | None:
    try:
        return client.ping()
    except EditstackError:
        return None


def _edit(client: Client, steps: int = 2, size: int = 64) -> EditReply:
    blobs = Blobs()
    item = EditItem(id="a", instruction="make the sky blue", images=[blobs.add(SOURCE)], seed=1, width=size,
                    height=size)
    reply, _ = client.edit(EditRequest([item], EditParams(steps=steps)), blobs)
    return reply


def _keep_busy(service) -> None:
    """Start about a minute of work on the service's one worker and return once it has started: its
    child computes and does not read its pipe until the end."""

    def long_edit() -> None:
        with Client(service.endpoint, timeout_s=60, retries=0) as client, contextlib.suppress(EditstackError):
            _edit(client, steps=1000, size=256)

    threading.Thread(target=long_edit, daemon=True).start()
    with Client(service.endpoint, timeout_s=2, retries=0) as client:
        _wait_for(lambda: (s := _ping(client)) and s.busy == 1, 60, "the edit never started")


def test_each_device_gets_its_own_worker_process(start_editor) -> None:
    service = start_editor(model="identity", devices="cpu,cpu")
    workers = _workers(service.proc.pid)
    assert len(workers) == 2, _children(service.proc.pid)
    with Client(service.endpoint, timeout_s=30) as client:
        assert client.ping().workers == 2
        assert _edit(client).items[0].error is None


def test_each_scorer_device_gets_its_own_judge_process_restarted_when_it_dies(start_service, tiny_judge_dir) -> None:
    service = start_service("scorer", [service_python("scorer"), "-m", "editstack_scorer"],
                            env={"SCORER_TINY_DIR": str(tiny_judge_dir), "SCORER_DEVICES": "cpu,cpu",
                                 "SCORER_THREADS": "1"})
    workers = _workers(service.proc.pid)
    assert len(workers) == 2, _children(service.proc.pid)
    blobs = Blobs()
    item = ScoreItem(id="a", instruction="make the sky blue", sources=[blobs.add(SOURCE)], edited=blobs.add(SOURCE))
    with Client(service.endpoint, timeout_s=60) as client:
        status = client.ping()
        assert status.workers == 2 and status.devices == ["cpu", "cpu"], status
        assert status.backend == "transformers/Qwen3VLForConditionalGeneration"
        os.kill(workers[0], signal.SIGKILL)
        _wait_for(lambda: (s := _ping(client)) and s.workers == 1, 30, "the killed judge was not taken off")
        assert client.score(ScoreRequest([item]), blobs).items[0].verdict is not None  # on the other
        _wait_for(lambda: (s := _ping(client)) and s.state == "ready" and s.workers == 2, 120,
                  "the killed judge was not restarted")
    assert "the worker process on cpu was killed by SIGKILL; restarting it" in service.log.read_text()


def test_a_killed_worker_fails_its_batch_retryably_keeps_ping_answering_and_is_restarted(start_editor) -> None:
    service = start_editor(threads="1")
    [child] = _workers(service.proc.pid)
    outcome: list[BaseException | EditReply] = []

    def slow_edit() -> None:
        with Client(service.endpoint, timeout_s=120, retries=0) as client:
            try:
                outcome.append(_edit(client, steps=400))
            except EditstackError as exc:
                outcome.append(exc)

    editing = threading.Thread(target=slow_edit)
    editing.start()
    with Client(service.endpoint, timeout_s=2, retries=0) as client:
        _wait_for(lambda: (s := _ping(client)) and s.busy == 1, 60, "the slow edit never started")
        os.kill(child, signal.SIGKILL)
        editing.join(30)
        assert not editing.is_alive(), "the killed worker's batch got no answer"
        [error] = outcome
        assert isinstance(error, RemoteError) and error.code == "loading" and error.retryable, error
        assert "died while handling this request" in error.message
        # the worker reloads in a new child; the service answers ping all along
        states = [_ping(client) for _ in range(3)]
        assert all(s is not None and s.state == "loading" and s.workers == 0 for s in states), states
        _wait_for(lambda: (s := _ping(client)) and s.state == "ready", 120, "the worker was not restarted")
    [restarted] = _workers(service.proc.pid)
    assert restarted != child
    with Client(service.endpoint, timeout_s=120) as client:
        assert _edit(client).items[0].error is None
    assert "was killed by SIGKILL; restarting it (1 of 3 in a row)" in service.log.read_text()


def test_a_worker_that_keeps_dying_fails_the_service_with_the_cause(start_editor) -> None:
    service = start_editor(model="identity")
    killed: set[int] = set()
    with Client(service.endpoint, timeout_s=2, retries=0) as client:
        for _ in range(4):  # the first death and MAX_RESTARTS more, with no reply in between
            [child] = _wait_for(lambda: [c for c in _workers(service.proc.pid) if c not in killed] or None, 60,
                                "no new worker process")
            os.kill(child, signal.SIGKILL)
            killed.add(child)
        status = _wait_for(lambda: (s := _ping(client)) and s.state == "failed" and s, 60, "the service never failed")
        # the last kill may come while the new child still loads ("… while loading the model, …")
        assert status.error.startswith("the worker process on cpu was killed by SIGKILL"), status.error
        assert status.error.endswith(", 4 times in a row"), status.error
        with pytest.raises(RemoteError) as refused:
            _edit(client)
    assert refused.value.code == "failed" and not refused.value.retryable
    assert _workers(service.proc.pid) == []


def test_sigterm_mid_batch_stops_the_service_and_leaves_no_child_process(start_editor) -> None:
    service = start_editor(threads="1")
    children = _children(service.proc.pid)
    assert len(_workers(service.proc.pid)) == 1, children

    _keep_busy(service)
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(30) == 0
    # the busy worker was stopped before the service exited (left alone, it would edit on for seconds);
    # multiprocessing's resource tracker ends when its pipe from the service closes
    assert all(_process(pid) is None for pid in _workers_of(children)), children
    _wait_for(lambda: all(_process(pid) is None for pid in children), 5,
              f"children of the stopped service still run: {children}")


def test_a_killed_service_takes_its_busy_worker_process_with_it(start_editor) -> None:
    service = start_editor(threads="1")
    [child] = _workers(service.proc.pid)

    _keep_busy(service)
    service.proc.send_signal(signal.SIGKILL)
    service.proc.wait(30)
    try:
        _wait_for(lambda: _process(child) is None, 5, f"the worker process {child} outlived its killed service")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)  # the test leaves no orphan, even failing
