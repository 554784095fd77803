"""The server loop and the Lazy Pirate client against real echo service processes, and a service
process's life: loading, failing to load, ipc socket hygiene, stopping while busy."""

from __future__ import annotations

import os
import signal
import socket
import stat
import threading
import time

import msgspec
import numpy as np
import pytest
import zmq

from editstack.runner.config import EditorConfig, ScorerConfig
from editstack.service.echo import EchoWorker
from editstack.service.process import load_failure_cause
from editstack.wire.codec import Blobs, Limits, decode_reply, encode, encode_png, read_image
from editstack.wire.transport import Client, claim_ipc_path, default_endpoint
from editstack.errors import RemoteError, ServiceUnavailable
from editstack.wire.protocol import (
    PROTOCOL_VERSION,
    EditItem,
    EditParams,
    EditReply,
    EditRequest,
    ErrorReply,
    ImageRef,
    Ping,
)

from conftest import ServiceProcess
from fakes import echo_status, in_process_service

IMAGE = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)


def _edit_request(n: int = 2, encoding: str = "raw") -> tuple[EditRequest, Blobs]:
    blobs = Blobs()
    items = [EditItem(id=f"item-{k}", instruction="keep it", images=[blobs.add(IMAGE, encoding)]) for k in range(n)]
    return EditRequest(items), blobs


def _send_raw(endpoint: str, frames: list[bytes], timeout_s: float = 5.0):
    """Send hand-made frames from a plain REQ socket; return the decoded reply."""
    socket = zmq.Context.instance().socket(zmq.REQ)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    try:
        socket.send_multipart(frames)
        assert socket.poll(timeout_s * 1000), "no reply to a hostile message"
        return decode_reply(socket.recv_multipart())[0]
    finally:
        socket.close()


def _assert_normal_request_succeeds(client) -> None:
    request, blobs = _edit_request()
    reply, received = client.edit(request, blobs)
    assert [r.error for r in reply.items] == [None, None]
    assert np.array_equal(read_image(reply.items[0].image, received, Limits()), IMAGE)


def test_echo_round_trip_returns_the_same_images_raw_and_png(start_echo) -> None:
    service = start_echo()

    with Client(service.endpoint, timeout_s=10) as client:
        for encoding in ("raw", "png"):
            request, blobs = _edit_request(3, encoding)
            reply, received = client.edit(request, blobs)
            assert isinstance(reply, EditReply) and [r.id for r in reply.items] == ["item-0", "item-1", "item-2"]
            for result in reply.items:
                assert result.image.encoding == encoding
                assert np.array_equal(read_image(result.image, received, Limits()), IMAGE)
        png = encode_png(IMAGE)  # PNG bytes come back byte for byte
        blobs = Blobs()
        reply, received = client.edit(EditRequest([EditItem("p", "x", [blobs.add(png)])]), blobs)
        assert bytes(received[0]) == png


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([np.random.default_rng(1).bytes(200)], "bad_message"),
        ([b"editstack/99", encode(Ping())[1]], "bad_message"),
        ([PROTOCOL_VERSION], "bad_message"),  # truncated: no header
        ([PROTOCOL_VERSION, encode(_edit_request(2)[0])[1], IMAGE.tobytes()], "bad_message"),  # one blob of two
        ([PROTOCOL_VERSION, encode(EditRequest([EditItem("a", "x", [ImageRef(0, "raw", (4, 4, 3), "uint8")])]))[1],
          IMAGE.tobytes()], "bad_message"),  # header does not match its frame
    ],
    ids=["random-bytes", "wrong-version", "truncated", "missing-frame", "header-mismatch"],
)
def test_hostile_message_gets_an_error_reply_and_the_server_keeps_serving(start_echo, frames, code) -> None:

    service = start_echo()
    reply = _send_raw(service.endpoint, frames)
    assert isinstance(reply, ErrorReply) and reply.code == code and not reply.retryable
    with Client(service.endpoint, timeout_s=10) as client:
        _assert_normal_request_succeeds(client)


def test_message_without_envelope_is_logged_and_dropped(start_echo) -> None:

    service = start_echo()
    dealer = zmq.Context.instance().socket(zmq.DEALER)  # no empty delimiter frame: not a REQ peer
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(service.endpoint)
    dealer.send_multipart([b"garbage"])
    assert dealer.poll(500) == 0
    dealer.close()
    with Client(service.endpoint, timeout_s=10) as client:
        _assert_normal_request_succeeds(client)
    assert "dropped a message without a REQ envelope" in service.tail()


