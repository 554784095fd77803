"""The exception tree, in one place.

    EditstackError                  base of everything editstack raises on purpose
    ├── ProtocolError               a message that breaks the wire rules (version, header, frames)
    │   └── LimitExceeded           a message, batch or image over a configured limit
    ├── ImageError                  one image cannot be decoded or converted (an item error)
    ├── ServiceUnavailable          no reply from an endpoint within the client's deadline
    └── RemoteError                 the service answered with an error reply (code + message)

Server side, ProtocolError becomes an error reply and the server goes on; ImageError becomes an
item error in an otherwise normal reply. Client side, ServiceUnavailable is retryable by the caller
(the service may come back); RemoteError with `retryable` False is not.
"""

from __future__ import annotations


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


class ServiceUnavailable(EditstackError):
    """No reply from `endpoint` after `attempts` tries within `elapsed_s` seconds."""

    def __init__(self, endpoint: str, attempts: int, elapsed_s: float) -> None:
        super().__init__(
            f"service unavailable: no reply from {endpoint} after {attempts} attempt(s) in {elapsed_s:.1f}s"
        )
        self.endpoint = endpoint
        self.attempts = attempts
        self.elapsed_s = elapsed_s


class RemoteError(EditstackError):
    """The service answered with an error reply."""

    def __init__(self, endpoint: str, code: str, message: str, retryable: bool) -> None:
        super().__init__(f"{endpoint} answered {code}: {message}")
        self.endpoint = endpoint
        self.code = code
        self.message = message
        self.retryable = retryable
