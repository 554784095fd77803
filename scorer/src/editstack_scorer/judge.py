"""The judge: a transformers vision-language model (Qwen3-VL first) that scores image edits with a rubric.

The only scorer module that imports torch and transformers. Two modes:

- `logits`: each rubric question is asked on its own and the score is the expected value of the
  answers on the rubric's scale (0..10 or 1..5) under the model's next-token probabilities; it
  never fails to parse.
- `generate`: each rubric group is asked once (as VIEScore does) for a JSON object holding its
  sub-scores; the reply is checked by `replies.parse_reply`, retried a bounded number of times, and
  the raw texts are kept. Asked for repeat r of K (`ScoreRequest.repeats`), every attempt samples,
  seeded from (r, attempt) alone; the worker averages the K verdicts.

One outcome per job, in order: a `Verdict` or an `ItemFailure` with its code (see `rubric`); one bad
job never fails the others and a failure never becomes a number.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TypeVar

import torch
import transformers
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen3VLProcessor

from editstack.errors import ItemFailure
from editstack.service.process import is_tiny_model
from editstack.service.processors import drop_video_processor
from editstack.wire.protocol import Verdict
from editstack_scorer.replies import ReplyRejected, parse_reply
from editstack_scorer.rubric import MODES, Question, Rubric, answer_distribution, expected_score

log = logging.getLogger(__name__)

_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Retries sample instead of repeating the greedy reply; attempt k uses seed k, so a rerun reproduces it.
_RETRY_TEMPERATURE = 0.7
# Repeat r's attempt k samples with seed (r + 1) * stride + k: apart from the retry seeds of a single
# judgement, the same for every item wherever it sits in a request, and independent of the retry count.
_REPEAT_SEED_STRIDE = 1000

_Out = TypeVar("_Out")
# A prompt ready for the processor: the chat-formatted text and the images it shows, in order.
_Prompt = tuple[str, list[Image.Image]]


@dataclass(frozen=True)
class ScoreJob:
    """One edit to judge: the source images (one or more), the edited image (RGB) and the instruction
    that was applied, and what the benchmark judges it against (see ScoreItem)."""

    sources: list[Image.Image]
    edited: Image.Image
    instruction: str
    references: list[Image.Image] = field(default_factory=list)
    reference_text: str = ""
    explanation: str = ""

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


class Judge:
    """A VLM judge loaded once; `score` runs batches of jobs through it."""

    def __init__(
        self,
        model: str,
        revision: str | None,
        device: str,
        dtype: str,
        max_new_tokens: int = 256,
        generate_retries: int = 2,
        threads: int = 0,
        image_px: int = 0,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; known dtypes: {', '.join(_DTYPES)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if generate_retries < 0:
            raise ValueError(f"generate_retries must be 0 or more, got {generate_retries}")
        if threads:
            torch.set_num_threads(threads)
        self.max_new_tokens = max_new_tokens
        self.image_px = image_px  # the area each image is shown at; 0 = as sent
        self.generate_retries = generate_retries
        self.embedded_tiny = is_tiny_model(model)

        drop_video_processor(Qwen3VLProcessor)  # CPU images lack torchvision; a no-op where it works
        transformers.utils.logging.disable_progress_bar()  # a service's log is read line by line
        start = time.monotonic()
        self.processor = AutoProcessor.from_pretrained(model, revision=revision)
        # left padding puts every row's answer position last, so one index reads the whole batch
        self.processor.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(
            model, revision=revision, dtype=_DTYPES[dtype], device_map=device
        ).eval()
        self.load_s = time.monotonic() - start
        self.backend = f"transformers/{type(self.model).__name__}"
        # the longest input the model's positions cover: a larger image becomes more visual tokens,
        # and past this the model would read positions it was never trained for without a word
        config = self.model.config
        self.max_input_tokens: int = getattr(getattr(config, "text_config", config), "max_position_embeddings")
        self.image_token_id: int | None = getattr(config, "image_token_id", None)
        log.info(
            "judge %s (revision %s) loaded on %s as %s in %.2f s%s",
            model,
            revision,
            self.model.device,
            self.model.dtype,
            self.load_s,
            " (embedded tiny model: scores mean nothing)" if self.embedded_tiny else "",
        )

    def score(
        self, jobs: list[ScoreJob], mode: str, rubric: Rubric, repeat: int | None = None
    ) -> list[Verdict | ItemFailure]:
        """Score each job with `rubric` in `mode`: one Verdict or ItemFailure per job, in order.
        `repeat` r (generate mode) makes this the r-th sampled judgement of a repeated one.

        Raises ValueError only for the whole call: an unknown mode, a repeat in logits mode, or logits
        mode with a tokenizer whose digits are not single tokens.
        """
        if mode not in MODES:
            raise ValueError(f"unknown scoring mode {mode!r}; known modes: {', '.join(MODES)}")
        if repeat is not None and (mode != "generate" or repeat < 0):
            raise ValueError(f"repeat {repeat!r} needs generate mode and a repeat index >= 0 (mode {mode!r})")
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

    # ---- logits mode -------------------------------------------------------------------------

    def _score_logits(
        self, jobs: list[ScoreJob], live: list[int], rubric: Rubric
    ) -> dict[int, Verdict | ItemFailure]:
        digit_ids = self._digit_token_ids()
        failed: dict[int, ItemFailure] = {}
        dists: dict[int, dict[str, list[float | str]]] = {i: {} for i in live}
        masses: dict[int, dict[str, float]] = {i: {} for i in live}
        visual = dict.fromkeys(live, 0)
        for question in rubric.questions:
            todo = [i for i in live if i not in failed and question.group in rubric.asked(jobs[i].has)]
            answer = partial(self._answer_distributions, jobs, rubric, question, digit_ids)
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

    def _digit_token_ids(self) -> list[int]:
        """Token ids of "0".."9"; logits mode needs Qwen-style digits, where "10" is "1" then "0"."""
        tokenizer = self.processor.tokenizer
        ids = [tokenizer.encode(str(d), add_special_tokens=False) for d in range(11)]
        if any(len(t) != 1 for t in ids[:10]) or ids[10] != ids[1] + ids[0]:
            raise ValueError(
                "logits mode needs a tokenizer that encodes each digit as one token and '10' as '1', '0'; "
                f"this one gives {ids}; use generate mode"
            )
        return [t[0] for t in ids[:10]]

    def _answer_distributions(
        self, jobs: list[ScoreJob], rubric: Rubric, question: Question, digit_ids: list[int], indices: list[int]
    ) -> list[tuple[list[float], float, int]]:
        """Per job: P(first answer token = "d") for d = 0..9, P("0" | "1") (see `answer_distribution`),
        and the visual tokens the judge read.

        One pass serves both: "1" is appended to every prompt, and causal attention makes the logits
        before it exactly those of the prompt alone (a separate second pass would repeat them).
        """
        images = rubric.groups[question.group].images
        prompts = [
            self._prompt(
                rubric, images, jobs[i], rubric.question_prompt(question, jobs[i].context), answer_start="1"
            )
            for i in indices
        ]
        inputs = self._encode(prompts)
        if not bool((inputs["input_ids"][:, -1] == digit_ids[1]).all()):
            raise RuntimeError("the tokenizer merged the appended '1' into the prompt's last token")
        with torch.inference_mode():
            logits = self.model(**inputs, logits_to_keep=2).logits
        probs = logits.float().softmax(-1).double().cpu()
        first = probs[:, 0, digit_ids]  # P(first answer token = d), d = 0..9
        zero_after_one = probs[:, 1, digit_ids[0]]  # P("0" | "1")
        return [(row.tolist(), float(p), tokens)
                for row, p, tokens in zip(first, zero_after_one, self._visual_tokens(inputs), strict=True)]

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
                # a greedy first attempt runs as a batch; sampled attempts run one job at a time, so a
                # job's sampled replies do not depend on which other jobs shared its batch
                outs = self._each(reply, pending) if seed is None else [self._each(reply, [i])[0] for i in pending]
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

    def _generate(
        self, jobs: list[ScoreJob], rubric: Rubric, group: str, seed: int | None, indices: list[int]
    ) -> list[tuple[str, int]]:
        """Per job: the reply text to `group`'s prompt (greedy without a seed, else sampled with it) and
        the visual tokens the judge read."""
        images = rubric.groups[group].images
        prompts = [
            self._prompt(rubric, images, jobs[i], rubric.group_prompt(group, jobs[i].context)) for i in indices
        ]
        inputs = self._encode(prompts)
        options: dict[str, object] = {"do_sample": False}
        if seed is not None:
            torch.manual_seed(seed)
            options = {"do_sample": True, "temperature": _RETRY_TEMPERATURE}
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.processor.tokenizer.pad_token_id,
                **options,
            )
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return list(zip(texts, self._visual_tokens(inputs), strict=True))

    # ---- shared ------------------------------------------------------------------------------

    def _prompt(
        self, rubric: Rubric, images: Sequence[str], job: ScoreJob, text: str, answer_start: str = ""
    ) -> _Prompt:
        """The chat-formatted prompt showing `images` of `job` and asking `text`; `answer_start` begins the reply."""
        # a multi-image edit shows all its sources (and references), in the benchmark's order
        by_name = {"source": job.sources, "edited": [job.edited], "reference": job.references}
        shown = [image for name in images for image in by_name[name]]
        messages = [
            {"role": "system", "content": rubric.system},
            {"role": "user", "content": [{"type": "image"} for _ in shown] + [{"type": "text", "text": text}]},
        ]
        chat = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return chat + answer_start, shown

    def _encode(self, prompts: list[_Prompt]) -> transformers.BatchFeature:
        texts = [text for text, _ in prompts]
        images = [image for _, shown in prompts for image in shown]
        # the result carries mm_token_type_ids, which transformers 5 needs for Qwen3-VL's M-RoPE positions
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        longest = int(inputs["attention_mask"].sum(dim=1).max())
        if longest > self.max_input_tokens:  # `_each` then retries one by one: only the long job fails
            raise ItemFailure("limit_exceeded", f"the judge's input is {longest} tokens, over the model's limit of "
                                                f"{self.max_input_tokens} (images are too large for this judge)")
        return inputs.to(self.model.device)

    def _visual_tokens(self, inputs: transformers.BatchFeature) -> list[int]:
        """Per row of `inputs`: its image tokens (0 for a model whose config names no image token)."""
        if self.image_token_id is None:
            return [0] * len(inputs["input_ids"])
        return (inputs["input_ids"] == self.image_token_id).sum(dim=1).tolist()

    def _shown(self, job: ScoreJob) -> ScoreJob:
        """`job` with every image within the judge's image budget."""
        return replace(job, sources=[_within(image, self.image_px) for image in job.sources],
                       edited=_within(job.edited, self.image_px),
                       references=[_within(image, self.image_px) for image in job.references])

    def _each(self, run: Callable[[list[int]], list[_Out]], indices: list[int]) -> list[_Out | ItemFailure]:
        """`run` over the whole batch; if it raises, retry job by job so that only the culprit fails."""
        if len(indices) > 1:
            try:
                return list(run(indices))
            except Exception:
                log.warning("judge failed on a batch of %d jobs; retrying them one by one", len(indices), exc_info=True)
            # freed after the except block, once the exception no longer pins the batch's tensors
            self._free_memory()
        outs: list[_Out | ItemFailure] = []
        for i in indices:
            error = None
            try:
                outs.extend(run([i]))
            except ItemFailure as e:
                error = e
            except Exception as e:
                log.warning("judge failed on job %d", i, exc_info=True)
                error = ItemFailure("model_error", f"judge model failed: {type(e).__name__}: {e}")
            if error is not None:
                self._free_memory()
                outs.append(error)
        return outs

    def _free_memory(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


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
    for field, image in named:
        if not isinstance(image, Image.Image):
            return f"{field} is a {type(image).__name__}, expected a PIL image"
        if image.mode != "RGB":
            return f"{field} image mode is {image.mode!r}, expected 'RGB'"
    if not isinstance(job.instruction, str):
        return f"instruction is a {type(job.instruction).__name__}, expected text"
    if not job.instruction.strip():
        return f"instruction {job.instruction!r} is empty"
    return None
