"""The server loop and the Lazy Pirate client against real echo service processes."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest
import zmq

from editstack.wire.codec import Blobs, Limits, decode_reply, encode, encode_png, read_image
from editstack.wire.transport import Client
from editstack.errors import RemoteError, ServiceUnavailable
from editstack.wire.protocol import PROTOCOL_VERSION, EditItem, EditReply, EditRequest, ErrorReply, ImageRef, Ping

IMAGE = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)


def _edit_request(n: int = 2, encoding: str = "raw") -> tuple[EditRequest, Blobs]:
    blobs = Blobs()
    items = [EditItem(id=f"item-{k}", instruction="keep it", image=blobs.add(IMAGE, encoding)) for k in range(n)]
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
        reply, received = client.edit(EditRequest([EditItem("p", "x", blobs.add(png))]), blobs)
        assert bytes(received[0]) == png


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([np.random.default_rng(1).bytes(200)], "bad_message"),
        ([b"editstack/99", encode(Ping())[1]], "bad_message"),
        ([PROTOCOL_VERSION], "bad_message"),  # truncated: no header
        ([PROTOCOL_VERSION, encode(_edit_request(2)[0])[1], IMAGE.tobytes()], "bad_message"),  # one blob of two
        ([PROTOCOL_VERSION, encode(EditRequest([EditItem("a", "x", ImageRef(0, "raw", (4, 4, 3), "uint8"))]))[1],
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
            client.edit(EditRequest([EditItem("big", "x", blobs.add(big))]), blobs)
        assert err.value.code == "limit_exceeded"
        blobs = Blobs()
        wide = np.zeros((10, 200, 3), dtype=np.uint8)
        reply, _ = client.edit(EditRequest([EditItem("wide", "x", blobs.add(wide)), EditItem("ok", "x", blobs.add(IMAGE[:20, :20]))]), blobs)
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
