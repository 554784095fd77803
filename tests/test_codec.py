"""Codec round trips and refusals, in process."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from editstack.wire.codec import (
    MAX_HEADER_DEPTH,
    Blobs,
    Limits,
    as_rgb,
    decode_reply,
    decode_request,
    encode,
    encode_png,
    read_image,
    read_image_as_rgb,
    read_image_file,
)
from editstack.errors import ImageError, LimitExceeded, ProtocolError
from editstack.wire.protocol import (
    PROTOCOL_VERSION,
    EditItem,
    EditParams,
    EditReply,
    EditRequest,
    EditResult,
    ImageRef,
    Ping,
)

LIMITS = Limits()


def _image(h: int, w: int, c: int | None = 3, seed: int = 0) -> np.ndarray:
    shape = (h, w) if c is None else (h, w, c)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _round_trip(images: list[np.ndarray], encoding: str) -> list[np.ndarray]:
    blobs = Blobs()
    items = [EditItem(id=f"i{k}", instruction="x", images=[blobs.add(im, encoding)]) for k, im in enumerate(images)]
    frames = [bytes(memoryview(f).cast("B")) if isinstance(f, np.ndarray) else f for f in encode(EditRequest(items), blobs)]
    request, received = decode_request(frames, LIMITS)
    return [read_image(item.images[0], received, LIMITS) for item in request.items]


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
        ([PROTOCOL_VERSION, encode(EditRequest([EditItem("a", "x", [ImageRef(0, "raw", (2, 2, 3), "uint8")])]))[1]],
         "carries 0 blob"),
        ([PROTOCOL_VERSION, encode(EditRequest([EditItem("a", "x", [ImageRef(0, "raw", (2, 2, 3), "uint8")])]))[1],
          b"\x00" * 11], "needs 12 bytes"),
        ([PROTOCOL_VERSION, encode(EditRequest([EditItem("a", "x", [ImageRef(0, "raw", (2, 2, 3), "float32")])]))[1],
          b"\x00" * 12], "is not uint8"),
    ],
)
def test_malformed_messages_are_refused_naming_the_cause(frames: list[bytes], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_request(frames, LIMITS)


def test_limits_on_message_size_and_batch() -> None:
    blobs = Blobs()
    items = [EditItem(id=str(k), instruction="x", images=[blobs.add(_image(8, 8))]) for k in range(3)]
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


def _deep_ping(depth: int) -> bytes:
    """A ping whose unknown field `x` holds arrays nested `depth` deep: 1 KB that msgspec skips by recursion."""
    return b"\x82\xa2op\xa4ping\xa1x" + b"\x91" * depth + b"\xc0"


def test_deeply_nested_header_is_refused_before_decoding_naming_the_depth() -> None:
    for decode in (lambda frames: decode_request(frames, LIMITS), decode_reply):
        with pytest.raises(ProtocolError, match=f"nested deeper than {MAX_HEADER_DEPTH} levels"):
            decode([PROTOCOL_VERSION, _deep_ping(1000)])
    # the bound counts the ping's own map: arrays to MAX_HEADER_DEPTH - 1 deep are within it
    assert decode_request([PROTOCOL_VERSION, _deep_ping(MAX_HEADER_DEPTH - 1)], LIMITS)[0] == Ping()
    with pytest.raises(ProtocolError, match="nested deeper"):
        decode_request([PROTOCOL_VERSION, _deep_ping(MAX_HEADER_DEPTH)], LIMITS)


def test_header_over_its_size_bound_is_refused_before_decoding() -> None:
    limits = Limits(max_batch=1, max_instruction_chars=10)
    long_prompt = EditRequest([], EditParams(negative_prompt="n" * limits.max_header_bytes))
    with pytest.raises(LimitExceeded, match=f"header of .* bytes is over the limit of {limits.max_header_bytes}"):
        decode_request(encode(long_prompt), limits)
    # a full batch of longest instructions (4 bytes a character in UTF-8) is within the bound
    blobs = Blobs()
    items = [EditItem(id="i" * 200, instruction="天" * LIMITS.max_instruction_chars, images=[blobs.add(_image(2, 2))],
                      seed=2**63 - 1, width=2**31, height=2**31) for _ in range(LIMITS.max_batch)]
    frames = [bytes(memoryview(f).cast("B")) if isinstance(f, np.ndarray) else f for f in encode(EditRequest(items), blobs)]
    assert len(decode_request(frames, LIMITS)[0].items) == LIMITS.max_batch


@pytest.mark.parametrize("field", ["id", "instruction"])
def test_invalid_utf8_in_an_item_string_is_a_malformed_header(field: str) -> None:
    item = EditItem(id="MARKER" if field == "id" else "a", instruction="MARKER" if field == "instruction" else "x",
                    images=[ImageRef(0, "raw", (1, 1, 3), "uint8")])
    header = encode(EditRequest([item]))[1].replace(b"MARKER", b"\xff\xfe\xed\xa0\x80!")  # bad start byte, a surrogate
    with pytest.raises(ProtocolError, match="malformed header: invalid UTF-8"):
        decode_request([PROTOCOL_VERSION, header, b"\x00" * 3], LIMITS)


@pytest.mark.parametrize("deadline_s", [-1.0, float("nan")])
def test_a_negative_or_nan_deadline_is_refused(deadline_s: float) -> None:
    with pytest.raises(ProtocolError, match="field 'deadline_s'"):
        decode_request(encode(EditRequest([], deadline_s=deadline_s)), LIMITS)
    assert decode_request(encode(EditRequest([], deadline_s=0.0)), LIMITS)[0].deadline_s == 0.0


def _png_of_mode(mode: str) -> bytes:
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    image = Image.fromarray(gray).convert(mode) if mode != "I;16" else Image.fromarray(gray.astype(np.uint16) * 257)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize(
    ("mode", "note"),
    [("P", "converted P to RGB"), ("I;16", "converted I;16 to RGB"), ("1", "converted 1 to RGB"),
     ("LA", "converted LA to RGB over white"), ("L", "converted grayscale (L) to RGB"),
     ("RGBA", "converted RGBA to RGB over white"), ("RGB", None)],
)
def test_png_conversion_notes_name_the_images_own_mode(tmp_path, mode: str, note: str | None) -> None:
    data = _png_of_mode(mode)
    assert Image.open(io.BytesIO(data)).mode == mode
    rgb, got = read_image_as_rgb(ImageRef(0, "png"), [memoryview(data)], LIMITS)
    assert got == note and rgb.shape == (6, 8, 3) and rgb.dtype == np.uint8
    path = tmp_path / "image.png"
    path.write_bytes(data)
    _, file_note = read_image_file(path)  # the runner's reader: L, RGB and RGBA go on unconverted
    assert file_note == (None if mode in ("L", "RGB", "RGBA") else note)


def test_a_transparent_palette_png_is_flattened_over_white_and_says_so() -> None:
    image = Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).convert("P")
    out = io.BytesIO()
    image.save(out, format="PNG", transparency=0)
    rgb, note = read_image_as_rgb(ImageRef(0, "png"), [memoryview(out.getvalue())], LIMITS)
    assert note == "converted P to RGB over white" and (rgb == 255).all()
