"""The wire protocol: every message type, by direction.

A message is one ZeroMQ multipart message::

    frame 0   PROTOCOL_VERSION                    b"editstack/3"
    frame 1   header                              msgpack of one tagged Struct below ("op" names it)
    frame 2+  blobs                               one per image: raw pixels or PNG bytes, referenced
                                                  from the header by ImageRef.frame (0 = frame 2)

Messages by direction (the "op" tag is the wire name; renaming a class never changes the wire):

    client → service            service → client
    ping     Ping               status        Status (state "loading" until the model is ready)
    edit     EditRequest        edit_reply    EditReply (one EditResult per item, same order)
    score    ScoreRequest       score_reply   ScoreReply (one ScoreResult per item, same order)
                                error         ErrorReply (the message as a whole was refused)

A service's states: loading → ready, or loading → failed when its model cannot load (the process
stays up so that `ping` can say why: Status.error holds the root cause in one line). `ping` is
answered in every state; work requests made while loading get ErrorReply(code="loading",
retryable=True) (so does a batch whose worker process died under it: the worker reloads), while
failed ErrorReply(code="failed"). A work request may carry `deadline_s`:
a service does not start it later than that many seconds after it arrived (its client has given
up on it by then), and answers ErrorReply(code="expired") instead. One bad item never fails its batch: it gets an
ItemError in its result, and never a made-up image or score. A judgement is a `Verdict`: the same
type from the judge through this wire into the run folder's journal and the reports.

Error codes (`ErrorCode`), one list for both services and the runner:

    code               where                  meaning
    bad_message        ErrorReply             the message breaks the wire rules (version, header, frames)
    limit_exceeded     ErrorReply, ItemError  a message, batch, image or instruction over a configured limit
    loading            ErrorReply (retry)     the model is still loading
    failed             ErrorReply             the model could not load (Status.error says why)
    expired            ErrorReply             the request waited past its deadline_s; not started
    busy               ErrorReply (retry)     too many requests queued
    unsupported        ErrorReply             an operation this service does not serve
    internal           ErrorReply, ItemError  a bug or an unexpected failure in the service
    missing_image      ItemError              an image the item needs was not sent (or, runner: no file)
    bad_image          ItemError              an image cannot be decoded, or has an unusable size or mode
    bad_instruction    ItemError              an empty instruction
    bad_param          ItemError              a parameter out of its range (steps, guidance, size, mode, rubric, repeats)
    bad_input          ItemError              inputs the model cannot take (judge: image mode, instruction type)
    model_error        ItemError              the model raised on this item (e.g. CUDA out of memory)
    unparseable_reply  ItemError              generate mode: no schema-valid judge reply within the attempts
    service_unavailable  runner               no reply from the service within the stage's deadline
    io_error           runner                 an output could not be written (disk full, permissions)

Compatibility: adding a field with a default is additive; anything else bumps PROTOCOL_VERSION.
Version 2: one Verdict type inside ScoreResult, typed Status (no free `details` dict), ErrorCode,
several source images per item (EditItem.images, ScoreItem.sources).
Version 3: rubrics of other scales and rules (Verdict.scale, rubric_sha256; sc and pq only under the
VIEScore rule), and what an item is judged against (ScoreItem.references, reference_text, explanation).
"""

from __future__ import annotations

from typing import Literal

import msgspec

PROTOCOL_VERSION = b"editstack/3"

ServiceState = Literal["loading", "ready", "failed"]
ImageEncoding = Literal["raw", "png"]
JudgeMode = Literal["logits", "generate"]
ErrorCode = Literal[
    "bad_message", "limit_exceeded", "loading", "failed", "expired", "busy", "unsupported", "internal",
    "missing_image", "bad_image", "bad_instruction", "bad_param", "bad_input", "model_error", "unparseable_reply",
    "service_unavailable", "io_error",
]


class ImageRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where an image's bytes are: blob `frame`, raw pixels of `shape` (H, W[, C]) or a PNG.

    Raw pixels must have dtype "uint8" (the only one accepted); PNG blobs leave shape and dtype empty."""

    frame: int
    encoding: ImageEncoding
    shape: tuple[int, ...] = ()
    dtype: str = ""


class ItemError(msgspec.Struct, frozen=True):
    """Why one item failed: a `code` from ErrorCode, a message naming the cause, raw judge output if any."""

    code: ErrorCode
    message: str
    raw: list[str] = []


# ---- client → service -------------------------------------------------------------------------

class Ping(msgspec.Struct, tag="ping", tag_field="op", frozen=True):
    """Ask for the service's state and what it serves."""


class EditItem(msgspec.Struct, frozen=True):
    """One edit: its source images (one, or several for a multi-image edit, in the benchmark's
    order), the instruction, its seed and optional output size."""

    id: str
    instruction: str
    images: list[ImageRef]
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
    deadline_s: float | None = None  # not started later than this after arrival (None: no deadline)


class ScoreItem(msgspec.Struct, frozen=True):
    """One judgement: the source images, the edited image and the instruction the edit followed, and
    what the benchmark judges it against: reference images (a ground truth), a reference text (the
    expected outcome in words) and an explanation (the knowledge the edit should show)."""

    id: str
    instruction: str
    sources: list[ImageRef]
    edited: ImageRef | None = None
    references: list[ImageRef] = []
    reference_text: str = ""
    explanation: str = ""


class ScoreRequest(msgspec.Struct, tag="score", tag_field="op", frozen=True):
    items: list[ScoreItem]
    mode: str | None = None  # checked by the scorer, so an unknown mode fails its items with bad_param
    rubric: str | None = None
    deadline_s: float | None = None  # not started later than this after arrival (None: no deadline)
    # generate mode: judge each item this many times, each a seeded sample, and send the mean (Verdict.repeat_*)
    repeats: int = 1


# ---- service → client -------------------------------------------------------------------------

class Identity(msgspec.Struct, frozen=True, kw_only=True):
    """What produced an output: the model and how it was served (`backend`: the library and class)."""

    model: str
    revision: str = ""
    dtype: str = ""
    backend: str = ""
    embedded_tiny: bool = False  # an editstack tiny random-weight model (its folder's marker file says so)


class EditDefaults(msgspec.Struct, frozen=True, kw_only=True):
    """The editor's values for what an edit request may leave open (None size: the source's)."""

    steps: int
    guidance: float
    negative_prompt: str
    width: int | None = None
    height: int | None = None
    condition_max_px: int | None = None  # None: the pipeline's own conditioning size
    batch_size: int = 1  # items per pipeline call
    limits: dict[str, int] = {}  # the editor's limits by setting: max_message_bytes, max_image_px, ...
    offload: str = "none"  # where weights wait between uses: "none" (on the device), "model" or "group" (CPU)
    layerwise_cast: str = ""  # the transformer's weights' storage dtype (float8_e4m3fn, ...); "" = off


class ScoreDefaults(msgspec.Struct, frozen=True, kw_only=True):
    """The scorer's values for what a score request may leave open, and the default rubric's rule."""

    mode: JudgeMode
    rubric_id: str
    rubric_version: str
    aggregation: str
    batch_size: int = 1  # items per forward pass
    max_new_tokens: int | None = None  # generate mode: the reply's length limit (None: not reported)
    generate_retries: int | None = None  # generate mode: attempts after an unparseable reply
    judge_image_px: int | None = None  # the area each image is shown to the judge at; 0 = as sent
    rubric_sha256: str = ""  # the hash of the default rubric's text
    limits: dict[str, int] = {}  # the scorer's limits by setting: max_message_bytes, max_image_px, ...
    # modes this judge cannot score in, each with why (a server that returns no logprobs has no
    # logits mode); a request in one fails its items with bad_param, never switched to another mode
    unavailable_modes: dict[str, str] = {}


