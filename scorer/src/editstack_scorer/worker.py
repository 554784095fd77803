"""The scorer's worker: turns a score request into judge jobs and the verdicts into a reply.

Inputs are checked per item here, with errors naming the item, the field and the value; a
verdict travels as the judge made it, and a failure is never turned into a number.
Torch-free: the judge lives in `judge`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import PIL.Image

from editstack.errors import ItemFailure
from editstack.service.items import item_error, read_rgb, require_instruction
from editstack.wire.codec import Blobs
from editstack.wire.protocol import EditRequest, ErrorReply, Reply, ScoreReply, ScoreRequest, ScoreResult, Verdict

from editstack_scorer.rubric import MODES, Rubric, UnknownRubricError, load_rubric
from editstack_scorer.settings import ScorerSettings


class Judge(Protocol):
    backend: str

    def score(self, jobs: list, mode: str, rubric: Rubric) -> list[Verdict | ItemFailure]: ...


class ScorerWorker:
    """Serves score requests on one loaded judge."""

    def __init__(self, judge: Judge, job_type: type, settings: ScorerSettings) -> None:
        self.judge = judge
        self.job_type = job_type  # judge.ScoreJob, passed in so this module stays torch-free
        self.settings = settings
        self.limits = settings.limits

    def handle(self, request: EditRequest | ScoreRequest, blobs: list[memoryview]) -> tuple[Reply, Blobs | None]:
        if not isinstance(request, ScoreRequest):
            return ErrorReply("unsupported", "this is a scorer: it answers score requests, not edit"), None
        mode = request.mode or self.settings.mode
        rubric_id = request.rubric or self.settings.rubric
        request_problem = None
        rubric = None
        if mode not in MODES:
            request_problem = f"field 'mode': unknown mode {mode!r}; known modes: {', '.join(MODES)}"
        else:
            try:
                rubric = load_rubric(rubric_id)
            except UnknownRubricError as exc:
                request_problem = f"field 'rubric': {exc}"

        results: list[ScoreResult | None] = [None] * len(request.items)
        jobs, slots = [], []
        for index, item in enumerate(request.items):
            notes: list[str] = []
            try:
                if request_problem:
                    raise ItemFailure("bad_param", f"item {item.id!r} {request_problem}")
                require_instruction(item.id, item.instruction, self.limits)
                if not item.sources:
                    raise ItemFailure("missing_image", f"item {item.id!r} field 'sources': no source image was sent")
                sources = [read_rgb(item.id, f"sources[{k}]", ref, blobs, self.limits, notes)
                           for k, ref in enumerate(item.sources)]
                edited = read_rgb(item.id, "edited", item.edited, blobs, self.limits, notes)
            except ItemFailure as failure:
                results[index] = ScoreResult(id=item.id, error=failure.error, notes=notes)
                continue
            jobs.append(self.job_type([PIL.Image.fromarray(s) for s in sources], PIL.Image.fromarray(edited),
                                      item.instruction))
            slots.append((index, notes))

        size = self.settings.batch_size
        for start in range(0, len(jobs), size):
            chunk = slice(start, start + size)
            started = time.perf_counter()
            verdicts = self.judge.score(jobs[chunk], mode, rubric)
            per_item_s = (time.perf_counter() - started) / len(verdicts)
            for (index, notes), verdict in zip(slots[chunk], verdicts, strict=True):
                results[index] = _result(request.items[index].id, verdict, per_item_s, notes)
        return ScoreReply(items=[r for r in results if r is not None]), None


def _result(item_id: str, verdict: Verdict | Exception, elapsed_s: float, notes: Sequence[str]) -> ScoreResult:
    if isinstance(verdict, Verdict):
        return ScoreResult(id=item_id, verdict=verdict, elapsed_s=elapsed_s, notes=list(notes))
    return ScoreResult(id=item_id, error=item_error(item_id, verdict), elapsed_s=elapsed_s, notes=list(notes))
