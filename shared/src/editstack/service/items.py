"""Per item, what both services share: the input checks made before the model sees an item, and
the item's error when it fails. A failure names the item, the field and the cause, and fails that
item alone."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from editstack.errors import ImageError, ItemFailure
from editstack.wire.codec import Limits, read_image_as_rgb
from editstack.wire.protocol import ImageRef, ItemError


def read_rgb(item_id: str, field: str, ref: ImageRef | None, blobs: Sequence[memoryview], limits: Limits,
             notes: list[str]) -> np.ndarray:
    """The item's image as RGB; a conversion is appended to `notes`; ItemFailure names item and field."""
    if ref is None:
        raise ItemFailure("missing_image", f"item {item_id!r} field {field!r}: no image was sent")
    try:
        rgb, note = read_image_as_rgb(ref, blobs, limits)
    except ImageError as exc:
        raise ItemFailure("bad_image", f"item {item_id!r} field {field!r}: {exc}") from exc
    if note:
        notes.append(f"{field}: {note}")
    return rgb


def require_instruction(item_id: str, instruction: str, limits: Limits) -> str:
    """The instruction, unless it is empty or longer than the limit (a long one would hold a worker
    for minutes while every other request waits)."""
    if not instruction.strip():
        raise ItemFailure("bad_instruction", f"item {item_id!r} field 'instruction': empty instruction")
    return require_within(item_id, "instruction", instruction, limits)


def require_within(item_id: str, field: str, text: str, limits: Limits) -> str:
    """`text`, unless it is longer than the limit on an item's texts (instruction, reference, explanation)."""
    if len(text) > limits.max_instruction_chars:
        raise ItemFailure("limit_exceeded", f"item {item_id!r} field {field!r}: {len(text)} characters "
                                            f"is over the limit of {limits.max_instruction_chars}")
    return text


def item_error(item_id: str, failure: Exception) -> ItemError:
    """The wire error of a failed item: a backend's coded ItemFailure keeps its code (and raw output);
    any other exception is a defect, "internal"."""
    if isinstance(failure, ItemFailure):
        return ItemError(failure.error.code, f"item {item_id!r}: {failure.error.message}", raw=failure.error.raw)
    return ItemError("internal", f"item {item_id!r}: {type(failure).__name__}: {failure}")