def test_oversized_message_and_over_limit_image_are_refused_and_the_server_keeps_serving(start_echo) -> None:

    service = start_echo("--max-message-bytes", str(50_000), "--max-image-px", str(40 * 40))
    with Client(service.endpoint, timeout_s=10) as client:
        big = np.zeros((200, 200, 3), dtype=np.uint8)
        blobs = Blobs()
        with pytest.raises(RemoteError, match="over the limit of 50000 bytes") as err:
            client.edit(EditRequest([EditItem("big", "x", [blobs.add(big)])]), blobs)
        assert err.value.code == "limit_exceeded"
        blobs = Blobs()
        wide = np.zeros((10, 200, 3), dtype=np.uint8)
        reply, _ = client.edit(EditRequest([EditItem("wide", "x", [blobs.add(wide)]), EditItem("ok", "x", [blobs.add(IMAGE[:20, :20])])]), blobs)
        assert reply.items[0].error.code == "bad_image" and "'wide'" in reply.items[0].error.message
        assert "over the limit of 1600" in reply.items[0].error.message
        assert reply.items[1].error is None


def test_batch_over_the_limit_is_refused(start_echo) -> None:

    service = start_echo("--max-batch", "2")
    with Client(service.endpoint, timeout_s=10) as client:
        with pytest.raises(RemoteError, match="batch of 3 items"):
            client.edit(*_edit_request(3))
        _assert_normal_request_succeeds(client)


def test_slow_server_makes_the_client_time_out_and_retry(start_echo) -> None:

    service = start_echo("--delay-s", "1.5", "--delay-count", "1")
    with Client(service.endpoint, timeout_s=0.5, retries=3) as client:
        reply, _ = client.edit(*_edit_request(1))
    assert reply.items[0].error is None
    # the first attempt timed out; a retry on a fresh socket got the answer
    assert service.tail().count("no reply") == 0  # the server side logs nothing about client retries


def test_client_survives_a_server_restart_without_a_new_client(start_echo) -> None:

    service = start_echo()
    with Client(service.endpoint, timeout_s=2, retries=5) as client:
        _assert_normal_request_succeeds(client)
        service.stop()
        restarted = start_echo(wait=False)
        assert restarted.endpoint == service.endpoint
        _assert_normal_request_succeeds(client)


def test_gone_server_gives_a_clear_error_within_the_deadline(sockdir) -> None:

    endpoint = f"ipc://{sockdir}/nobody.sock"
    start = time.monotonic()
    with Client(endpoint, timeout_s=0.3, retries=2) as client, pytest.raises(ServiceUnavailable) as err:
        client.ping()
    elapsed = time.monotonic() - start
    assert endpoint in str(err.value) and "3 attempt(s)" in str(err.value)
    assert 0.9 <= elapsed < 0.9 + 1.0


def test_work_while_loading_is_refused_as_retryable_and_ping_says_loading(start_echo) -> None:

    service = start_echo("--load-s", "30", wait=False)
    with Client(service.endpoint, timeout_s=10, retries=0) as client:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                status = client.ping()
                break
            except ServiceUnavailable:
                continue
        assert status.state == "loading"
        with pytest.raises(RemoteError) as err:
            client.edit(*_edit_request(1))
        assert err.value.code == "loading" and err.value.retryable


def test_server_dying_mid_request_is_noticed_at_once_and_the_request_resent(start_echo) -> None:
    service = start_echo("--delay-s", "3", "--delay-count", "1")
    with Client(service.endpoint, timeout_s=60, retries=2) as client:
        done = []
        thread = threading.Thread(target=lambda: done.append(client.edit(*_edit_request(1))[0]))
        start = time.monotonic()
        thread.start()
        time.sleep(1.0)  # the request is in flight, held by the delay
        service.stop(signal.SIGKILL)
        start_echo(wait=False)  # back on the same endpoint, no delay this time
        thread.join(30)
    assert done and done[0].items[0].error is None
    assert time.monotonic() - start < 30, "the client waited for its 60 s timeout instead of resending"


# ---- one request's failure is that request's alone ---------------------------------------------

class _UnencodableOnceWorker:
    """Answers its first request with a reply the codec cannot encode, then echoes."""

    def __init__(self) -> None:
        self.echo, self.calls = EchoWorker(Limits()), 0

    def handle(self, request, blobs):
        self.calls += 1
        return (EditReply(items=[object()]), None) if self.calls == 1 else self.echo.handle(request, blobs)


