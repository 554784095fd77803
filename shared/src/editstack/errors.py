"""The exception tree, in one place.

    EditstackError                  base of everything editstack raises on purpose
    ├── ProtocolError               a message that breaks the wire rules (version, header, frames)
    │   └── LimitExceeded           a message, batch or image over a configured limit
    ├── ImageError                  one image cannot be decoded or converted (an item error)
    ├── ItemFailure                 a service cannot serve one item: carries its ItemError
    ├── ServiceUnavailable          no reply from an endpoint within the client's deadline
    ├── AuthenticationRefused       a tcp endpoint refused this client's CURVE key (or the keys do not match)
    ├── ServiceNotReady             the runner's services did not all become ready (one line each)
    ├── RemoteError                 the service answered with an error reply (code + message)
    ├── StageFailure                the runner gave up on a whole batch: carries the ItemError
    ├── SettingsError               a service's environment variable has an unusable value
    ├── ConfigError                 a run config or flag has an unusable value
    ├── DatasetError                a dataset is unreadable, or has problems under strict=True
    └── RunFolderError              a folder is not a readable run folder

Server side, ProtocolError becomes an error reply and the server goes on; ImageError and
ItemFailure become an item error in an otherwise normal reply. Client side, ServiceUnavailable is
retryable by the caller (the service may come back); RemoteError with `retryable` False is not.
Model backends (the editor's pipeline, the judge) return an ItemFailure in a failed item's slot
instead of raising it, so one item's failure never costs its batch neighbours their results.
"""

from __future__ import annotations

from collections.abc import Sequence

from editstack.wire.protocol import ErrorCode, ItemError


class EditstackError(Exception):
    """Base class of every error editstack raises on purpose."""


class ProtocolError(EditstackError):
    """A message broke the wire rules; `code` goes into the error reply."""

    code = "bad_message"


class LimitExceeded(ProtocolError):
    """A message, batch or image is over a configured limit."""

    code = "limit_exceeded"


class ImageError(EditstackError):
    """One image cannot be decoded, is empty, or is over the pixel limit."""


class ItemFailure(EditstackError):
    """One item cannot be served; becomes an ItemError in its result."""

    def __init__(self, code: ErrorCode, message: str, raw: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.error = ItemError(code=code, message=message, raw=list(raw))


class StageFailure(ItemFailure):
    """A whole batch could not be served (service gone past its deadline, or refused the batch)."""


class SettingsError(EditstackError):
    """An environment variable has a value its setting cannot take."""


class ConfigError(EditstackError):
    """The config file or a flag has a value the run cannot take."""


class DatasetError(EditstackError):
    """A dataset has problems (all listed in `problems`) and the caller asked for strictness, or
    its source cannot be read at all."""

    def __init__(self, problems: Sequence[object]) -> None:
        self.problems = tuple(problems)
        listing = "\n".join(f"  {problem}" for problem in self.problems)
        super().__init__(f"{len(self.problems)} dataset problem(s):\n{listing}")


class RunFolderError(EditstackError):
    """The folder is not a readable run folder (no manifest.json, or one that does not parse)."""


class ServiceUnavailable(EditstackError):
    """No reply from `endpoint` after `attempts` tries within `elapsed_s` seconds (the call's wall-time
    budget, when it had one and it was spent first)."""

    def __init__(self, endpoint: str, attempts: int, elapsed_s: float, budget_s: float | None = None) -> None:
        spent = f": the call's budget of {budget_s:.1f}s is spent" if budget_s is not None else ""
        super().__init__(
            f"service unavailable: no reply from {endpoint} after {attempts} attempt(s) in {elapsed_s:.1f}s{spent}"
        )
        self.endpoint = endpoint
        self.attempts = attempts
        self.elapsed_s = elapsed_s


class AuthenticationRefused(EditstackError):
    """`endpoint` failed the CURVE handshake: it does not admit this client's key, or one side has no keys."""

    def __init__(self, endpoint: str, detail: str) -> None:
        super().__init__(f"authentication refused by {endpoint}: {detail}")
        self.endpoint = endpoint


class ServiceNotReady(EditstackError):
    """A run cannot start: a service never answered, failed to load its model, or kept loading past
    its bound; `lines` has one line per such service."""

    def __init__(self, lines: Sequence[str]) -> None:
        self.lines = tuple(lines)
        super().__init__("services not ready:\n" + "\n".join(f"  {line}" for line in self.lines))


class RemoteError(EditstackError):
    """The service answered with an error reply."""

    def __init__(self, endpoint: str, code: ErrorCode, message: str, retryable: bool) -> None:
        super().__init__(f"{endpoint} answered {code}: {message}")
        self.endpoint = endpoint
        self.code = code
        self.message = message
        self.retryable = retryable
