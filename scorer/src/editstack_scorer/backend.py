"""What every judge backend shares: the job, its checks and image budget, the chat messages a rubric
prompt becomes, and the rubric procedure itself (`JudgeBackend.score`).

A backend (`judge.Judge`: transformers in this process; `openai_judge.OpenAIJudge`: an
OpenAI-compatible server) supplies only how one model call is made: the answer distribution of a
logits-mode question, the reply text of a generate-mode prompt, and how calls for several jobs run
together. Two modes:

- `logits`: each rubric question is asked on its own and the score is the expected value of the
  answers on the rubric's scale (0..10 or 1..5) under the judge's next-token probabilities; it
  never fails to parse.
- `generate`: each rubric group is asked once (as VIEScore does) for a JSON object holding its
  sub-scores; the reply is checked by `replies.parse_reply`, retried a bounded number of times, and
  the raw texts are kept. Asked for repeat r of K (`ScoreRequest.repeats`), every attempt samples,
  seeded from (r, attempt) alone; the worker averages the K verdicts.

One outcome per job, in order: a `Verdict` or an `ItemFailure` with its code (see `rubric`); one bad
job never fails the others and a failure never becomes a number. Torch-free.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

from PIL import Image

from editstack.errors import ItemFailure
from editstack.wire.protocol import Usage, Verdict
from editstack_scorer.replies import ReplyRejected, parse_reply
from editstack_scorer.rubric import MODES, Question, Rubric, answer_distribution, expected_score

log = logging.getLogger(__name__)

# Retries sample instead of repeating the greedy reply; attempt k uses seed k, so a rerun reproduces it.
RETRY_TEMPERATURE = 0.7
# Repeat r's attempt k samples with seed (r + 1) * stride + k: apart from the retry seeds of a single
# judgement, the same for every item wherever it sits in a request, and independent of the retry count.
_REPEAT_SEED_STRIDE = 1000

_Out = TypeVar("_Out")
# Per job, a logits-mode answer: P(first answer token = "d") for d = 0..9, P("0" | "1") (see
# `rubric.answer_distribution`), and the visual tokens the judge read.
Answer = tuple[list[float], float, int]
# Per job, a generate-mode reply: its text and the visual tokens the judge read.
Reply = tuple[str, int]


@dataclass
class Meter:
    """What a job's judge calls have cost so far; a backend adds each call's share as it returns."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    judge_s: float = 0.0

    def add(self, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        self.calls += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.judge_s += seconds

    def usage(self) -> Usage:
        return Usage(calls=self.calls, prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     judge_s=round(self.judge_s, 4))


@dataclass(frozen=True)
class ScoreJob:
    """One edit to judge: the source images (one or more), the edited image (RGB) and the instruction
    that was applied, and what the benchmark judges it against (see ScoreItem). `meter` gathers what
    judging it costs."""

    sources: list[Image.Image]
    edited: Image.Image
    instruction: str
    references: list[Image.Image] = field(default_factory=list)
    reference_text: str = ""
    explanation: str = ""
    meter: Meter = field(default_factory=Meter, compare=False)
    # a backend's form of each image it shows, by id(image): made once, however many questions show it
    # (the job holds its images, so no id is reused while it lives)
    shown_parts: dict[int, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def has(self) -> set[str]:
        """What the job carries of a rubric group's possible needs."""
        return {need for need, present in (("explanation", self.explanation.strip()),
                                           ("reference_image", self.references),
                                           ("reference_text", self.reference_text.strip())) if present}

    @property
    def context(self) -> dict[str, str]:
        """The values of a rubric prompt's placeholders."""
        return {"instruction": self.instruction, "explanation": self.explanation,
                "reference_text": self.reference_text}


def chat_messages(rubric: Rubric, images: Sequence[str], job: ScoreJob, text: str,
                  image_part: Callable[[Image.Image], dict[str, Any]],
                  ) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """The chat (system and user turns) asking `text` of `job` with its `images` shown, each as
    `image_part` makes it, and the images shown, in order."""
    # a multi-image edit shows all its sources (and references), in the benchmark's order
    by_name = {"source": job.sources, "edited": [job.edited], "reference": job.references}
    shown = [image for name in images for image in by_name[name]]
    messages = [
        {"role": "system", "content": rubric.system},
        {"role": "user", "content": [image_part(image) for image in shown] + [{"type": "text", "text": text}]},
    ]
    return messages, shown


class JudgeBackend(ABC):
    """A judge: `score` runs batches of jobs through a rubric; a subclass makes the model calls.

    `backend` names the library and class (Status.backend); `unavailable_modes` maps a mode the
    judge cannot serve to why (a request in it fails per item, never switched); `fingerprint` is what
    decides the judge's answers beside the question itself (model, revision, server, limits), for the
    judge cache's key."""

    backend: str
    unavailable_modes: dict[str, str]
    fingerprint: dict[str, object]

    def __init__(self, *, max_new_tokens: int, generate_retries: int, image_px: int) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if generate_retries < 0:
            raise ValueError(f"generate_retries must be 0 or more, got {generate_retries}")
        self.max_new_tokens = max_new_tokens
        self.generate_retries = generate_retries
        self.image_px = image_px  # the area each image is shown at; 0 = as sent
        self.unavailable_modes = {}

    def score(
        self, jobs: list[ScoreJob], mode: str, rubric: Rubric, repeat: int | None = None
    ) -> list[Verdict | ItemFailure]:
        """Score each job with `rubric` in `mode`: one Verdict or ItemFailure per job, in order.
        `repeat` r (generate mode) makes this the r-th sampled judgement of a repeated one.

        Raises ValueError only for the whole call: an unknown mode, or a repeat in logits mode.
        """
        if mode not in MODES:
            raise ValueError(f"unknown scoring mode {mode!r}; known modes: {', '.join(MODES)}")
        if repeat is not None and (mode != "generate" or repeat < 0):
            raise ValueError(f"repeat {repeat!r} needs generate mode and a repeat index >= 0 (mode {mode!r})")
        if mode in self.unavailable_modes:
            refusal = ItemFailure("bad_param", f"field 'mode': {mode} mode is unavailable with this judge: "
                                               f"{self.unavailable_modes[mode]}")
            return [refusal] * len(jobs)
        outcomes: dict[int, Verdict | ItemFailure] = {}
        for i, job in enumerate(jobs):
            problem = _job_problem(job)
            if problem is None and not rubric.asked(job.has):
                problem = f"rubric {rubric.id!r} asks none of its questions of an item with only an instruction " \
                          f"and images; each group needs one of {sorted({n for g in rubric.groups.values() for n in g.needs})}"
            if problem:
                outcomes[i] = ItemFailure("bad_input", problem)
        live = [i for i in range(len(jobs)) if i not in outcomes]
        jobs = [job if i in outcomes else self._shown(job) for i, job in enumerate(jobs)]
        start = time.monotonic()
        if live:
            if mode == "logits":
                outcomes.update(self._score_logits(jobs, live, rubric))
            else:
                outcomes.update(self._score_generate(jobs, live, rubric, repeat))
        failed = sum(isinstance(o, ItemFailure) for o in outcomes.values())
        log.info("scored %d jobs in %s mode in %.2f s; %d failed", len(jobs), mode, time.monotonic() - start, failed)
        return [outcomes[i] for i in range(len(jobs))]

    # ---- what a backend supplies ---------------------------------------------------------------

    @abstractmethod
    def _answer_distributions(self, jobs: list[ScoreJob], rubric: Rubric, question: Question,
                              indices: list[int]) -> list[Answer]:
        """Per job of `indices`, its Answer to `question`'s logits-mode prompt."""

    @abstractmethod
    def _generate(self, jobs: list[ScoreJob], rubric: Rubric, group: str, seed: int | None,
                  indices: list[int]) -> list[Reply]:
        """Per job of `indices`, its Reply to `group`'s prompt: greedy without a seed, else sampled at
        RETRY_TEMPERATURE with it."""

    @abstractmethod
    def _each(self, run: Callable[[list[int]], list[_Out]], indices: list[int],
              batch: bool = True) -> list[_Out | ItemFailure]:
        """`run` over `indices`, one outcome each; a job that fails gets its ItemFailure and the others
        go on. `batch` False: no job's call may be shared with another's (its result would then depend
        on its neighbours)."""

    # ---- logits mode -------------------------------------------------------------------------

    def _score_logits(
        self, jobs: list[ScoreJob], live: list[int], rubric: Rubric
    ) -> dict[int, Verdict | ItemFailure]:
        failed: dict[int, ItemFailure] = {}
        dists: dict[int, dict[str, list[float | str]]] = {i: {} for i in live}
        masses: dict[int, dict[str, float]] = {i: {} for i in live}
        visual = dict.fromkeys(live, 0)
        for question in rubric.questions:
            todo = [i for i in live if i not in failed and question.group in rubric.asked(jobs[i].has)]
            answer = partial(self._answer_distributions, jobs, rubric, question)
            for i, out in zip(todo, self._each(answer, todo), strict=True):
                if isinstance(out, ItemFailure):
                    failed[i] = out
                    continue
                first_digit, zero_after_one, tokens = out
                visual[i] += tokens
                try:
                    dist, mass = answer_distribution(first_digit, zero_after_one, rubric.scale)
                except ValueError as exc:
                    failed[i] = ItemFailure("model_error", f"judge put {exc} for {question.name!r}")
                    continue
                dists[i][question.name], masses[i][question.name] = dist, mass
        results: dict[int, Verdict | ItemFailure] = dict(failed)
        for i in live:
            if i in failed:
                continue
            sub_scores = {name: expected_score(dist, rubric.scale) for name, dist in dists[i].items()}
            results[i] = rubric.result(mode="logits", sub_scores=sub_scores, raw=dists[i], score_mass=masses[i],
                                       asked=rubric.asked(jobs[i].has), visual_tokens=visual[i])
        return results

    # ---- generate mode -----------------------------------------------------------------------

    def _score_generate(
        self, jobs: list[ScoreJob], live: list[int], rubric: Rubric, repeat: int | None
    ) -> dict[int, Verdict | ItemFailure]:
        failed: dict[int, ItemFailure] = {}
        replies: dict[int, dict[str, list[float | str]]] = {i: {g: [] for g in rubric.asked(jobs[i].has)}
                                                            for i in live}
        reasons: dict[int, list[str]] = {i: [] for i in live}
        sub_scores: dict[int, dict[str, float]] = {i: {} for i in live}
        visual = dict.fromkeys(live, 0)
        attempts = 1 + self.generate_retries
        for group in rubric.groups:
            keys = rubric.sub_scores(group)
            pending = [i for i in live if i not in failed and group in replies[i]]
            for attempt in range(attempts):
                if not pending:
                    break
                seed = None if repeat is None and attempt == 0 else _sample_seed(repeat, attempt)
                reply = partial(self._generate, jobs, rubric, group, seed)
                # a greedy first attempt may share a batch; sampled attempts run one job at a time, so a
                # job's sampled replies do not depend on which other jobs shared its batch
                outs = self._each(reply, pending, batch=seed is None)
                still_pending = []
                for i, out in zip(pending, outs, strict=True):
                    if isinstance(out, ItemFailure):
                        failed[i] = out
                        continue
                    text, tokens = out
                    visual[i] += tokens
                    replies[i][group].append(text)
                    try:
                        sub_scores[i].update(parse_reply(text, keys, rubric.scale))
                    except ReplyRejected as e:
                        reasons[i].append(f"group {group!r}, attempt {attempt + 1}: {e.reason}")
                        still_pending.append(i)
                pending = still_pending
            for i in pending:
                failed[i] = ItemFailure(
                    "unparseable_reply",
                    f"unparseable judge reply for group {group!r} after {attempts} attempts: {reasons[i][-1]}",
                    raw=[str(text) for texts in replies[i].values() for text in texts],
                )
        results: dict[int, Verdict | ItemFailure] = dict(failed)
        for i in live:
            if i not in failed:
                results[i] = rubric.result(
                    mode="generate",
                    sub_scores=sub_scores[i],
                    raw=replies[i],
                    asked=tuple(replies[i]),
                    attempts=sum(len(texts) for texts in replies[i].values()),
                    visual_tokens=visual[i],
                )
        return results

    # ---- shared ------------------------------------------------------------------------------

    def _shown(self, job: ScoreJob) -> ScoreJob:
        """`job` with every image within the judge's image budget."""
        return replace(job, sources=[_within(image, self.image_px) for image in job.sources],
                       edited=_within(job.edited, self.image_px),
                       references=[_within(image, self.image_px) for image in job.references], shown_parts={})


def _within(image: Image.Image, max_px: int) -> Image.Image:
    """`image` downscaled, aspect kept, to at most `max_px` pixels (0: unchanged). The judge's own
    processor would resize anyway (Qwen3-VL to multiples of 32 px); this only bounds the area."""
    if not max_px or image.width * image.height <= max_px:
        return image
    scale = math.sqrt(max_px / (image.width * image.height))
    size = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def _sample_seed(repeat: int | None, attempt: int) -> int:
    """The sampling seed of `attempt` (0 first) of a judgement; `repeat` None: a single judgement,
    whose first attempt is greedy and whose retry k uses seed k, as before repeats existed."""
    return attempt if repeat is None else (repeat + 1) * _REPEAT_SEED_STRIDE + attempt


def _job_problem(job: ScoreJob) -> str | None:
    """Why a job cannot be scored as given, or None; inputs are checked, never silently converted."""
    if not job.sources:
        return "no source image"
    named = [*((f"sources[{k}]", image) for k, image in enumerate(job.sources)), ("edited", job.edited),
             *((f"references[{k}]", image) for k, image in enumerate(job.references))]
    for name, image in named:
        if not isinstance(image, Image.Image):
            return f"{name} is a {type(image).__name__}, expected a PIL image"
        if image.mode != "RGB":
            return f"{name} image mode is {image.mode!r}, expected 'RGB'"
    if not isinstance(job.instruction, str):
        return f"instruction is a {type(job.instruction).__name__}, expected text"
    if not job.instruction.strip():
        return f"instruction {job.instruction!r} is empty"
    return None
