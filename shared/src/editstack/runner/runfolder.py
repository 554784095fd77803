"""The run folder: its layout and the schema of everything it holds, in one place.

    runs/<name>/
      config.yaml        the resolved config
      manifest.json      a `Manifest`: what produced the run (services, versions, seeds, times)
      edits/<category>/<id>.png
      results.jsonl      one `ItemRecord` per line, appended and flushed as each item finishes
      report.md, report.html, summary.json, summary.csv, summary.meta.json
      gallery/<category>-<n>.html, thumbs/<hash>.jpg   report.html's gallery pages and their thumbnails
      .lock              held by the runner writing the folder (`RunFolderLock`)

The runner is the folder's only writer (the lock refuses a second one); it builds records and the manifest from these types only,
and resume and the reports read them back through the same types. Every record and the manifest
carry `schema` (SCHEMA_VERSION): a reader refuses another version, and a line or a manifest that
does not fit is an error naming the file, the line and the field (msgspec's `$.path`).

Every file but the journal is written atomically (temp file + rename). The journal is
append-only; a crash can only tear its last line, which `Journal.load` drops.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import logging
import math
import os
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from editstack.errors import RunFolderError
from editstack.runner.config import RunConfig
from editstack.runner.datasets import Reference
from editstack.runner.files import remove_partials, write_atomic, write_if_changed
from editstack.wire.protocol import ErrorCode, Identity, Status, Usage, Verdict

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
RESULTS_NAME = "results.jsonl"
MANIFEST_NAME = "manifest.json"
CONFIG_NAME = "config.yaml"
LOCK_NAME = ".lock"

Stage = Literal["edit", "score"]
ItemStatus = Literal["scored", "edited", "failed"]


def _check_schema(schema: int, what: str) -> None:
    if schema != SCHEMA_VERSION:
        raise ValueError(f"{what} has schema version {schema}; this editstack reads version {SCHEMA_VERSION}")


# ---- results.jsonl -----------------------------------------------------------------------------

class EditOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """The edit stage's part of a record. `path` is relative to the run folder, or absolute for an
    existing edit scored in place (`existing`); None when the edit failed."""

    status: Literal["ok", "failed", "existing"]
    path: str | None = None
    seed: int | None = None


class Failure(msgspec.Struct, frozen=True, kw_only=True):
    """Why an item failed: the stage, the code (the protocol's list), the cause, raw judge output."""

    stage: Stage
    code: ErrorCode
    message: str
    raw: list[str] = []


class Elapsed(msgspec.Struct, frozen=True, kw_only=True):
    """Seconds the services spent on the item (a batch's time shared among its items)."""

    edit_s: float = 0.0
    score_s: float = 0.0


class JudgeIdentity(Identity, frozen=True, kw_only=True):
    """The judge that produced a verdict: its model, and the rubric and mode it judged with."""

    rubric_id: str = ""
    rubric_version: str = ""
    mode: str = ""


class ItemRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One item's outcome: the item as it was read, its edit, its verdict or its failure, and what
    produced them. A later record of the same id supersedes an earlier one."""

    schema: int
    id: str
    category: str
    instruction: str
    language: str | None = None
    sources: list[str]  # absolute paths of the source images, in the benchmark's order
    references: list[Reference] = []  # reference images (absolute paths), texts, explanations
    metadata: dict[str, Any] = {}
    groups: list[str] = []  # the benchmark's groups of its category (e.g. KRIS-Bench knowledge types)
    benchmark: str = ""  # the reader that produced the item
    status: ItemStatus
    edit: EditOutcome
    score: Verdict | None = None
    error: Failure | None = None
    notes: list[str] = []  # conversions made on the way (e.g. "source: converted RGBA to RGB")
    elapsed: Elapsed = Elapsed()
    editor: Identity | None = None
    judge: JudgeIdentity | None = None
    finished_at: str
    # the judge calls made for the item's score (None: none, the judge cache answered or the item
    # failed before the judge) and whether the cache answered (ScoreResult.cached)
    usage: Usage | None = None
    cached: bool = False

    def __post_init__(self) -> None:
        _check_schema(self.schema, "the record")
        # A scored item without finite scores, or a failure without its cause, would put a made-up
        # number or an unexplained hole in the tables.
        if self.status == "scored":
            if self.score is None:
                raise ValueError("status is 'scored' but score is null")
            values = {"sc": self.score.sc, "pq": self.score.pq, "overall": self.score.overall,
                      **{f"sub_scores.{k}": v for k, v in self.score.sub_scores.items()}}
            for name, value in values.items():
                if value is not None and not math.isfinite(value):  # sc and pq: None outside VIEScore
                    raise ValueError(f"status is 'scored' but score.{name} is {value}")
        if self.status == "failed" and self.error is None:
            raise ValueError("status is 'failed' but error is null")


@dataclass
class JournalContents:
    """What `Journal.load` read."""

    records: dict[str, ItemRecord] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    torn_last_line: bool = False


_record_decoder = msgspec.json.Decoder(ItemRecord)
_encoder = msgspec.json.Encoder()


class Journal:
    """results.jsonl: one ItemRecord per line, keyed by its id; thread-safe appends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def load(self) -> JournalContents:
        """Records by id (a later record of an id wins). A last line that is not JSON (torn by a
        crash) is dropped with a warning; any other line that does not fit the schema is listed in
        `problems` with its line number and field, and its item counts as not done."""
        contents = JournalContents()
        if not self.path.exists():
            return contents
        # split on b"\n" only: str.splitlines would also split at U+2028 inside a JSON string
        lines = self.path.read_bytes().split(b"\n")
        last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = _record_decoder.decode(line)
            except msgspec.ValidationError as exc:
                contents.problems.append(f"{self.path.name} line {number}{_item_of(line)}: {exc}")
                continue
            except msgspec.DecodeError as exc:  # not JSON at all (or not UTF-8)
                if number == last:
                    contents.torn_last_line = True
                    log.warning("%s: dropped its last line %d (torn by a crash?): %s", self.path, number, exc)
                else:
                    contents.problems.append(f"{self.path.name} line {number}: not a JSON record: {exc}")
                continue
            contents.records[record.id] = record
        return contents

    def rewrite(self, records: Iterable[ItemRecord]) -> None:
        """Replace the journal with exactly `records` (atomically): how resume drops failed items.
        A journal that already holds exactly them, one line each, is left as it is: a resume with
        nothing to drop writes nothing (a torn or unterminated last line differs, so it goes)."""
        with self._lock:
            write_if_changed(self.path, b"".join(_line(r) for r in records))

    def append(self, record: ItemRecord) -> None:
        with self._lock, open(self.path, "ab") as out:
            out.write(_line(record))
            out.flush()
            os.fsync(out.fileno())


def _item_of(line: bytes) -> str:
    """" (item 'x')" for a JSON object line with an id, to name the item in a schema error."""
    try:
        data = msgspec.json.decode(line)
    except msgspec.DecodeError:
        return ""
    return f" (item {data['id']!r})" if isinstance(data, dict) and isinstance(data.get("id"), str) else ""


def _line(record: ItemRecord) -> bytes:
    return _encoder.encode(record) + b"\n"


# ---- manifest.json -----------------------------------------------------------------------------

class DatasetInfo(msgspec.Struct, frozen=True, kw_only=True):
    spec: str
    items: int  # selected
    problems: list[str] = []  # selected items the loader skipped, each with file, line, field and cause
    unselected_problems: list[str] = []  # the same for items outside the selection: listed, never counted


class RubricInfo(msgspec.Struct, frozen=True):
    id: str
    version: str  # "" until a verdict says it, for a rubric other than the scorer's default
    sha256: str = ""  # the hash of the rubric file's text


class EmbeddedTiny(msgspec.Struct, frozen=True):
    """Which services ran an embedded tiny random-weight model: then the scores mean nothing."""

    editor: bool = False
    scorer: bool = False


class RunParams(msgspec.Struct, frozen=True, kw_only=True):
    """The edit parameters the run used: the config's, or the editor's default where the config
    left one open (those are named in `from_editor_defaults`)."""

    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int
    seed_rule: str
    from_editor_defaults: list[str] = []


class Timings(msgspec.Struct, frozen=True, kw_only=True):
    """Wall seconds, and each stage's busy seconds summed over its threads: wall near the larger
    busy figure means the stages overlapped."""

    wall_s: float
    edit_busy_s: float = 0.0
    score_busy_s: float = 0.0


class Counts(msgspec.Struct, frozen=True, kw_only=True):
    """Items by status; and of the items whose score came from the scorer, how many its judge cache
    answered (hits) and how many the judge was asked for (misses)."""

    scored: int = 0
    edited: int = 0
    failed: int = 0
    cache_hits: int = 0
    cache_misses: int = 0


class EndpointUse(msgspec.Struct, frozen=True, kw_only=True):
    """One service endpoint's share of a run: the items it answered for, and its failed attempts
    (batches it took and handed back to the other endpoints: no reply, loading, busy, refused)."""

    service: str  # "editor" or "scorer"
    endpoint: str
    items: int = 0
    failed_attempts: int = 0


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    """What produced the run; `finished_at`, `timings`, `counts`, `judge_usage` and `endpoints` are
    filled in when it ends."""

    schema: int
    editstack_version: str
    git_commit: str | None = None
    started_at: str
    finished_at: str | None = None
    dataset: DatasetInfo
    config: RunConfig
    editors: list[Status] = []
    scorer: Status | None = None
    rubric: RubricInfo | None = None
    protocol: str = "viescore"  # how the benchmark judges and reports (runner/protocols.py)
    params: RunParams
    embedded_tiny: EmbeddedTiny = EmbeddedTiny()
    timings: Timings | None = None
    counts: Counts | None = None
    judge_usage: Usage | None = None  # the judge calls of every record's score, summed (ItemRecord.usage)
    endpoints: list[EndpointUse] = []

    def __post_init__(self) -> None:
        _check_schema(self.schema, "the manifest")


def read_manifest(folder: Path) -> Manifest:
    """The folder's manifest; RunFolderError naming the file and the field when it is missing or does
    not fit the schema."""
    path = Path(folder) / MANIFEST_NAME
    try:
        return msgspec.json.decode(path.read_bytes(), type=Manifest)
    except FileNotFoundError:
        raise RunFolderError(f"{path}: not found (is {folder} a run folder?)") from None
    except (OSError, msgspec.DecodeError) as exc:  # DecodeError: JSON, UTF-8 and schema errors
        raise RunFolderError(f"{path}: {exc}") from exc


def write_manifest(folder: Path, manifest: Manifest) -> None:
    write_atomic(Path(folder) / MANIFEST_NAME, msgspec.json.format(_encoder.encode(manifest)))


# ---- one writer ------------------------------------------------------------------------------------

class RunFolderLock:
    """The one-writer rule: an exclusive flock on <folder>/.lock, held while the run writes.

    The kernel releases a flock when its process dies, so the lock of a killed runner (even
    SIGKILL) is simply taken by the next one, which then removes the temporary files the killed
    writer left. The lock file stays in place (unlinking it would let a third runner lock a new
    file while a second still holds the old one) and names its holder for the refusal message.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None

    def __enter__(self) -> RunFolderLock:
        path = self.folder / LOCK_NAME
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError as exc:
            # the usual cause: Docker created a missing bind-mount folder as root
            existing = next(p for p in (self.folder.absolute(), *self.folder.absolute().parents) if p.exists())
            raise RunFolderError(
                f"cannot write the run folder {self.folder}: {exc.strerror} ({existing} is owned by uid "
                f"{existing.stat().st_uid}, this runner is uid {os.getuid()}); make it writable, e.g. "
                f"`sudo chown -R {os.getuid()} {existing}`, or choose another run folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunFolderError(f"cannot lock {path}: {exc.strerror}") from None
            raise RunFolderError(f"{self.folder} is being written by another runner ({holder}); wait for it "
                                 "to finish, or give this run another folder") from None
        os.ftruncate(fd, 0)
        started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode(), 0)
        self._fd = fd
        if removed := remove_partials(self.folder):
            log.info("%s: removed %d temporary file(s) an interrupted run left", self.folder, removed)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