def test_an_exception_while_handling_one_request_fails_it_and_the_server_keeps_serving(sockdir) -> None:
    pings = []

    def status(server):
        pings.append(1)
        if len(pings) == 1:
            raise RuntimeError("status broke")
        return echo_status(server)

    with in_process_service(f"ipc://{sockdir}/s.sock", status, _UnencodableOnceWorker()) as server, \
            Client(server.endpoint, timeout_s=5, retries=0) as client:
        with pytest.raises(RemoteError, match="internal: RuntimeError: status broke"):
            client.ping()  # raised in the main loop's own handling
        assert client.ping().state == "ready"
        with pytest.raises(RemoteError, match="internal: TypeError"):
            client.edit(*_edit_request(1))  # raised encoding the worker's reply
        _assert_normal_request_succeeds(client)


# ---- deadlines and budgets --------------------------------------------------------------------

def _edit_in_background(endpoint: str, replies: list, edit: tuple[EditRequest, Blobs] | None = None) -> threading.Thread:
    """`edit` (one item by default) sent from another thread; its reply (or the exception) goes into `replies`."""

    def send() -> None:
        try:
            with Client(endpoint, timeout_s=120, retries=0) as client:
                replies.append(client.edit(*(edit or _edit_request(1)))[0])
        except Exception as exc:  # noqa: BLE001 - the test reads it
            replies.append(exc)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def _wait_until_busy(endpoint: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    with Client(endpoint, timeout_s=5, retries=0) as client:
        while client.ping().busy == 0:
            assert time.monotonic() < deadline, f"no worker of {endpoint} became busy within {timeout_s}s"
            time.sleep(0.02)


def _timed_normal_request(endpoint: str) -> float:
    with Client(endpoint, timeout_s=10) as client:
        started = time.monotonic()
        _assert_normal_request_succeeds(client)
        return time.monotonic() - started


def test_work_that_waited_past_its_deadline_is_answered_expired_and_never_started(start_echo) -> None:
    service = start_echo("--delay-s", "2", "--delay-count", "2")
    first = _edit_in_background(service.endpoint, [])
    _wait_until_busy(service.endpoint)  # the only worker holds the first request for 2 s
    request, blobs = _edit_request(1)
    with Client(service.endpoint, timeout_s=10, retries=0) as client, pytest.raises(RemoteError) as err:
        client.edit(msgspec.structs.replace(request, deadline_s=0.5), blobs)  # the caller's deadline is kept
    assert err.value.code == "expired" and not err.value.retryable
    assert "not started" in err.value.message and "deadline_s 0.5" in err.value.message
    first.join(10)
    # never started: the second delay is still there for the next request
    assert _timed_normal_request(service.endpoint) > 1.5


def test_the_client_sends_each_attempts_wait_as_its_deadline_so_abandoned_work_is_not_started(start_echo) -> None:
    service = start_echo("--delay-s", "2", "--delay-count", "2")
    first = _edit_in_background(service.endpoint, [])
    _wait_until_busy(service.endpoint)
    with Client(service.endpoint, timeout_s=0.5, retries=0) as client, pytest.raises(ServiceUnavailable):
        client.edit(*_edit_request(1))  # waits 0.5 s, so it asks for deadline_s=0.5, then gives up
    first.join(10)
    assert _timed_normal_request(service.endpoint) > 1.5, "the abandoned request took the worker's second delay"
    assert "expired" in service.tail()


def test_a_call_budget_bounds_all_its_attempts_together(sockdir, start_echo) -> None:
    endpoint = f"ipc://{sockdir}/nobody.sock"
    start = time.monotonic()
    with Client(endpoint, timeout_s=0.3, retries=10) as client, pytest.raises(ServiceUnavailable) as err:
        client.request(Ping(), budget_s=1.0)
    assert 1.0 <= time.monotonic() - start < 1.6
    assert "4 attempt(s)" in str(err.value) and "budget of 1.0s" in str(err.value)  # 0.3 + 0.3 + 0.3 + 0.1

    service = start_echo("--delay-s", "3", "--delay-count", "1")
    with Client(service.endpoint, timeout_s=10, retries=3) as client:
        start = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="budget of 1.0s"):
            client.edit(*_edit_request(1), budget_s=1.0)
        assert time.monotonic() - start < 1.6
        _assert_normal_request_succeeds(client)  # no budget: as before


