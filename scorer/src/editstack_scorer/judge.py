"""The transformers judge: a vision-language model (Qwen3-VL first) loaded in this process, scoring
image edits with a rubric by the procedure `backend.JudgeBackend` holds for every backend.

The only scorer module that imports torch and transformers. Logits mode reads all the model's
next-token probabilities in one forward pass per question; generate mode batches greedy first attempts.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
import transformers
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen3VLProcessor

from editstack.errors import ItemFailure
from editstack.service.process import is_tiny_model
from editstack.service.processors import drop_video_processor
from editstack_scorer.backend import RETRY_TEMPERATURE, Answer, JudgeBackend, Reply, ScoreJob, chat_messages
from editstack_scorer.rubric import Question, Rubric

log = logging.getLogger(__name__)

_Out = TypeVar("_Out")
_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# A prompt ready for the processor: the chat-formatted text and the images it shows, in order.
_Prompt = tuple[str, list[Image.Image]]


class Judge(JudgeBackend):
    """A VLM judge loaded once in this process; `score` runs batches of jobs through it."""

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
        super().__init__(max_new_tokens=max_new_tokens, generate_retries=generate_retries, image_px=image_px)
        if threads:
            torch.set_num_threads(threads)
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
        self.digit_ids = self._digit_token_ids()
        if self.digit_ids is None:
            self.unavailable_modes["logits"] = (
                "its tokenizer does not encode each digit as one token and '10' as '1', '0'; use generate mode")
        # the weights answer, so they are named exactly: the hub commit, or a local folder's files
        self.fingerprint = {"backend": self.backend, "model": model, "revision": revision or "",
                            "weights": getattr(config, "_commit_hash", None) or _folder_fingerprint(model),
                            "dtype": dtype, "max_new_tokens": max_new_tokens,
                            "generate_retries": generate_retries, "image_px": image_px}
        log.info(
            "judge %s (revision %s) loaded on %s as %s in %.2f s%s",
            model,
            revision,
            self.model.device,
            self.model.dtype,
            self.load_s,
            " (embedded tiny model: scores mean nothing)" if self.embedded_tiny else "",
        )

    def _digit_token_ids(self) -> list[int] | None:
        """Token ids of "0".."9" where each digit is one token and "10" is "1" then "0" (Qwen-style),
        as logits mode reads them; None for another tokenizer."""
        tokenizer = self.processor.tokenizer
        ids = [tokenizer.encode(str(d), add_special_tokens=False) for d in range(11)]
        if any(len(t) != 1 for t in ids[:10]) or ids[10] != ids[1] + ids[0]:
            return None
        return [t[0] for t in ids[:10]]

    def _answer_distributions(
        self, jobs: list[ScoreJob], rubric: Rubric, question: Question, indices: list[int]
    ) -> list[Answer]:
        """One pass serves both probabilities of an Answer: "1" is appended to every prompt, and causal
        attention makes the logits before it exactly those of the prompt alone (a separate second
        pass would repeat them)."""
        digit_ids = self.digit_ids
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
        start = time.monotonic()
        with torch.inference_mode():
            logits = self.model(**inputs, logits_to_keep=2).logits
        probs = logits.float().softmax(-1).double().cpu()
        self._charge(jobs, indices, inputs["attention_mask"].sum(dim=1).tolist(), [0] * len(indices),
                     time.monotonic() - start)
        first = probs[:, 0, digit_ids]  # P(first answer token = d), d = 0..9
        zero_after_one = probs[:, 1, digit_ids[0]]  # P("0" | "1")
        return [(row.tolist(), float(p), tokens)
                for row, p, tokens in zip(first, zero_after_one, self._visual_tokens(inputs), strict=True)]

    def _generate(
        self, jobs: list[ScoreJob], rubric: Rubric, group: str, seed: int | None, indices: list[int]
    ) -> list[Reply]:
        images = rubric.groups[group].images
        prompts = [
            self._prompt(rubric, images, jobs[i], rubric.group_prompt(group, jobs[i].context)) for i in indices
        ]
        inputs = self._encode(prompts)
        options: dict[str, object] = {"do_sample": False}
        if seed is not None:
            torch.manual_seed(seed)
            options = {"do_sample": True, "temperature": RETRY_TEMPERATURE}
        start = time.monotonic()
        pad_token_id = self.processor.tokenizer.pad_token_id
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=pad_token_id,
                **options,
            )
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        # a row that ended early is padded up to the batch's longest reply: padding is no completion
        self._charge(jobs, indices, inputs["attention_mask"].sum(dim=1).tolist(),
                     (new_tokens != pad_token_id).sum(dim=1).tolist(), time.monotonic() - start)
        texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return list(zip(texts, self._visual_tokens(inputs), strict=True))

    def _prompt(
        self, rubric: Rubric, images: Sequence[str], job: ScoreJob, text: str, answer_start: str = ""
    ) -> _Prompt:
        """The chat-formatted prompt showing `images` of `job` and asking `text`; `answer_start` begins the reply."""
        messages, shown = chat_messages(rubric, images, job, text, lambda _: {"type": "image"})
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

    @staticmethod
    def _charge(jobs: list[ScoreJob], indices: list[int], prompt_tokens: list[int], completion_tokens: list[int],
                seconds: float) -> None:
        """Each row's tokens to its job's meter, and an equal share of the batched pass's seconds."""
        for i, prompt, completion in zip(indices, prompt_tokens, completion_tokens, strict=True):
            jobs[i].meter.add(prompt, completion, seconds / len(indices))

    def _each(self, run: Callable[[list[int]], list[_Out]], indices: list[int],
              batch: bool = True) -> list[_Out | ItemFailure]:
        """`run` over the whole batch; if it raises, retry job by job so that only the culprit fails."""
        if not batch:
            return [out for i in indices for out in self._each(run, [i])]
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


def _folder_fingerprint(model: str) -> str:
    """A local model folder's files by name, size and modification time (a rebuilt or replaced
    checkpoint differs), hashed; "" for a hub id. Reading the weights themselves could take minutes."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return ""
    stats = sorted((str(f.relative_to(folder)), f.stat().st_size, f.stat().st_mtime_ns)
                   for f in folder.rglob("*") if f.is_file())
    return hashlib.sha256(repr(stats).encode()).hexdigest()
