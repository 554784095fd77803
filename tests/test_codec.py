"""Codec round trips and refusals, in process."""

from __future__ import annotations

import numpy as np
import pytest

from editstack.wire.codec import Blobs, Limits, as_rgb, decode_reply, decode_request, encode, encode_png, read_image
from editstack.errors import ImageError, LimitExceeded, ProtocolError
from editstack.wire.protocol import PROTOCOL_VERSION, EditItem, EditReply, EditRequest, EditResult, ImageRef, Ping

LIMITS = Limits()


def _image(h: int, w: int, c: int | None = 3, seed: int = 0) -> np.ndarray:
    shape = (h, w) if c is None else (h, w, c)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _round_trip(images: list[np.ndarray], encoding: str) -> list[np.ndarray]:
    blobs = Blobs()
    items = [EditItem(id=f"i{k}", instruction="x", image=blobs.add(im, encoding)) for k, im in enumerate(images)]
    frames = [bytes(memoryview(f).cast("B")) if isinstance(f, np.ndarray) else f for f in encode(EditRequest(items), blobs)]
    request, received = decode_request(frames, LIMITS)
    return [read_image(item.image, received, LIMITS) for item in request.items]


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_images_of_different_sizes_round_trip_exactly(encoding: str) -> None:
    images = [_image(17, 31, seed=1), _image(64, 64, seed=2), _image(300, 200, seed=3)]
    for sent, got in zip(images, _round_trip(images, encoding), strict=True):
        assert got.shape == sent.shape and got.dtype == np.uint8
        assert np.array_equal(got, sent)


def test_raw_receive_is_a_view_of_the_frame_not_a_copy() -> None:
    blobs = Blobs()
    ref = blobs.add(_image(8, 8))
    frame = bytearray(blobs.frames[0].tobytes())
    array = read_image(ref, [memoryview(frame)], LIMITS)
    frame[0] ^= 0xFF
    assert array[0, 0, 0] == frame[0]


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_grayscale_and_rgba_keep_their_mode_and_convert_to_rgb_with_a_note(encoding: str) -> None:
    gray, rgba = _image(10, 12, None), _image(10, 12, 4)
    got_gray, got_rgba = _round_trip([gray, rgba], encoding)
    assert np.array_equal(got_gray, gray) and np.array_equal(got_rgba, rgba)
    rgb, note = as_rgb(got_gray)
    assert rgb.shape == (10, 12, 3) and np.array_equal(rgb[:, :, 1], gray) and "grayscale" in note
    opaque = rgba.copy()
    opaque[:, :, 3] = 255
    rgb, note = as_rgb(opaque)
    assert np.array_equal(rgb, opaque[:, :, :3]) and "RGBA" in note
    assert as_rgb(_image(4, 4))[1] is None


def test_non_uint8_or_odd_channel_arrays_are_rejected_when_sent() -> None:
    with pytest.raises(ValueError, match="uint8"):
        Blobs().add(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        Blobs().add(np.zeros((4, 4, 2), dtype=np.uint8))


def test_empty_batch_round_trips() -> None:
    request, blobs = decode_request(encode(EditRequest(items=[])), LIMITS)
    assert request == EditRequest(items=[]) and blobs == []
    reply, _ = decode_reply(encode(EditReply(items=[])))
    assert reply == EditReply(items=[])


def test_reply_with_images_round_trips() -> None:
    blobs = Blobs()
    reply = EditReply(items=[EditResult(id="a", image=blobs.add(_image(5, 6))), EditResult(id="b")])
    frames = [f.tobytes() if isinstance(f, np.ndarray) else f for f in encode(reply, blobs)]
    got, received = decode_reply(frames)
    assert got == reply and np.array_equal(read_image(got.items[0].image, received, LIMITS), _image(5, 6))


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        ([PROTOCOL_VERSION], "at least 2 frames"),
        ([b"editstack/0", encode(Ping())[1]], "protocol version"),
        ([PROTOCOL_VERSION, b"\xc1garbage"], "malformed header"),
        ([PROTOCOL_VERSION, encode(EditRequest([EditItem("a", "x", ImageRef(0, "raw", (2, 2, 3), "uint8"))]))[1]],
         "carries 0 blob"),
        ([PROTOCOL_VERSION, encode(EditRequest([EditItem("a", "x", ImageRef(0, "raw", (2, 2, 3), "uint8"))]))[1],
          b"\x00" * 11], "needs 12 bytes"),
        ([PROTOCOL_VERSION, encode(EditRequest([EditItem("a", "x", ImageRef(0, "raw", (2, 2, 3), "float32"))]))[1],
          b"\x00" * 12], "is not uint8"),
    ],
)
def test_malformed_messages_are_refused_naming_the_cause(frames: list[bytes], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_request(frames, LIMITS)


def test_limits_on_message_size_and_batch() -> None:
    blobs = Blobs()
    items = [EditItem(id=str(k), instruction="x", image=blobs.add(_image(8, 8))) for k in range(3)]
    with pytest.raises(LimitExceeded, match="bytes is over the limit"):
        decode_request(encode(EditRequest(items), blobs), Limits(max_message_bytes=100))
    with pytest.raises(LimitExceeded, match="batch of 3"):
        decode_request(encode(EditRequest(items), blobs), Limits(max_batch=2))


def test_pixel_limit_and_bad_png_are_item_errors() -> None:
    limits = Limits(max_image_px=100)
    with pytest.raises(ImageError, match="over the limit of 100"):
        read_image(ImageRef(0, "png"), [memoryview(encode_png(_image(11, 10)))], limits)
    with pytest.raises(ImageError, match="unreadable image"):
        read_image(ImageRef(0, "png"), [memoryview(b"\x89PNG\r\n\x1a\nnot really")], LIMITS)
    with pytest.raises(ImageError, match="empty image"):
        read_image(ImageRef(0, "raw", (0, 4, 3), "uint8"), [memoryview(b"")], LIMITS)