# ---- a service's life -------------------------------------------------------------------------

def _ping_until_loaded(service: ServiceProcess, timeout_s: float):
    """The first status that is not `loading` (the process must stay up meanwhile)."""
    deadline = time.monotonic() + timeout_s
    with Client(service.endpoint, timeout_s=1, retries=0) as client:
        while time.monotonic() < deadline:
            assert service.proc.poll() is None, f"the service exited with {service.proc.returncode}: {service.tail()}"
            try:
                status = client.ping()
            except ServiceUnavailable:
                continue
            if status.state != "loading":
                return status
            time.sleep(0.05)
    raise AssertionError(f"still loading after {timeout_s}s: {service.tail()}")


def _assert_failed_and_alive(service: ServiceProcess, cause: str) -> None:
    with Client(service.endpoint, timeout_s=5, retries=0) as client:
        with pytest.raises(RemoteError) as err:
            client.edit(*_edit_request(1))
        assert err.value.code == "failed" and cause in err.value.message and not err.value.retryable
        assert client.ping().state == "failed"
    assert service.proc.poll() is None


def test_a_model_that_cannot_load_leaves_the_service_up_saying_why(start_echo) -> None:
    service = start_echo("--fail-load", "no weights in /nowhere/model", wait=False)
    status = _ping_until_loaded(service, timeout_s=20)
    # the root of the exception chain is named, not the wrapper the loader raised
    assert status.state == "failed" and status.error == "OSError: no weights in /nowhere/model"
    _assert_failed_and_alive(service, status.error)
    log = service.tail().splitlines()
    assert log[-1].endswith(status.error) and sum("Traceback" in line for line in log) == 1
    service.stop()
    assert service.proc.returncode == 1


