"""Messages ↔ frames, and image blobs ↔ arrays. Nothing else.

Images travel as their own frames, never inside the header: raw uint8 pixels (shape and dtype in
the ImageRef) or PNG bytes. Received raw images are numpy views of the ZeroMQ frames, not copies.

Image modes on the wire: raw arrays are uint8 of shape (H, W) (grayscale), (H, W, 3) (RGB) or
(H, W, 4) (RGBA); PNG may hold any mode Pillow reads. Services work in RGB: `as_rgb` converts
grayscale by repetition and RGBA (or any other mode) by compositing onto white, and says so in a
note that goes into the item's result. Nothing is converted silently.
"""

from __future__ import annotations

import io
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


@dataclass(frozen=True)
class Limits:
    """What a service accepts; everything over it is refused with a message, never a crash."""

    max_message_bytes: int = 256 * 2**20
    max_image_px: int = 4096 * 4096
    max_batch: int = 16
    max_instruction_chars: int = 4096


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
    message, blobs = _decode(frames, _request_decoder)
    if isinstance(message, EditRequest | ScoreRequest) and len(message.items) > limits.max_batch:
        raise LimitExceeded(f"batch of {len(message.items)} items is over the limit of {limits.max_batch}")
    return message, blobs


def decode_reply(frames: Sequence[Any]) -> tuple[Reply, list[memoryview]]:
    """Check and decode a reply; raises ProtocolError naming what is wrong."""
    return _decode(frames, _reply_decoder)


def read_image(ref: ImageRef, blobs: Sequence[memoryview], limits: Limits) -> np.ndarray:
    """The image `ref` points to, as a uint8 array (a view of the frame for raw images).

    Raises ImageError for an empty, over-limit or undecodable image.
    """
    blob = blobs[ref.frame]
    if ref.encoding == "raw":
        _check_pixels(ref.shape[0], ref.shape[1], limits)
        return np.frombuffer(blob, dtype=np.uint8).reshape(ref.shape)
    try:
        with Image.open(io.BytesIO(blob)) as im:
            # the size is in the PNG header: refuse a decompression bomb before decoding it
            _check_pixels(im.height, im.width, limits)
            im.load()
            return np.asarray(im if im.mode in ("L", "RGB", "RGBA") else im.convert("RGBA"))
    except ImageError:
        raise
    except Exception as exc:  # Pillow raises many types for bad bytes
        raise ImageError(f"unreadable image: {type(exc).__name__}: {exc}") from exc


def as_rgb(array: np.ndarray) -> tuple[np.ndarray, str | None]:
    """The image as (H, W, 3) uint8, and a note when a conversion was made (None when already RGB)."""
    if array.ndim == 3 and array.shape[2] == 3:
        return array, None
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2), "converted grayscale (L) to RGB"
    rgba = Image.fromarray(array, "RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB")), "converted RGBA to RGB over white"


def read_image_file(path: str | Path) -> tuple[np.ndarray, str | None]:
    """An image file as an array to send: L, RGB and RGBA as they are (services convert and say
    so); other modes (P, CMYK, I;16…) as RGB, with a note. ImageError for a missing or bad file."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("L", "RGB", "RGBA"):
                return np.asarray(im), None
            return np.asarray(im.convert("RGB")), f"converted {im.mode} to RGB"
    except OSError as exc:  # FileNotFoundError and Pillow's UnidentifiedImageError included
        raise ImageError(f"unreadable image {path}: {exc}") from exc


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 array; deterministic for the same pixels."""
    out = io.BytesIO()
    Image.fromarray(_check_array(array)).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def _decode(frames: Sequence[Any], decoder: msgspec.msgpack.Decoder) -> tuple[Any, list[memoryview]]:
    if len(frames) < 2:
        raise ProtocolError(f"expected at least 2 frames (version, header), got {len(frames)}")
    version = bytes(_view(frames[0]))
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version[:40]!r} is not {PROTOCOL_VERSION!r}")
    try:
        message = decoder.decode(_view(frames[1]))
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"malformed header: {exc}") from exc
    blobs = [_view(f) for f in frames[2:]]
    _check_refs(message, blobs)
    return message, blobs


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
        expected = int(np.prod(ref.shape))
        if expected != blobs[ref.frame].nbytes:
            raise ProtocolError(
                f"raw image in frame {ref.frame}: shape {ref.shape} needs {expected} bytes, "
                f"frame has {blobs[ref.frame].nbytes}"
            )


def _image_refs(message: Any) -> Iterator[ImageRef]:
    if isinstance(message, EditRequest):
        yield from (item.image for item in message.items)
    elif isinstance(message, ScoreRequest):
        for item in message.items:
            yield item.source
            if item.edited is not None:
                yield item.edited
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
