"""Messages ↔ frames, and image blobs ↔ arrays. Nothing else.

Images travel as their own frames, never inside the header: raw uint8 pixels (shape and dtype in
the ImageRef) or PNG bytes. Received raw images are numpy views of the ZeroMQ frames, not copies.

Image modes on the wire: raw arrays are uint8 of shape (H, W) (grayscale), (H, W, 3) (RGB) or
(H, W, 4) (RGBA); PNG may hold any mode Pillow reads. Services work in RGB: `read_image_as_rgb`
converts grayscale by repetition, RGBA and other modes with transparency by compositing onto
white, and every other mode (P, I;16, CMYK…) by Pillow's conversion, and says so in a note naming
the image's own mode that goes into the item's result. Nothing is converted silently.

A header is untrusted bytes: its size (requests) and nesting depth are bounded before msgspec
decodes it, and any failure to decode it is a ProtocolError naming the cause, never another type.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
from PIL import Image

from editstack.errors import ImageError, LimitExceeded, ProtocolError
from editstack.wire.protocol import (
    PROTOCOL_VERSION,
    EditReply,
    EditRequest,
    ImageRef,
    Reply,
    Request,
    ScoreRequest,
)

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)

# The deepest valid message nests 6 levels (ScoreReply > items > ScoreResult > Verdict > raw > list);
# 32 leaves room for additive fields. msgspec decodes by recursion, counted against Python's limit
# of 1,000 frames: a 1 KB header nested 1,000 deep would raise RecursionError in the decoder.
MAX_HEADER_DEPTH = 32
_NATIVE_MODES = ("L", "RGB", "RGBA")


@dataclass(frozen=True)
class Limits:
    """What a service accepts; everything over it is refused with a message, never a crash."""

    max_message_bytes: int = 256 * 2**20
    max_image_px: int = 4096 * 4096
    max_batch: int = 16
    max_instruction_chars: int = 4096

    @property
    def max_header_bytes(self) -> int:
        """The largest request header a full batch needs: max_batch items, each with an instruction of
        max_instruction_chars (at most 4 bytes a character in UTF-8) and 4 KiB for its id, image refs
        and numbers, plus 64 KiB for the request's own fields (parameters, negative prompt)."""
        return self.max_batch * (4 * self.max_instruction_chars + 4096) + 64 * 1024


class Blobs:
    """The image frames of a message being built; `add` returns the ImageRef to put in its header."""

    def __init__(self) -> None:
        self.frames: list[Any] = []

    def add(self, image: np.ndarray | bytes, encoding: str = "raw") -> ImageRef:
        """Add an array as raw pixels or PNG, or already-encoded PNG bytes."""
        if isinstance(image, bytes | bytearray | memoryview):
            self.frames.append(image)
            return ImageRef(frame=len(self.frames) - 1, encoding="png")
        array = _check_array(image)
        if encoding == "png":
            self.frames.append(encode_png(array))
            return ImageRef(frame=len(self.frames) - 1, encoding="png")
        if encoding != "raw":
            raise ValueError(f"image encoding must be 'raw' or 'png', got {encoding!r}")
        self.frames.append(np.ascontiguousarray(array))
        return ImageRef(frame=len(self.frames) - 1, encoding="raw", shape=array.shape, dtype="uint8")


def encode(message: Request | Reply, blobs: Blobs | None = None) -> list[Any]:
    """Frames for `message`: [version][header][blob 0][blob 1]…"""
    return [PROTOCOL_VERSION, _encoder.encode(message), *(blobs.frames if blobs else ())]


def decode_request(frames: Sequence[Any], limits: Limits) -> tuple[Request, list[memoryview]]:
    """Check and decode a request; raises ProtocolError (or LimitExceeded) naming what is wrong."""
    size = sum(_view(f).nbytes for f in frames)
    if size > limits.max_message_bytes:
        raise LimitExceeded(f"message of {size} bytes is over the limit of {limits.max_message_bytes} bytes")
    message, blobs = _decode(frames, _request_decoder, limits.max_header_bytes)
    if isinstance(message, EditRequest | ScoreRequest):
        if len(message.items) > limits.max_batch:
            raise LimitExceeded(f"batch of {len(message.items)} items is over the limit of {limits.max_batch}")
        if message.deadline_s is not None and not message.deadline_s >= 0:  # NaN included
            raise ProtocolError(f"field 'deadline_s': {message.deadline_s} is not a number of seconds >= 0")
    return message, blobs


def decode_reply(frames: Sequence[Any]) -> tuple[Reply, list[memoryview]]:
    """Check and decode a reply; raises ProtocolError naming what is wrong."""
    return _decode(frames, _reply_decoder, None)


