"""The judge cache: judgements kept on disk by the content of their question, shared across runs.

A key is the sha256 of everything that decides a judgement: the judge (its fingerprint: backend,
model and revision or weights, server, generation limits, image budget), the rubric (id, version and
the hash of its text), the mode and the repeat index, the instruction, reference text and
explanation, and every image as the judge received it (the sha256 of its decoded pixels, with its
size), in its role and order. Only the judge's own answers are kept: a verdict, or an unparseable
reply (the judge answered, and would answer the same again); a failure to get an answer (a server
error, a timeout, a refused input) is not, so that question is asked again next time.

Layout: <folder>/<key[:2]>/<key>.json, one judgement each. An entry is written to a temporary file
beside it and renamed into place, so a reader never sees part of one, and scorers sharing the folder
may write the same key at once: each writes a whole answer to the same question and the last rename
wins. An entry that cannot be read counts as a miss and is written again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import msgspec
from PIL import Image

from editstack.errors import ItemFailure
from editstack.wire.protocol import ItemError, Verdict
from editstack_scorer.backend import ScoreJob
from editstack_scorer.rubric import Rubric

log = logging.getLogger(__name__)

# Part of every key: bump it when the way a judge is asked changes (prompt layout, message format).
_KEY_FORMAT = "editstack judge cache 1"


class _Entry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    verdict: Verdict | None = None
    failure: ItemError | None = None


_decoder = msgspec.json.Decoder(_Entry)


class JudgeCache:
    """Judgements in `folder` for the judge `fingerprint` describes."""

    def __init__(self, folder: str | Path, fingerprint: dict[str, object]) -> None:
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint

    def key(self, job: ScoreJob, mode: str, rubric: Rubric, repeat: int | None) -> str:
        """The key of asking the judge `job` with `rubric` in `mode` (repeat index `repeat`, or None)."""
        question = [
            _KEY_FORMAT, self.fingerprint, [rubric.id, rubric.version, rubric.sha256], mode, repeat,
            [job.instruction, job.reference_text, job.explanation],
            [_image_hash(image) for image in job.sources], _image_hash(job.edited),
            [_image_hash(image) for image in job.references],
        ]
        return hashlib.sha256(msgspec.json.encode(question, order="sorted")).hexdigest()

    def get(self, key: str) -> Verdict | ItemFailure | None:
        """The judgement stored under `key`, or None."""
        path = self._path(key)
        try:
            entry = _decoder.decode(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError) as exc:
            log.warning("judge cache: unreadable entry %s, asking the judge again: %s", path, exc)
            return None
        if entry.verdict is not None:
            return entry.verdict
        if entry.failure is not None:
            return ItemFailure(entry.failure.code, entry.failure.message, raw=entry.failure.raw)
        return None

    def put(self, key: str, outcome: Verdict | ItemFailure) -> None:
        """Keep `outcome` under `key` when it is the judge's own answer (see the module's docstring)."""
        if isinstance(outcome, Verdict):
            entry = _Entry(verdict=outcome)
        elif outcome.error.code == "unparseable_reply":
            entry = _Entry(failure=outcome.error)
        else:
            return
        path = self._path(key)
        try:
            path.parent.mkdir(exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{key}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(msgspec.json.encode(entry))
                os.replace(temporary, path)
            except BaseException:
                os.unlink(temporary)
                raise
        except OSError as exc:  # a full or read-only disk costs a judge call next time, not this verdict
            log.warning("judge cache: cannot write %s: %s", path, exc)

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"


def _image_hash(image: Image.Image) -> str:
    """The sha256 of an image's decoded pixels, its size and mode: the same picture sent as PNG or raw
    pixels is the same question."""
    digest = hashlib.sha256(f"{image.mode} {image.width}x{image.height}\n".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
