"""Service settings: one typed object per service, read from its PREFIX_* environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TypeVar

import msgspec

from editstack.errors import SettingsError
from editstack.wire.codec import Limits

S = TypeVar("S", bound=msgspec.Struct)


class LimitSettings(msgspec.Struct, frozen=True):
    """The limits every service enforces, as <PREFIX>MAX_* settings; a service's settings extend it."""

    max_message_bytes: int = Limits.max_message_bytes
    max_image_px: int = Limits.max_image_px
    max_batch: int = Limits.max_batch
    max_instruction_chars: int = Limits.max_instruction_chars

    @property
    def limits(self) -> Limits:
        return Limits(self.max_message_bytes, self.max_image_px, self.max_batch, self.max_instruction_chars)


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