def read_image(ref: ImageRef, blobs: Sequence[memoryview], limits: Limits) -> np.ndarray:
    """The image `ref` points to, as a uint8 array (a view of the frame for raw images); a PNG of a
    mode other than L, RGB or RGBA as RGBA (`read_image_as_rgb` names that mode in its note).

    Raises ImageError for an empty, over-limit or undecodable image.
    """
    if ref.encoding == "raw":
        _check_pixels(ref.shape[0], ref.shape[1], limits)
        return np.frombuffer(blobs[ref.frame], dtype=np.uint8).reshape(ref.shape)
    with _open_png(blobs[ref.frame], limits) as im:
        return np.asarray(im if im.mode in _NATIVE_MODES else im.convert("RGBA"))


def read_image_as_rgb(ref: ImageRef, blobs: Sequence[memoryview], limits: Limits) -> tuple[np.ndarray, str | None]:
    """The image `ref` points to as (H, W, 3) uint8, and a note naming the conversion made from the
    image's own mode (None when it was RGB). ImageError as `read_image`."""
    if ref.encoding == "raw":
        return as_rgb(read_image(ref, blobs, limits))
    with _open_png(blobs[ref.frame], limits) as im:
        array, note = _flatten(im)
    return (array, note) if note else as_rgb(array)


def as_rgb(array: np.ndarray) -> tuple[np.ndarray, str | None]:
    """A grayscale, RGB or RGBA array as (H, W, 3) uint8, and a note when a conversion was made
    (None when already RGB)."""
    if array.ndim == 3 and array.shape[2] == 3:
        return array, None
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2), "converted grayscale (L) to RGB"
    return _over_white(Image.fromarray(array, "RGBA")), "converted RGBA to RGB over white"