class Status(msgspec.Struct, tag="status", tag_field="op", frozen=True, kw_only=True):
    """The answer to ping: what the service is, what it serves and whether it is ready.

    `backend` is known once a worker has loaded; `edit_defaults` is set by editors,
    `score_defaults` by scorers."""

    service: str
    state: ServiceState
    model: str
    revision: str = ""
    dtype: str = ""
    backend: str = ""
    embedded_tiny: bool = False
    devices: list[str] = []
    protocol: str = PROTOCOL_VERSION.decode()
    versions: dict[str, str] = {}
    workers: int = 0  # loaded model workers
    busy: int = 0  # workers handling a request right now
    edit_defaults: EditDefaults | None = None
    score_defaults: ScoreDefaults | None = None
    error: str = ""

    def identity(self) -> Identity:
        return Identity(model=self.model, revision=self.revision, dtype=self.dtype, backend=self.backend,
                        embedded_tiny=self.embedded_tiny)


class EditResult(msgspec.Struct, frozen=True):
    """One item's outcome: an edited image, or an error; `notes` reports conversions made."""

    id: str
    image: ImageRef | None = None
    error: ItemError | None = None
    elapsed_s: float = 0.0
    notes: list[str] = []


class EditReply(msgspec.Struct, tag="edit_reply", tag_field="op", frozen=True):
    items: list[EditResult]


class Verdict(msgspec.Struct, frozen=True, kw_only=True):
    """The judge's verdict on one item, with the rubric that produced it and the judge's raw output.

    `sub_scores` map each rubric question the item was asked to the rubric's `scale` (lo, hi);
    `overall` (and `sc`, `pq` under the VIEScore rule, else None) follow the rule written in
    `aggregation`. `rubric_sha256` is the hash of the rubric file's text. `score_mass` (logits
    mode) is the probability the judge put on the answers lo..hi before renormalising, per question.
    `raw` is the judge's own output: in logits mode, per question the probabilities of the answers
    lo..hi; in generate mode, per group the reply texts of every attempt. `attempts` counts generate
    calls (0 in logits mode). `visual_tokens` counts the image tokens of every judge input the
    verdict took (each prompt shows its images again), after the scorer's image budget
    (ScoreDefaults.judge_image_px); 0 where the judge does not say.

    Judged K > 1 times (ScoreRequest.repeats, generate mode): `sub_scores`, `sc`, `pq` and `overall`
    are each the mean over the K repeats (so `overall` is the mean of the repeats' overalls, not
    sqrt(sc * pq) of the means), `repeat_overall` and `repeat_sub_scores` hold each repeat's own
    values in repeat order, and `raw` and `attempts` cover every repeat. Judged once: both are empty.
    """

    rubric_id: str
    rubric_version: str
    mode: JudgeMode
    sub_scores: dict[str, float]
    sc: float | None
    pq: float | None
    overall: float
    aggregation: str
    rubric_sha256: str = ""
    scale: tuple[int, int] = (0, 10)
    score_mass: dict[str, float] = {}
    raw: dict[str, list[float | str]] = {}
    attempts: int = 0
    repeat_overall: list[float] = []
    repeat_sub_scores: list[dict[str, float]] = []
    visual_tokens: int = 0


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """What the judge calls for one item cost: how many, their prompt and completion tokens as the judge
    counts them (an API server's `usage`; the transformers judge's token ids, image tokens included,
    padding not), and their seconds (a batched pass's time shared among its items)."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    judge_s: float = 0.0


class ScoreResult(msgspec.Struct, frozen=True):
    """One item's outcome: a Verdict, or an error (never both); `notes` reports conversions made.

    `cached`: the scorer's judge cache answered every judgement the item needed, so the judge was not
    asked. `usage`: the judge calls made for it now (None when none was: a cache hit, or an item
    refused before the judge)."""

    id: str
    verdict: Verdict | None = None
    error: ItemError | None = None
    elapsed_s: float = 0.0
    notes: list[str] = []
    cached: bool = False
    usage: Usage | None = None


class ScoreReply(msgspec.Struct, tag="score_reply", tag_field="op", frozen=True):
    items: list[ScoreResult]


class ErrorReply(msgspec.Struct, tag="error", tag_field="op", frozen=True):
    """The request as a whole was refused; `retryable` says whether sending it again may work."""

    code: ErrorCode
    message: str
    retryable: bool = False


Request = Ping | EditRequest | ScoreRequest
Reply = Status | EditReply | ScoreReply | ErrorReply