def test_the_editor_with_a_missing_model_folder_stays_up_and_names_the_folder(start_editor, sockdir,
                                                                             monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = f"{sockdir}/no-such-model"
    service = start_editor(wait=False, model=missing)
    status = _ping_until_loaded(service, timeout_s=120)
    assert status.state == "failed" and status.error.startswith("no such folder") and missing in status.error
    _assert_failed_and_alive(service, missing)


@pytest.mark.parametrize(
    "load_failure",
    [
        (OSError("We couldn't connect to 'https://huggingface.co'"),
         type("HFValidationError", (ValueError,), {})("Repo id must be in the form 'namespace/repo_name': '/m/x'."),
         "no such folder, and not a valid hub repository id: HFValidationError: Repo id must be in the form "
         "'namespace/repo_name': '/m/x'."),
        (OSError("Qwen/X does not appear to have a file named model_index.json."),
         type("LocalEntryNotFoundError", (OSError,), {})("cannot find the requested files in the local cache"),
         type("OfflineModeIsEnabled", (ConnectionError,), {})("Cannot reach https://huggingface.co/Qwen/X: offline\nmode"),
         "hub unreachable: OfflineModeIsEnabled: Cannot reach https://huggingface.co/Qwen/X: offline mode"),
        (type("RevisionNotFoundError", (OSError,), {})("Invalid rev id: nope"),
         "repository or revision not found: RevisionNotFoundError: Invalid rev id: nope"),
        (RuntimeError("loading failed"), type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory. Tried 2 GiB"),
         "out of memory: OutOfMemoryError: CUDA out of memory. Tried 2 GiB"),
        (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 9 GB"),
         "out of memory: RuntimeError: DefaultCPUAllocator: not enough memory: you tried to allocate 9 GB"),
        (FileNotFoundError(2, "No such file or directory", "/m/x/model.safetensors"),
         "no such file or folder: FileNotFoundError: [Errno 2] No such file or directory: '/m/x/model.safetensors'"),
        (ValueError("outer"), KeyError("inner"), "KeyError: 'inner'"),
    ],
    ids=["folder", "offline", "revision", "cuda-oom", "cpu-oom", "file", "other"],
)
def test_a_load_failure_is_named_by_the_root_of_its_exception_chain(load_failure) -> None:
    *chain, expected = load_failure
    for outer, inner in zip(chain, chain[1:]):
        outer.__cause__ = inner
    assert load_failure_cause(chain[0]) == expected


def test_a_load_failure_cause_is_found_in_an_implicit_chain_and_a_cyclic_one_ends() -> None:
    try:
        try:
            raise KeyError("root")
        except KeyError:
            raise ValueError("while handling")  # noqa: B904 - the implicit chain is what is tested
    except ValueError as exc:
        implicit = exc
    assert load_failure_cause(implicit) == "KeyError: 'root'"
    first, second = ValueError("a"), ValueError("b")
    first.__context__, second.__context__ = second, first
    assert load_failure_cause(first) in ("ValueError: a", "ValueError: b")


def test_sigterm_lets_a_busy_worker_finish_within_the_bound_and_answer(start_echo) -> None:
    service = start_echo("--delay-s", "1.5", "--delay-count", "1")
    replies: list = []
    thread = _edit_in_background(service.endpoint, replies)
    _wait_until_busy(service.endpoint)
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(10) == 0
    thread.join(5)
    assert isinstance(replies[0], EditReply) and replies[0].items[0].error is None, replies


def test_sigterm_while_a_worker_is_busy_past_the_bound_abandons_it_and_exits_0(start_echo) -> None:
    service = start_echo("--delay-s", "60", "--delay-count", "1")
    _edit_in_background(service.endpoint, [])
    _wait_until_busy(service.endpoint)
    started = time.monotonic()
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(15) == 0
    assert time.monotonic() - started < 8, "the stop took longer than its bound"
    assert "abandoning 1 busy worker" in service.tail()


def test_sigterm_while_the_editor_is_mid_edit_exits_0_within_the_bound(start_editor) -> None:
    service = start_editor()
    blobs = Blobs()
    slow = EditRequest([EditItem("slow", "make it blue", [blobs.add(IMAGE)], width=256, height=256)],
                       EditParams(steps=1000))  # about a minute on the tiny model on a CPU
    _edit_in_background(service.endpoint, [], (slow, blobs))
    _wait_until_busy(service.endpoint)
    time.sleep(0.5)  # inside the pipeline's denoising loop
    started = time.monotonic()
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(20) == 0, service.tail()  # used to abort: "terminate called without an active exception"
    assert time.monotonic() - started < 8
    assert "terminate called" not in service.tail()


# ---- ipc sockets ------------------------------------------------------------------------------

def test_a_second_service_on_a_live_endpoint_refuses_to_start_and_the_first_keeps_serving(start_echo) -> None:
    first = start_echo()
    second = start_echo(wait=False)
    assert second.proc.wait(15) == 2
    refusals = [line for line in second.tail().splitlines() if "held by" in line]
    assert len(refusals) == 1 and first.endpoint in refusals[0] and "echo" in refusals[0], second.tail()
    with Client(first.endpoint, timeout_s=10) as client:
        _assert_normal_request_succeeds(client)


def test_a_stale_socket_file_is_replaced_by_an_owner_only_socket(start_echo, sockdir) -> None:
    path = sockdir / "echo.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays behind with nobody listening, as after a crash
    service = start_echo()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with Client(service.endpoint, timeout_s=10) as client:
        _assert_normal_request_succeeds(client)


def test_a_file_that_is_not_a_socket_is_left_alone_and_named(sockdir) -> None:
    path = sockdir / "notes.sock"
    path.write_text("not a socket")
    assert claim_ipc_path(f"ipc://{path}") == f"a file that is not a socket ({path})"
    assert path.read_text() == "not a socket"
    assert claim_ipc_path(f"ipc://{sockdir}/nothing.sock") is None
    assert claim_ipc_path("tcp://127.0.0.1:1") is None  # bind says when a port is taken


def test_the_server_creates_its_socket_folder_private(sockdir) -> None:
    folder = sockdir / "private"
    with in_process_service(f"ipc://{folder}/s.sock", echo_status, EchoWorker(Limits())) as server, \
            Client(server.endpoint, timeout_s=5) as client:
        assert client.ping().state == "ready"
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE((folder / "s.sock").stat().st_mode) == 0o600


def test_the_default_endpoints_are_in_a_private_per_user_folder(monkeypatch, tmp_path) -> None:
    from editstack_scorer.settings import ScorerSettings

    assert ScorerSettings().endpoint == default_endpoint("scorer")  # as read when the process started
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert default_endpoint("editor") == f"ipc://{tmp_path}/editstack/editor.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_endpoint("scorer") == f"ipc:///tmp/editstack-{os.getuid()}/scorer.sock"
    assert EditorConfig().endpoints == [default_endpoint("editor")]
    assert ScorerConfig().endpoint == default_endpoint("scorer")
