"""The OpenAI-compatible judge: a model behind any chat-completions server (vLLM, SGLang,
`transformers serve`, hosted APIs such as OpenAI's), asked by the rubric procedure every backend
shares (`backend.JudgeBackend`).

Torch-free: it needs only the official `openai` client. Each job's call is a request of its own,
up to SCORER_API_CONCURRENCY at once; images travel as PNG data URLs, after the image budget.
Retries are the client's (openai 3.57, `_base_client.py`): a request answered 408, 409, 429 or 5xx,
or not answered at all (connection error, timeout), is sent again up to SCORER_API_RETRIES times,
after the server's `Retry-After` (or `retry-after-ms`) where it gives one of at most 120 s, else
after an exponential backoff (0.5 s doubling to at most 8 s, less up to 25 % jitter); an answer
whose `Retry-After` exceeds 120 s is final. A call that finally fails fails its item (model_error)
with the HTTP status and the server's message; never a score.

Logits mode reads the `top_logprobs` (20, the most OpenAI's API gives) of a one-token completion:
P(first answer token = "d") for the digits, probabilities outside the top 20 counting as 0 (the
transformers judge reads them all). At load a probe asks for logprobs: a server that returns none
(`transformers serve` ignores the field) or refuses them has no logits mode: ping says so
(ScoreDefaults.unavailable_modes) and a logits request fails its items with bad_param, never
switched to generate mode.

On a scale reaching 10, reading the answer 10 depends on how the tokenizer writes it, which two
probes at start settle (one request each, only where logprobs come back). A model that writes 10 as
one token (OpenAI's tokenizers) has a "10" among the candidates read as it is, and a "1" without one
is the answer 1, its "10" below the top 20: no reply is ever continued. A model that writes "1", "0"
(Qwen's) needs a server that continues a reply prefilled with "1" (vLLM's and SGLang's
`continue_final_message`): its "1" is followed up by asking P("0" | "1"), as the transformers judge
reads it in its single pass. The second probe checks that the server accepts that field and obeys
it (a "0" follows), since one that ignored it would answer anew. Where neither holds (a split
tokenizer behind a server that refuses the field, as OpenAI's API does), P(10) cannot be read: a
logits question on such a scale fails its item with bad_param naming why, while 1-5 rubrics are
read as usual. What was found is logged and keys the judge cache (`fingerprint["ten"]`).

The API key goes to the client and nowhere else: not to the log, Status, the cache key or the run
folder, and any server message that echoes it has it removed.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import openai
from openai.types.chat import ChatCompletion
from PIL import Image

from editstack.errors import ItemFailure
from editstack_scorer.backend import RETRY_TEMPERATURE, Answer, JudgeBackend, Reply, ScoreJob, chat_messages
from editstack_scorer.rubric import Question, Rubric

log = logging.getLogger(__name__)

_Out = TypeVar("_Out")
TOP_LOGPROBS = 20  # the most OpenAI's API returns; vLLM's default limit is 20 as well
_PROBE_PAUSE_S = 5.0
# The reply is continued rather than answered anew: vLLM's and SGLang's chat-completions extensions.
_CONTINUE_REPLY = {"continue_final_message": True, "add_generation_prompt": False}
_TEN_PROBE = [{"role": "user", "content": "Reply with the number 10 and nothing else."}]
# how a logits answer of 10 is read (the module's docstring)
ONE_TOKEN_TEN, CONTINUE = "10 is one token", "continue the reply"


class OpenAIJudge(JudgeBackend):
    """A judge behind an OpenAI-compatible chat-completions server; `score` runs batches of jobs
    through it, each job's calls as requests of their own."""

    def __init__(
        self,
        api_base: str,
        model: str,
        api_key: str,
        *,
        concurrency: int = 8,
        timeout_s: float = 120.0,
        retries: int = 4,
        start_timeout_s: float = 900.0,
        max_new_tokens: int = 256,
        generate_retries: int = 2,
        image_px: int = 0,
    ) -> None:
        super().__init__(max_new_tokens=max_new_tokens, generate_retries=generate_retries, image_px=image_px)
        self.api_base, self.model, self.timeout_s, self.retries = api_base, model, timeout_s, retries
        self._key = api_key
        # a server without authentication (a local vLLM) takes any key; the client insists on one
        self.client = openai.OpenAI(base_url=api_base, api_key=api_key or "none", max_retries=retries,
                                    timeout=timeout_s)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="judge-call")
        self.backend = f"openai-compatible ({api_base})"
        self.fingerprint = {"backend": "openai-compatible", "api_base": api_base, "model": model,
                            "max_new_tokens": max_new_tokens, "generate_retries": generate_retries,
                            "image_px": image_px, "top_logprobs": TOP_LOGPROBS}
        start = time.monotonic()
        self._wait_for_server(start_timeout_s)
        self._ten, self._no_ten = "", ""  # ONE_TOKEN_TEN or CONTINUE, else why neither holds
        if reason := self._logprobs_missing():
            self.unavailable_modes["logits"] = reason
            log.warning("logits mode is unavailable with this judge: %s", reason)
        else:
            self._ten, self._no_ten = self._how_ten_is_read()
            # it decides the answers on a 0-10 scale; the wording of why not does not
            self.fingerprint["ten"] = self._ten or "unreadable"
            if self._ten:
                log.info("logits mode on a scale reaching 10: %s", self._ten)
            else:
                log.warning("logits mode on a scale reaching 10 is unavailable with this judge: %s", self._no_ten)
        log.info("judge %s at %s answered in %.2f s; %d requests at once, %.0f s each, %d retries", model, api_base,
                 time.monotonic() - start, concurrency, timeout_s, retries)

    # ---- start ---------------------------------------------------------------------------------

    def _wait_for_server(self, timeout_s: float) -> None:
        """Return once the server answers a one-token request; a server that is still starting (no
        connection, 5xx) is asked again until `timeout_s`. RuntimeError names the cause: a refused
        key, an unknown model, or no answer in time."""
        deadline = time.monotonic() + timeout_s
        probe = [{"role": "user", "content": "Reply with one digit."}]
        while True:
            try:
                # one try each, bounded by what is left: the client's own retries would outrun the deadline
                left = max(1.0, min(self.timeout_s, deadline - time.monotonic()))
                self.client.with_options(max_retries=0, timeout=left).chat.completions.create(
                    model=self.model, messages=probe, max_tokens=1)
                return
            except (openai.APIConnectionError, openai.InternalServerError) as exc:
                if time.monotonic() + _PROBE_PAUSE_S > deadline:
                    raise RuntimeError(f"no answer from the judge server within {timeout_s:.0f} s: "
                                       f"{self._cause(exc)}") from None
                log.info("waiting for the judge server: %s", self._cause(exc))
                time.sleep(_PROBE_PAUSE_S)
            except openai.APIError as exc:  # raised from None: the traceback keeps only the scrubbed cause
                raise RuntimeError(self._cause(exc)) from None

    def _logprobs_missing(self) -> str:
        """Why this server gives no logits mode ("" when it returns top logprobs)."""
        probe = [{"role": "user", "content": "Reply with one digit."}]
        try:
            response = self.client.chat.completions.create(model=self.model, messages=probe, max_tokens=1,
                                                           logprobs=True, top_logprobs=TOP_LOGPROBS)
        except openai.BadRequestError as exc:
            return f"the server refused logprobs ({self._cause(exc)}); use generate mode"
        if not _top_candidates(response):
            return (f"the server returned no logprobs for a request asking logprobs=true, "
                    f"top_logprobs={TOP_LOGPROBS}; use generate mode")
        return ""

    def _how_ten_is_read(self) -> tuple[str, str]:
        """ONE_TOKEN_TEN where the model writes 10 as one token, else CONTINUE where the server continues
        a reply prefilled with "1"; else "" and why neither holds."""
        written = _top_token(self.client.chat.completions.create(
            model=self.model, messages=_TEN_PROBE, max_tokens=1, logprobs=True, top_logprobs=TOP_LOGPROBS))
        if written == "10":
            return ONE_TOKEN_TEN, ""
        split = f"asked to reply 10, its first token was {written!r}, not '10'"
        unreadable = "P(10) cannot be read; use generate mode or a 1-5 rubric"
        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=[*_TEN_PROBE, {"role": "assistant", "content": "1"}], max_tokens=1,
                logprobs=True, top_logprobs=TOP_LOGPROBS, extra_body=_CONTINUE_REPLY)
        except openai.BadRequestError as exc:
            return "", f"{split}, and it cannot continue a reply prefilled with '1' ({self._cause(exc)}): {unreadable}"
        if (after_one := _top_token(response)) != "0":  # the fields accepted but ignored: it answered anew
            return "", (f"{split}, and continuing a reply prefilled with '1' its first token was {after_one!r}, "
                        f"not '0' (does it ignore continue_final_message?): {unreadable}")
        return CONTINUE, ""

    # ---- the backend's calls -------------------------------------------------------------------

    def _answer_distributions(self, jobs: list[ScoreJob], rubric: Rubric, question: Question,
                              indices: list[int]) -> list[Answer]:
        return [self._answer(jobs[i], rubric, question) for i in indices]

    def _answer(self, job: ScoreJob, rubric: Rubric, question: Question) -> Answer:
        tens = rubric.scale[1] >= 10
        if tens and not self._ten:  # asked nothing: the answer would be unreadable
            raise ItemFailure("bad_param", f"rubric {rubric.id!r} reaches 10 and this judge cannot give the "
                                           f"probability of 10 in logits mode: {self._no_ten}")
        messages = self._messages(rubric, rubric.groups[question.group].images, job,
                                  rubric.question_prompt(question, job.context))
        first = self._first_token(job, messages)
        digits = [first.get(str(d), 0.0) for d in range(10)]
        one, ten = digits[1], first.get("10", 0.0)
        if not tens or one + ten == 0:  # no answer 10, or no "1" to tell from it
            return digits, 0.0, 0
        if ten > 0:  # a tokenizer with a token "10" writes 10 so: its "1" is the answer 1
            digits[1] = one + ten
            return digits, ten / (one + ten), 0
        if self._ten == ONE_TOKEN_TEN:  # its "10" is below the top 20
            return digits, 0.0, 0
        after_one = self._first_token(job, [*messages, {"role": "assistant", "content": "1"}], _CONTINUE_REPLY)
        return digits, after_one.get("0", 0.0), 0

    def _first_token(self, job: ScoreJob, messages: list[dict[str, Any]],
                     extra_body: dict[str, object] | None = None) -> dict[str, float]:
        """The probability of each of the first reply token's top candidates, by its text stripped of
        spaces (" 7" and "7" both answer 7)."""
        response = self._complete(job, messages, max_tokens=1, temperature=0.0, logprobs=True,
                                  top_logprobs=TOP_LOGPROBS, extra_body=extra_body)
        candidates = _top_candidates(response)
        if not candidates:
            raise ItemFailure("model_error", "the judge server returned no logprobs for a logits-mode question")
        probabilities: dict[str, float] = {}
        for candidate in candidates:
            answer = candidate.token.strip()
            probabilities[answer] = probabilities.get(answer, 0.0) + math.exp(candidate.logprob)
        return probabilities

    def _generate(self, jobs: list[ScoreJob], rubric: Rubric, group: str, seed: int | None,
                  indices: list[int]) -> list[Reply]:
        return [self._reply(jobs[i], rubric, group, seed) for i in indices]

    def _reply(self, job: ScoreJob, rubric: Rubric, group: str, seed: int | None) -> Reply:
        messages = self._messages(rubric, rubric.groups[group].images, job, rubric.group_prompt(group, job.context))
        sampling: dict[str, Any] = {"temperature": 0.0} if seed is None else {"temperature": RETRY_TEMPERATURE,
                                                                               "seed": seed}
        response = self._complete(job, messages, max_tokens=self.max_new_tokens, **sampling)
        return response.choices[0].message.content or "", 0  # the server does not count visual tokens apart

    def _complete(self, job: ScoreJob, messages: list[dict[str, Any]], **options: Any) -> ChatCompletion:
        """One chat completion for `job`, its tokens and seconds (retries included) added to its meter;
        a call that finally fails is charged its seconds too (no tokens: the server counted none)."""
        start = time.monotonic()
        try:
            response = self.client.chat.completions.create(model=self.model, messages=messages, **options)
        except openai.APIError:
            job.meter.add(0, 0, time.monotonic() - start)
            raise
        usage = response.usage
        job.meter.add(usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0,
                      time.monotonic() - start)
        return response

    def _messages(self, rubric: Rubric, images: tuple[str, ...], job: ScoreJob, text: str) -> list[dict[str, Any]]:
        def part(image: Image.Image) -> dict[str, Any]:  # encoded once per job: a rubric asks several questions
            if (made := job.shown_parts.get(id(image))) is None:
                made = job.shown_parts[id(image)] = _image_part(image)
            return made

        return chat_messages(rubric, images, job, text, part)[0]

    def _each(self, run: Callable[[list[int]], list[_Out]], indices: list[int],
              batch: bool = True) -> list[_Out | ItemFailure]:
        """Each job's call as a request of its own (so none is ever shared: `batch` holds either way),
        up to the concurrency at once; a failed one fails its job alone."""

        def one(i: int) -> _Out | ItemFailure:
            try:
                return run([i])[0]
            except ItemFailure as exc:
                return exc
            except openai.APIError as exc:
                return ItemFailure("model_error", f"judge server: {self._cause(exc)}")
            except Exception as exc:  # a defect or a reply of an unexpected shape: this job fails, not the batch
                log.warning("judge call failed for job %d", i, exc_info=True)
                return ItemFailure("model_error",
                                   f"judge call failed: {type(exc).__name__}: {self._scrubbed(str(exc))}")

        return list(self._pool.map(one, indices))

    # ---- errors --------------------------------------------------------------------------------

    def _cause(self, exc: openai.APIError) -> str:
        """One line for a failed request: the status and the server's message, the key never shown."""
        where = f"{self.api_base} (model {self.model!r})"
        if isinstance(exc, openai.AuthenticationError):  # its body may echo part of the key
            return f"{where} refused the API key (HTTP 401); check SCORER_API_KEY_FILE or SCORER_API_KEY_ENV"
        if isinstance(exc, openai.APITimeoutError):
            return f"{where} did not answer within {self.timeout_s:g} s, {self.retries} retries included"
        if isinstance(exc, openai.APIStatusError):
            message = exc.message.removeprefix(f"Error code: {exc.status_code} - ")  # the client's own prefix
            return self._scrubbed(f"{where} answered HTTP {exc.status_code}: {message}")
        reason = exc.__cause__ or exc
        return self._scrubbed(f"cannot reach {where} ({self.retries} retries): {type(reason).__name__}: {reason}")

    def _scrubbed(self, text: str) -> str:
        return text.replace(self._key, "<api key>") if self._key else text


def _top_candidates(response: ChatCompletion) -> list[Any]:
    """The first reply token's top logprobs, or [] where the server gave none."""
    logprobs = response.choices[0].logprobs if response.choices else None
    content = logprobs.content if logprobs else None
    return list(content[0].top_logprobs) if content else []


def _top_token(response: ChatCompletion) -> str:
    """The first reply token's most probable candidate, stripped of spaces ("" where none came back)."""
    candidates = _top_candidates(response)
    return max(candidates, key=lambda c: c.logprob).token.strip() if candidates else ""


def _image_part(image: Image.Image) -> dict[str, Any]:
    """`image` as chat content: a PNG data URL (lossless, so the judge sees the pixels the cache key
    hashed), in OpenAI's high-detail mode, whose view the default image budget matches."""
    png = io.BytesIO()
    image.save(png, format="PNG")
    url = f"data:image/png;base64,{base64.b64encode(png.getvalue()).decode()}"
    return {"type": "image_url", "image_url": {"url": url, "detail": "high"}}
