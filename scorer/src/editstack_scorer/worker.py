"""The scorer's worker: turns a score request into judge jobs and the verdicts into a reply.

Inputs are checked per item here, with errors naming the item, the field and the value; a
verdict travels as the judge made it, and a failure is never turned into a number. A repeated
judgement (ScoreRequest.repeats = K > 1, generate mode) asks the judge K times and sends the mean
(`combine_repeats`); a repeat that fails fails its item. Torch-free: the judge lives in `judge`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Protocol

import PIL.Image

import msgspec

from editstack.errors import ItemFailure
from editstack.service.items import item_error, read_rgb, require_instruction
from editstack.wire.codec import Blobs
from editstack.wire.protocol import EditRequest, ErrorReply, Reply, ScoreReply, ScoreRequest, ScoreResult, Verdict

from editstack_scorer.rubric import MODES, Rubric, UnknownRubricError, load_rubric
from editstack_scorer.settings import ScorerSettings

# Repeats one request may ask for: K sampled judgements cost K times the model time of one.
MAX_REPEATS = 16


class Judge(Protocol):
    backend: str

    def score(self, jobs: list, mode: str, rubric: Rubric, repeat: int | None = None) -> list[Verdict | ItemFailure]: ...


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
                rubric = load_rubric(rubric_id, self.settings.rubric_dir)
            except (UnknownRubricError, ValueError) as exc:  # unknown, or a user's file that does not check
                request_problem = f"field 'rubric': {exc}"
        repeats = request.repeats
        if request_problem is None and not 1 <= repeats <= MAX_REPEATS:
            request_problem = f"field 'repeats': {repeats!r} is outside 1..{MAX_REPEATS}"
        elif request_problem is None and repeats > 1 and mode != "generate":
            # logits mode reads the judge's distribution: asking again gives the same numbers
            request_problem = f"field 'repeats': {repeats} needs generate mode; {mode} mode is deterministic"

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
                references = [read_rgb(item.id, f"references[{k}]", ref, blobs, self.limits, notes)
                              for k, ref in enumerate(item.references)]
                for field, text in (("reference_text", item.reference_text), ("explanation", item.explanation)):
                    if len(text) > self.limits.max_instruction_chars:
                        raise ItemFailure("limit_exceeded", f"item {item.id!r} field {field!r}: {len(text)} "
                                                            f"characters is over the limit of "
                                                            f"{self.limits.max_instruction_chars}")
            except ItemFailure as failure:
                results[index] = ScoreResult(id=item.id, error=failure.error, notes=notes)
                continue
            jobs.append(self.job_type([PIL.Image.fromarray(s) for s in sources], PIL.Image.fromarray(edited),
                                      item.instruction, [PIL.Image.fromarray(r) for r in references],
                                      item.reference_text, item.explanation))
            slots.append((index, notes))

        size = self.settings.batch_size
        for start in range(0, len(jobs), size):
            chunk = slice(start, start + size)
            started = time.perf_counter()
            if repeats == 1:
                verdicts = self.judge.score(jobs[chunk], mode, rubric)
            else:
                verdicts = self._score_repeated(jobs[chunk], mode, rubric, repeats)
            per_item_s = (time.perf_counter() - started) / len(verdicts)
            for (index, notes), verdict in zip(slots[chunk], verdicts, strict=True):
                results[index] = _result(request.items[index].id, verdict, per_item_s, notes)
        return ScoreReply(items=[r for r in results if r is not None]), None

    def _score_repeated(self, jobs: list, mode: str, rubric: Rubric, repeats: int) -> list[Verdict | ItemFailure]:
        """Each job judged `repeats` times, combined; a job whose repeat fails is not asked again, and
        its failure carries the raw replies of every repeat it had."""
        done: list[list[Verdict]] = [[] for _ in jobs]
        outcomes: dict[int, Verdict | ItemFailure] = {}
        for repeat in range(repeats):
            live = [i for i in range(len(jobs)) if i not in outcomes]
            if not live:
                break
            for i, out in zip(live, self.judge.score([jobs[i] for i in live], mode, rubric, repeat), strict=True):
                if isinstance(out, Verdict):
                    done[i].append(out)
                    continue
                earlier = [str(text) for v in done[i] for texts in v.raw.values() for text in texts]
                outcomes[i] = ItemFailure(out.error.code, f"repeat {repeat + 1} of {repeats}: {out.error.message}",
                                          raw=[*earlier, *out.error.raw])
        return [outcomes.get(i) or combine_repeats(done[i]) for i in range(len(jobs))]


def combine_repeats(verdicts: Sequence[Verdict]) -> Verdict:
    """One Verdict from K > 1 judgements of one item: every score the mean over the repeats (overall
    the mean of their overalls), each repeat's overall and sub-scores kept, raw replies and attempts
    pooled in repeat order. The judgements must share rubric, mode, aggregation and sub-score names."""
    if len(verdicts) < 2:
        raise ValueError(f"combine_repeats needs at least 2 verdicts, got {len(verdicts)}")
    first = verdicts[0]
    for k, v in enumerate(verdicts, start=1):
        same = (v.rubric_id, v.rubric_version, v.rubric_sha256, v.mode, v.aggregation, set(v.sub_scores))
        if same != (first.rubric_id, first.rubric_version, first.rubric_sha256, first.mode, first.aggregation,
                    set(first.sub_scores)):
            raise ValueError(f"repeat {k} was judged under another rubric, mode or aggregation than repeat 1")
        if v.repeat_overall:
            raise ValueError(f"repeat {k} is itself a combined verdict")

    def mean(values: Sequence[float]) -> float:
        return math.fsum(values) / len(values)

    raw: dict[str, list[float | str]] = {}
    for v in verdicts:
        for group, texts in v.raw.items():
            raw.setdefault(group, []).extend(texts)
    return msgspec.structs.replace(
        first,
        sub_scores={name: mean([v.sub_scores[name] for v in verdicts]) for name in first.sub_scores},
        sc=None if first.sc is None else mean([v.sc for v in verdicts]),
        pq=None if first.pq is None else mean([v.pq for v in verdicts]),
        overall=mean([v.overall for v in verdicts]),
        aggregation=f"{first.aggregation}; each score the mean over {len(verdicts)} sampled repeats",
        score_mass={},
        raw=raw,
        attempts=sum(v.attempts for v in verdicts),
        visual_tokens=sum(v.visual_tokens for v in verdicts),
        repeat_overall=[v.overall for v in verdicts],
        repeat_sub_scores=[dict(v.sub_scores) for v in verdicts],
    )


def _result(item_id: str, verdict: Verdict | Exception, elapsed_s: float, notes: Sequence[str]) -> ScoreResult:
    if isinstance(verdict, Verdict):
        return ScoreResult(id=item_id, verdict=verdict, elapsed_s=elapsed_s, notes=list(notes))
    return ScoreResult(id=item_id, error=item_error(item_id, verdict), elapsed_s=elapsed_s, notes=list(notes))
