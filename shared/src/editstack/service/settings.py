"""Service settings: one typed object per service, read from its PREFIX_* environment variables.

An empty variable means the setting's default, as an unset one does (`.env` lines such as
`EDITOR_REVISION=` reach a container as empty strings). A PREFIX_* name that is no setting is
logged with the closest setting's name, since a misspelt one would otherwise be ignored silently.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from typing import ClassVar, TypeVar

import msgspec
import msgspec.inspect

from editstack.errors import SettingsError
from editstack.wire.codec import Limits
from editstack.wire.curve import ServerSecurity

log = logging.getLogger(__name__)
S = TypeVar("S", bound="LimitSettings")


class LimitSettings(msgspec.Struct, frozen=True):
    """The limits every service enforces, as <PREFIX>MAX_* settings, and how it secures a tcp endpoint
    and where it says where it listens; a service's settings extend it."""

    # PREFIX_* names that are not the service's settings but are read around it (compose reserves
    # EDITOR_GPU_IDS), so they are not reported as misspelt settings
    other_names: ClassVar[tuple[str, ...]] = ()
    # settings that changed name, old -> new: an old name still set is an error saying the new one,
    # not a warning, since the service would otherwise run on the default (a judge on the CPU)
    renamed: ClassVar[dict[str, str]] = {}

    max_message_bytes: int = Limits.max_message_bytes
    max_image_px: int = Limits.max_image_px
    max_batch: int = Limits.max_batch
    max_instruction_chars: int = Limits.max_instruction_chars
    # a tcp endpoint's CURVE keys (editstack.wire.curve): the service's .key_secret file, and the
    # folder of client .key files it admits; without them tcp is refused unless insecure_tcp is true
    curve_secret_key: str = ""
    curve_clients: str = ""
    insecure_tcp: bool = False
    # a folder where the service publishes the endpoint it bound (and its public key) for a runner to
    # find, e.g. the run folder's rendezvous/ on a Slurm cluster (editstack.wire.rendezvous); "" = none
    rendezvous: str = ""

    @property
    def limits(self) -> Limits:
        return Limits(self.max_message_bytes, self.max_image_px, self.max_batch, self.max_instruction_chars)

    @property
    def security(self) -> ServerSecurity:
        return ServerSecurity(self.curve_secret_key, self.curve_clients, self.insecure_tcp)


def device_list(devices: str) -> list[str]:
    """The devices of a comma-separated PREFIX_DEVICES value ("cuda:0, cuda:1"), one worker process each."""
    return [device.strip() for device in devices.split(",") if device.strip()]


def settings_from_env(cls: type[S], prefix: str, environ: Mapping[str, str] | None = None) -> S:
    """`cls` filled from PREFIX_FIELD variables (FIELD upper-cased), typed and checked by msgspec.

    Logs one warning for each PREFIX_* variable that names no setting; raises SettingsError naming
    the variable and its value when a value does not fit its setting, or naming the new name of a
    renamed one."""
    environ = os.environ if environ is None else environ
    for old, new in cls.renamed.items():
        if environ.get(f"{prefix}{old.upper()}"):
            raise SettingsError(f"{prefix}{old.upper()} is now {prefix}{new.upper()}; set that instead")
    fields = {f"{prefix}{name.upper()}": name for name in cls.__struct_fields__}
    known = fields.keys() | {f"{prefix}{name.upper()}" for name in cls.other_names}
    for variable in sorted(name for name in environ if name.startswith(prefix) and name not in known):
        # compared without the prefix, which every name shares and would make anything look close
        close = difflib.get_close_matches(variable.removeprefix(prefix).lower(), cls.__struct_fields__, n=1)
        log.warning("%s is not a setting, ignored%s", variable,
                    f" (did you mean {prefix}{close[0].upper()}?)" if close else "")
    values = {name: environ[variable] for variable, name in fields.items() if environ.get(variable)}
    try:
        return msgspec.convert(values, cls, strict=False)
    except msgspec.ValidationError as exc:
        name = str(exc).rpartition(" - at `$.")[2].rstrip("`")
        variable = f"{prefix}{name.upper()}"
        raise SettingsError(f"{variable}={environ[variable]!r}: {_expected(cls, name, exc)}") from None


def _expected(cls: type[msgspec.Struct], name: str, exc: msgspec.ValidationError) -> str:
    """What field `name` takes: its choices, or msgspec's "Expected `int`" without its ", got `str`"
    (every environment value is a string)."""
    kind = next(field.type for field in msgspec.inspect.type_info(cls).fields if field.name == name)
    if isinstance(kind, msgspec.inspect.LiteralType):
        return f"expected one of {', '.join(map(repr, sorted(kind.values)))}"
    message = str(exc).rpartition(" - at `$.")[0]
    return message.replace("Expected", "expected", 1).removesuffix(", got `str`")
