"""What the editor and the scorer services share around their models: settings read from the
environment, per-item image reading with errors that name the item, and the process entry point.
"""

from __future__ import annotations

import json
import logging
import os
from importlib import metadata
from pathlib import Path
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import msgspec
import numpy as np

from editstack.codec import Limits, as_rgb, read_image
from editstack.errors import ImageError, ItemFailure, SettingsError
from editstack.protocol import ImageRef, Status
from editstack.tinymodels import TINY_MARKER
from editstack.transport import Server, Worker, serve_forever

log = logging.getLogger(__name__)

S = TypeVar("S", bound=msgspec.Struct)


class LimitSettings(msgspec.Struct, frozen=True):
    """The limits every service enforces, as <PREFIX>MAX_* settings; a service's settings extend it."""

    max_message_bytes: int = Limits.max_message_bytes
    max_image_px: int = Limits.max_image_px
    max_batch: int = Limits.max_batch

    @property
    def limits(self) -> Limits:
        return Limits(self.max_message_bytes, self.max_image_px, self.max_batch)


def settings_from_env(cls: type[S], prefix: str, environ: Mapping[str, str] | None = None) -> S:
    """`cls` filled from PREFIX_FIELD variables (FIELD upper-cased), typed and checked by msgspec."""
    environ = os.environ if environ is None else environ
    values = {
        name: environ[f"{prefix}{name.upper()}"]
        for name in cls.__struct_fields__
        if f"{prefix}{name.upper()}" in environ
    }
    try:
        return msgspec.convert(values, cls, strict=False)
    except msgspec.ValidationError as exc:
        # msgspec names the field as `$.name`; say which variable that is
        raise SettingsError(f"{prefix}* settings: {exc} (fields map to {prefix}<FIELD> variables)") from exc


def read_rgb(item_id: str, field: str, ref: ImageRef | None, blobs: Sequence[memoryview], limits: Limits,
             notes: list[str]) -> np.ndarray:
    """The item's image as RGB; a conversion is appended to `notes`; ItemFailure names item and field."""
    if ref is None:
        raise ItemFailure("missing_image", f"item {item_id!r} field {field!r}: no image was sent")
    try:
        rgb, note = as_rgb(read_image(ref, blobs, limits))
    except ImageError as exc:
        raise ItemFailure("bad_image", f"item {item_id!r} field {field!r}: {exc}") from exc
    if note:
        notes.append(f"{field}: {note}")
    return rgb


def require_instruction(item_id: str, instruction: str) -> str:
    if not instruction.strip():
        raise ItemFailure("bad_instruction", f"item {item_id!r} field 'instruction': empty instruction")
    return instruction


def package_versions(*packages: str) -> dict[str, str]:
    """Installed versions of editstack and `packages`, read without importing them (ping answers
    while the model library is still being imported)."""
    import editstack

    versions = {"editstack": editstack.__version__}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def embedded_model(folder: str, build: Callable[[Path], Path]) -> str:
    """The embedded tiny model's folder, built by `build` on first use."""
    path = Path(folder).expanduser()
    if not (path / TINY_MARKER).is_file():
        log.info("building the embedded tiny model in %s", path)
    return str(build(path))


def tiny_details(folder: str) -> dict[str, str]:
    """What the embedded tiny model's marker file says, as ping details (empty before it is built)."""
    marker = Path(folder).expanduser() / TINY_MARKER
    if not marker.is_file():
        return {}
    info = json.loads(marker.read_text(encoding="utf-8"))
    return {key: str(value) for key, value in info.items() if isinstance(value, str | int | bool)}


def run_service(endpoint: str, limits: Limits, status: Callable[[Server], Status],
                loaders: Sequence[Callable[[], Worker]]) -> int:
    """Configure logging, bind `endpoint`, load the workers in the background and serve until SIGTERM."""
    logging.basicConfig(level=os.environ.get("EDITSTACK_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = Server(endpoint, lambda: status(server), limits)
    return serve_forever(server, loaders)