def read_image_file(path: str | Path) -> tuple[np.ndarray, str | None]:
    """An image file as an array to send: L, RGB and RGBA as they are (services convert and say
    so); other modes (P, CMYK, I;16…) as RGB, with a note. ImageError for a missing or bad file."""
    try:
        with Image.open(path) as im:
            im.load()
            return _flatten(im)
    except OSError as exc:  # FileNotFoundError and Pillow's UnidentifiedImageError included
        raise ImageError(f"unreadable image {path}: {exc}") from exc


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 array; deterministic for the same pixels."""
    out = io.BytesIO()
    Image.fromarray(_check_array(array)).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def _open_png(blob: memoryview, limits: Limits) -> Image.Image:
    """The PNG in `blob`, decoded; ImageError for an empty, over-limit or undecodable image."""
    try:
        im = Image.open(io.BytesIO(blob))
        # the size is in the PNG header: refuse a decompression bomb before decoding it
        _check_pixels(im.height, im.width, limits)
        im.load()
        return im
    except ImageError:
        raise
    except Exception as exc:  # Pillow raises many types for bad bytes
        raise ImageError(f"unreadable image: {type(exc).__name__}: {exc}") from exc


def _flatten(im: Image.Image) -> tuple[np.ndarray, str | None]:
    """L, RGB and RGBA as they are; any other mode as RGB (over white where it has transparency),
    with a note naming that mode."""
    if im.mode in _NATIVE_MODES:
        return np.asarray(im), None
    if im.mode in ("LA", "La", "PA", "RGBa") or "transparency" in im.info:
        return _over_white(im.convert("RGBA")), f"converted {im.mode} to RGB over white"
    return np.asarray(im.convert("RGB")), f"converted {im.mode} to RGB"


def _over_white(rgba: Image.Image) -> np.ndarray:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))


def _decode(frames: Sequence[Any], decoder: msgspec.msgpack.Decoder,
            max_header_bytes: int | None) -> tuple[Any, list[memoryview]]:
    if len(frames) < 2:
        raise ProtocolError(f"expected at least 2 frames (version, header), got {len(frames)}")
    version = bytes(_view(frames[0]))
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version[:40]!r} is not {PROTOCOL_VERSION!r}")
    header = _view(frames[1])
    if max_header_bytes is not None and header.nbytes > max_header_bytes:
        raise LimitExceeded(f"header of {header.nbytes} bytes is over the limit of {max_header_bytes} bytes")
    _check_depth(header)
    try:
        message = decoder.decode(header)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"malformed header: {exc}") from exc
    except UnicodeDecodeError as exc:  # msgspec passes Python's own error up for a string that is not UTF-8
        raise ProtocolError(f"malformed header: invalid UTF-8 in a string: {exc}") from exc
    except Exception as exc:  # whatever else the decoder raises on hostile bytes is the message's fault
        raise ProtocolError(f"malformed header: {type(exc).__name__}: {exc}") from exc
    blobs = [_view(f) for f in frames[2:]]
    _check_refs(message, blobs)
    return message, blobs


# msgpack type bytes (https://github.com/msgpack/msgpack/blob/master/spec.md) that `_check_depth`
# steps over: payload bytes of fixed-size values; width of the length field of str, bin and ext
# (ext adds a type byte); width of the count field of array (1 value each) and map (2 values each)
_FIXED_PAYLOAD = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8,
                  0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8, 0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17}
_LENGTH_WIDTH = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4, 0xC7: 1, 0xC8: 2, 0xC9: 4}
_EXT = (0xC7, 0xC8, 0xC9)
_COUNT_WIDTH = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}


def _check_depth(header: memoryview) -> None:
    """ProtocolError when the msgpack value in `header` nests containers deeper than MAX_HEADER_DEPTH.

    One pass over the bytes that steps over strings and scalars by their lengths and counts the values
    each open container still holds; whatever else is wrong with the bytes is left for msgspec to name.
    """
    data = header.tobytes()
    open_values: list[int] = []  # per open container, the values still to come
    pos = 0
    while pos < len(data):
        byte = data[pos]
        pos += 1
        values = 0
        if 0x80 <= byte <= 0x8F:
            values = 2 * (byte & 0x0F)
        elif 0x90 <= byte <= 0x9F:
            values = byte & 0x0F
        elif 0xA0 <= byte <= 0xBF:
            pos += byte & 0x1F
        elif byte in _FIXED_PAYLOAD:
            pos += _FIXED_PAYLOAD[byte]
        elif byte in _LENGTH_WIDTH:
            width = _LENGTH_WIDTH[byte]
            pos += width + int.from_bytes(data[pos:pos + width], "big") + (1 if byte in _EXT else 0)
        elif byte in _COUNT_WIDTH:
            width, per_count = _COUNT_WIDTH[byte]
            values = per_count * int.from_bytes(data[pos:pos + width], "big")
            pos += width
        elif byte == 0xC1:  # never used in msgpack
            return
        if values:
            open_values.append(values)
            if len(open_values) > MAX_HEADER_DEPTH:
                raise ProtocolError(f"malformed header: nested deeper than {MAX_HEADER_DEPTH} levels")
            continue
        # a complete value: it ends every container it was the last value of
        while open_values:
            open_values[-1] -= 1
            if open_values[-1]:
                break
            open_values.pop()
        if not open_values:
            return  # the top-level value is complete


def _check_refs(message: Any, blobs: list[memoryview]) -> None:
    """The header and the blob frames must match one to one; raw sizes must match their shapes."""
    refs = list(_image_refs(message))
    frames = sorted(ref.frame for ref in refs)
    if frames != list(range(len(blobs))):
        raise ProtocolError(
            f"header references frames {frames} but the message carries {len(blobs)} blob frame(s)"
        )
    for ref in refs:
        if ref.encoding != "raw":
            continue
        if ref.dtype != "uint8" or len(ref.shape) not in (2, 3) or (
            len(ref.shape) == 3 and ref.shape[2] not in (3, 4)
        ):
            raise ProtocolError(
                f"raw image in frame {ref.frame}: shape {ref.shape} dtype {ref.dtype!r} "
                "is not uint8 (H, W), (H, W, 3) or (H, W, 4)"
            )
        expected = math.prod(ref.shape)  # Python ints: a hostile shape cannot overflow to the frame's size
        if expected != blobs[ref.frame].nbytes:
            raise ProtocolError(
                f"raw image in frame {ref.frame}: shape {ref.shape} needs {expected} bytes, "
                f"frame has {blobs[ref.frame].nbytes}"
            )


def _image_refs(message: Any) -> Iterator[ImageRef]:
    if isinstance(message, EditRequest):
        for item in message.items:
            yield from item.images
    elif isinstance(message, ScoreRequest):
        for item in message.items:
            yield from item.sources
            if item.edited is not None:
                yield item.edited
            yield from item.references
    elif isinstance(message, EditReply):
        yield from (r.image for r in message.items if r.image is not None)


def _check_array(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"image array must be uint8 (H, W), (H, W, 3) or (H, W, 4); got {array.dtype} {array.shape}")
    return array


def _check_pixels(height: int, width: int, limits: Limits) -> None:
    if height <= 0 or width <= 0:
        raise ImageError(f"empty image of {width}x{height} pixels")
    if height * width > limits.max_image_px:
        raise ImageError(f"image of {width}x{height} = {width * height} pixels is over the limit of {limits.max_image_px}")


def _view(frame: Any) -> memoryview:
    # zmq.Frame (copy=False receive) exposes .buffer; bytes and arrays are buffers already
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
