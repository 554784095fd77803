"""The scorer's worker: turns a score request into judge jobs and the verdicts into a reply.

Inputs are checked per item here, with errors naming the item, the field and the value; a
verdict travels as the judge made it, and a failure is never turned into a number. A repeated
judgement (ScoreRequest.repeats = K > 1, generate mode) asks the judge K times and sends the mean
(`combine_repeats`); a repeat that fails fails its item. With a judge cache (SCORER_CACHE_DIR), each
judgement is looked up first and only the misses are asked. Torch-free: the judges live in `judge`
and `openai_judge`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Protocol

import PIL.Image

import msgspec

from editstack.errors import ItemFailure
from editstack.service.items import item_error, read_rgb, require_instruction, require_within
from editstack.service.process import embedded_model
from editstack.service.workers import Loaded
from editstack.wire.codec import Blobs
from editstack.wire.protocol import (EditRequest, ErrorReply, Reply, ScoreReply, ScoreRequest, ScoreResult, Usage,
                                     Verdict)

from editstack_scorer.backend import Meter, ScoreJob
from editstack_scorer.cache import JudgeCache
from editstack_scorer.rubric import MODES, Rubric, load_rubric
from editstack_scorer.settings import EMBEDDED_MODEL, ScorerSettings

# Repeats one request may ask for: K sampled judgements cost K times the model time of one.
MAX_REPEATS = 16


class Judge(Protocol):
    backend: str

    def score(self, jobs: list, mode: str, rubric: Rubric, repeat: int | None = None) -> list[Verdict | ItemFailure]: ...


class ScorerWorker:
    """Serves score requests on one loaded judge."""

    def __init__(self, judge: Judge, job_type: type, settings: ScorerSettings,
                 cache: JudgeCache | None = None) -> None:
        self.judge = judge
        self.job_type = job_type  # backend.ScoreJob, or a test's stand-in
        self.settings = settings
        self.limits = settings.limits
        self.cache = cache

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
            except ValueError as exc:  # an UnknownRubricError, or a user's file that does not check
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
                require_within(item.id, "reference_text", item.reference_text, self.limits)
                require_within(item.id, "explanation", item.explanation, self.limits)
            except ItemFailure as failure:
                results[index] = ScoreResult(id=item.id, error=failure.error, notes=notes)
                continue
            meter = Meter()  # the judge adds each call's cost for this item
            jobs.append(self.job_type([PIL.Image.fromarray(s) for s in sources], PIL.Image.fromarray(edited),
                                      item.instruction, [PIL.Image.fromarray(r) for r in references],
                                      item.reference_text, item.explanation, meter))
            slots.append((index, notes, meter))

        size = self.settings.batch_size
        for start in range(0, len(jobs), size):
            chunk = slice(start, start + size)
            started = time.perf_counter()
            if repeats == 1:
                verdicts, asked = self._ask(jobs[chunk], mode, rubric, None)
            else:
                verdicts, asked = self._score_repeated(jobs[chunk], mode, rubric, repeats)
            per_item_s = (time.perf_counter() - started) / len(verdicts)
            for (index, notes, meter), verdict, was_asked in zip(slots[chunk], verdicts, asked, strict=True):
                results[index] = _result(request.items[index].id, verdict, per_item_s, notes,
                                         meter.usage() if was_asked else None)
        return ScoreReply(items=[r for r in results if r is not None]), None

    def _ask(self, jobs: list, mode: str, rubric: Rubric,
             repeat: int | None) -> tuple[list[Verdict | ItemFailure], list[bool]]:
        """Each job's judgement from the cache, or else from the judge (and then kept); and per job,
        whether the judge was asked."""
        if self.cache is None:
            return self.judge.score(jobs, mode, rubric, repeat), [True] * len(jobs)
        keys = [self.cache.key(job, mode, rubric, repeat) for job in jobs]
        outcomes = [self.cache.get(key) for key in keys]
        asked = [outcome is None for outcome in outcomes]
        misses = [i for i in range(len(jobs)) if asked[i]]
        if misses:
            for i, outcome in zip(misses, self.judge.score([jobs[i] for i in misses], mode, rubric, repeat),
                                  strict=True):
                outcomes[i] = outcome
                self.cache.put(keys[i], outcome)
        return outcomes, asked

    def _score_repeated(self, jobs: list, mode: str, rubric: Rubric,
                        repeats: int) -> tuple[list[Verdict | ItemFailure], list[bool]]:
        """Each job judged `repeats` times, combined; a job whose repeat fails is not asked again, and
        its failure carries the raw replies of every repeat it had. Per job too: whether the judge was
        asked for any of its repeats."""
        done: list[list[Verdict]] = [[] for _ in jobs]
        outcomes: dict[int, Verdict | ItemFailure] = {}
        asked = [False] * len(jobs)
        for repeat in range(repeats):
            live = [i for i in range(len(jobs)) if i not in outcomes]
            if not live:
                break
            judged, was_asked = self._ask([jobs[i] for i in live], mode, rubric, repeat)
            for i, out, this_asked in zip(live, judged, was_asked, strict=True):
                asked[i] = asked[i] or this_asked
                if isinstance(out, Verdict):
                    done[i].append(out)
                    continue
                earlier = [str(text) for v in done[i] for texts in v.raw.values() for text in texts]
                outcomes[i] = ItemFailure(out.error.code, f"repeat {repeat + 1} of {repeats}: {out.error.message}",
                                          raw=[*earlier, *out.error.raw])
        return [outcomes.get(i) or combine_repeats(done[i]) for i in range(len(jobs))], asked


def load_worker(settings: ScorerSettings, device: str) -> tuple[ScorerWorker, Loaded]:
    """The worker with the transformers judge loaded on `device`, and what Status says of it (run in
    its worker process)."""
    from editstack_scorer import tiny
    from editstack_scorer.judge import Judge  # the one module that imports torch

    model = embedded_model(settings.tiny_dir, tiny.build) if settings.model == EMBEDDED_MODEL else settings.model
    judge = Judge(model, settings.revision or None, device, settings.dtype, max_new_tokens=settings.max_new_tokens,
                  generate_retries=settings.generate_retries, threads=settings.threads,
                  image_px=settings.judge_image_px)
    cache = JudgeCache(settings.cache_dir, judge.fingerprint) if settings.cache_dir else None
    return ScorerWorker(judge, ScoreJob, settings, cache), Loaded(judge.backend, judge.unavailable_modes)


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


def _result(item_id: str, verdict: Verdict | Exception, elapsed_s: float, notes: Sequence[str],
            usage: Usage | None) -> ScoreResult:
    """The item's result; `usage` None: the judge was not asked, the cache answered."""
    outcome = {"verdict": verdict} if isinstance(verdict, Verdict) else {"error": item_error(item_id, verdict)}
    return ScoreResult(id=item_id, **outcome, elapsed_s=elapsed_s, notes=list(notes), cached=usage is None,
                       usage=usage)
