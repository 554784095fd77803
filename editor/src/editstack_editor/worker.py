"""One editor worker: turns an edit request into jobs for its backend and the results into a reply.

Everything that can be checked without the model is checked here, per item, with errors naming
the item, the field and the value. Torch-free: the diffusers backend lives in `pipeline`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import PIL.Image

from editstack.wire.codec import Blobs, Limits
from editstack.wire.protocol import EditItem, EditReply, EditRequest, EditResult, ErrorReply, Reply, ScoreRequest
from editstack.errors import ItemFailure
from editstack.service.items import item_error, read_rgb, require_instruction

from editstack_editor.settings import EditorSettings

MAX_STEPS = 1000


@dataclass(frozen=True)
class EditJob:
    """One edit: source image, instruction and sampling parameters; the output is width x height."""

    image: PIL.Image.Image  # already RGB
    instruction: str
    seed: int
    steps: int
    guidance: float  # passed as true_cfg_scale; <= 1 disables classifier-free guidance
    negative_prompt: str
    width: int
    height: int


class Backend(Protocol):
    """A loaded model: one output per job, in order, an RGB image or the coded ItemFailure naming why not."""

    backend: str  # what serves the edits, e.g. "diffusers/QwenImageEditPipeline"
    size_multiple: int  # output sides must be multiples of this

    def edit(self, jobs: list[EditJob]) -> list[PIL.Image.Image | ItemFailure]: ...


class IdentityBackend:
    """Returns each source unchanged (resized only when another output size is asked for): the no-op
    baseline that calibrates the judge."""

    backend = "identity"
    size_multiple = 1

    def edit(self, jobs: list[EditJob]) -> list[PIL.Image.Image | ItemFailure]:
        return [job.image if job.image.size == (job.width, job.height)
                else job.image.resize((job.width, job.height), PIL.Image.Resampling.LANCZOS) for job in jobs]


class EditorWorker:
    """Serves edit requests on one backend (one device)."""

    def __init__(self, backend: Backend, settings: EditorSettings) -> None:
        self.backend = backend
        self.settings = settings
        self.limits: Limits = settings.limits

    def handle(self, request: EditRequest | ScoreRequest, blobs: list[memoryview]) -> tuple[Reply, Blobs | None]:
        if not isinstance(request, EditRequest):
            return ErrorReply("unsupported", "this is an editor: it answers edit requests, not score"), None
        params = request.params
        steps = self.settings.steps if params.steps is None else params.steps
        guidance = self.settings.guidance if params.guidance is None else params.guidance
        negative = self.settings.negative_prompt if params.negative_prompt is None else params.negative_prompt
        param_problem = _param_problem(steps, guidance)

        results: list[EditResult | None] = [None] * len(request.items)
        jobs: list[EditJob] = []
        slots: list[tuple[int, list[str]]] = []
        for index, item in enumerate(request.items):
            notes: list[str] = []
            try:
                if param_problem:
                    raise ItemFailure("bad_param", f"item {item.id!r} {param_problem}")
                require_instruction(item.id, item.instruction, self.limits)
                rgb = read_rgb(item.id, "image", item.image, blobs, self.limits, notes)
                width, height = self._output_size(item, rgb)
            except ItemFailure as failure:
                results[index] = EditResult(id=item.id, error=failure.error, notes=notes)
                continue
            jobs.append(EditJob(PIL.Image.fromarray(rgb), item.instruction, item.seed, steps, guidance, negative,
                                width, height))
            slots.append((index, notes))

        started = time.perf_counter()
        outputs = self.backend.edit(jobs) if jobs else []
        per_item_s = (time.perf_counter() - started) / max(1, len(jobs))
        out = Blobs()
        for (index, notes), output in zip(slots, outputs, strict=True):
            item_id = request.items[index].id
            if isinstance(output, Exception):
                results[index] = EditResult(id=item_id, error=item_error(item_id, output), elapsed_s=per_item_s,
                                            notes=notes)
            else:
                image = out.add(np.asarray(output.convert("RGB")))
                results[index] = EditResult(id=item_id, image=image, elapsed_s=per_item_s, notes=notes)
        return EditReply(items=[r for r in results if r is not None]), out

    def _output_size(self, item: EditItem, rgb: np.ndarray) -> tuple[int, int]:
        """The requested size, else the configured default, else the source's, floored to the step."""
        step = self.backend.size_multiple
        width = item.width or self.settings.width or rgb.shape[1] // step * step
        height = item.height or self.settings.height or rgb.shape[0] // step * step
        for name, value in (("width", width), ("height", height)):
            if value < step or value % step:
                raise ItemFailure("bad_param", f"item {item.id!r} field {name!r}: {value} is not a positive "
                                               f"multiple of {step}")
        if width * height > self.limits.max_image_px:
            raise ItemFailure("bad_param", f"item {item.id!r}: output {width}x{height} is over the limit of "
                                           f"{self.limits.max_image_px} pixels")
        return width, height


def _param_problem(steps: int, guidance: float) -> str | None:
    if not 1 <= steps <= MAX_STEPS:
        return f"field 'steps': {steps} is not in 1..{MAX_STEPS}"
    if not math.isfinite(guidance) or guidance < 0:
        return f"field 'guidance': {guidance} is not a finite number >= 0"
    return None
