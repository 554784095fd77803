"""The wire protocol: every message type, by direction.

A message is one ZeroMQ multipart message::

    frame 0   PROTOCOL_VERSION                    b"editstack/1"
    frame 1   header                              msgpack of one tagged Struct below ("op" names it)
    frame 2+  blobs                               one per image: raw uint8 pixels or PNG bytes,
                                                  referenced from the header by ImageRef.frame (0 = frame 2)

Messages by direction (the "op" tag is the wire name; renaming a class never changes the wire):

    client → service            service → client
    ping     Ping               status        Status (state "loading" until the model is ready)
    edit     EditRequest        edit_reply    EditReply (one EditResult per item, same order)
    score    ScoreRequest       score_reply   ScoreReply (one ScoreResult per item, same order)
                                error         ErrorReply (the message as a whole was refused)

A service's states: loading → ready. `ping` is answered in both; work requests made while loading
get ErrorReply(code="loading", retryable=True). One bad item never fails its batch: it gets an
ItemError in its result, and never a made-up image or score.

Compatibility: adding a field with a default is additive; anything else bumps PROTOCOL_VERSION.
"""

from __future__ import annotations

from typing import Literal

import msgspec

PROTOCOL_VERSION = b"editstack/1"

ServiceState = Literal["loading", "ready"]
ImageEncoding = Literal["raw", "png"]


class ImageRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where an image's bytes are: blob `frame`, raw uint8 pixels of `shape` (H, W[, C]) or a PNG."""

    frame: int
    encoding: ImageEncoding
    shape: tuple[int, ...] = ()
    dtype: str = ""


class ItemError(msgspec.Struct, frozen=True):
    """Why one item failed: a short machine `code`, a message naming the cause, raw judge output if any."""

    code: str
    message: str
    raw: list[str] = []


# ---- client → service -------------------------------------------------------------------------

class Ping(msgspec.Struct, tag="ping", tag_field="op", frozen=True):
    """Ask for the service's state and what it serves."""


class EditItem(msgspec.Struct, frozen=True):
    """One edit: the source image, the instruction, its seed and optional output size."""

    id: str
    instruction: str
    image: ImageRef
    seed: int = 0
    width: int | None = None
    height: int | None = None


class EditParams(msgspec.Struct, frozen=True):
    """Sampling parameters shared by a batch; None means the service's configured default."""

    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None


class EditRequest(msgspec.Struct, tag="edit", tag_field="op", frozen=True):
    items: list[EditItem]
    params: EditParams = EditParams()


class ScoreItem(msgspec.Struct, frozen=True):
    """One judgement: source and edited images and the instruction the edit followed."""

    id: str
    instruction: str
    source: ImageRef
    edited: ImageRef | None = None


class ScoreRequest(msgspec.Struct, tag="score", tag_field="op", frozen=True):
    items: list[ScoreItem]
    mode: str | None = None
    rubric: str | None = None


# ---- service → client -------------------------------------------------------------------------

class Status(msgspec.Struct, tag="status", tag_field="op", frozen=True):
    """The answer to ping: what the service is, what it serves and whether it is ready."""

    service: str
    state: ServiceState
    model: str
    revision: str
    device: str
    protocol: str = PROTOCOL_VERSION.decode()
    versions: dict[str, str] = {}
    workers: int = 1  # loaded model workers
    busy: int = 0  # workers handling a request right now
    details: dict[str, str] = {}
    error: str = ""


class EditResult(msgspec.Struct, frozen=True):
    """One item's outcome: an edited image, or an error; `notes` reports conversions made."""

    id: str
    image: ImageRef | None = None
    error: ItemError | None = None
    elapsed_s: float = 0.0
    notes: list[str] = []


class EditReply(msgspec.Struct, tag="edit_reply", tag_field="op", frozen=True):
    items: list[EditResult]


class ScoreResult(msgspec.Struct, frozen=True):
    """One item's judgement, with the rubric that produced it and the judge's raw output.

    sub_scores are 0–10; sc, pq and overall follow the rule written in `aggregation`.
    score_mass (logits mode) is the probability the judge put on score tokens, per question.
    raw is the judge's own output: logits mode, per question the probabilities of the answers
    0..10; generate mode, per question group the reply text of every attempt.
    """

    id: str
    error: ItemError | None = None
    rubric_id: str = ""
    rubric_version: str = ""
    mode: str = ""
    sub_scores: dict[str, float] = {}
    sc: float | None = None
    pq: float | None = None
    overall: float | None = None
    aggregation: str = ""
    score_mass: dict[str, float] = {}
    raw: dict[str, list[float | str]] = {}
    attempts: int = 0
    elapsed_s: float = 0.0
    notes: list[str] = []


class ScoreReply(msgspec.Struct, tag="score_reply", tag_field="op", frozen=True):
    items: list[ScoreResult]


class ErrorReply(msgspec.Struct, tag="error", tag_field="op", frozen=True):
    """The request as a whole was refused; `retryable` says whether sending it again may work."""

    code: str
    message: str
    retryable: bool = False


Request = Ping | EditRequest | ScoreRequest
Reply = Status | EditReply | ScoreReply | ErrorReply
