"""One editor worker: turns an edit request into jobs for its backend and the results into a reply,
and how a worker process loads one.

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
from editstack.service.process import embedded_model
from editstack.service.workers import Loaded

from editstack_editor.settings import EMBEDDED_MODEL, IDENTITY_MODEL, EditorSettings

MAX_STEPS = 1000


@dataclass(frozen=True)
class EditJob:
    """One edit: source images, instruction and sampling parameters; the output is width x height."""

    images: list[PIL.Image.Image]  # one or more, already RGB
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
    max_images: int | None  # source images one edit may take (None: any number)

    def default_size(self, width: int, height: int, max_px: int | None) -> tuple[int, int]:
        """The output size for a source of width x height when none is asked for, within max_px."""
        ...

    def edit(self, jobs: list[EditJob]) -> list[PIL.Image.Image | ItemFailure]: ...


class IdentityBackend:
    """Returns each source unchanged (resized only when another output size is asked for): the no-op
    baseline that calibrates the judge."""

    backend = "identity"
    size_multiple = 1
    max_images = 1  # which of several sources is "unchanged" has no answer

    def default_size(self, width: int, height: int, max_px: int | None) -> tuple[int, int]:
        return width, height

    def edit(self, jobs: list[EditJob]) -> list[PIL.Image.Image | ItemFailure]:
        return [job.images[0] if job.images[0].size == (job.width, job.height)
                else job.images[0].resize((job.width, job.height), PIL.Image.Resampling.LANCZOS) for job in jobs]


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
                self._check_image_count(item)
                sources = [read_rgb(item.id, f"images[{k}]", ref, blobs, self.limits, notes)
                           for k, ref in enumerate(item.images)]
                width, height = self._output_size(item, sources[0])
            except ItemFailure as failure:
                results[index] = EditResult(id=item.id, error=failure.error, notes=notes)
                continue
            jobs.append(EditJob([PIL.Image.fromarray(rgb) for rgb in sources], item.instruction, item.seed, steps,
                                guidance, negative, width, height))
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

    def _check_image_count(self, item: EditItem) -> None:
        limit = self.backend.max_images
        if not item.images:
            raise ItemFailure("missing_image", f"item {item.id!r} field 'images': no source image was sent")
        if limit is not None and len(item.images) > limit:
            raise ItemFailure("unsupported", f"item {item.id!r} field 'images': {len(item.images)} source images; "
                                             f"{self.backend.backend} takes at most {limit}")

    def _output_size(self, item: EditItem, rgb: np.ndarray) -> tuple[int, int]:
        """The requested size, else the configured default, else the model's own rule for the first
        source's aspect ratio (within EDITOR_MAX_OUTPUT_PX); checked before the model runs."""
        step = self.backend.size_multiple
        width, height = item.width or self.settings.width, item.height or self.settings.height
        if bool(width) != bool(height):
            raise ItemFailure("bad_param", f"item {item.id!r}: width {width} and height {height} must be set together")
        if not width:
            width, height = self.backend.default_size(rgb.shape[1], rgb.shape[0], self.settings.output_cap_px)
        for name, value in (("width", width), ("height", height)):
            if value < step or value % step:
                raise ItemFailure("bad_param", f"item {item.id!r} field {name!r}: {value} is not a positive "
                                               f"multiple of {step}")
        if width * height > self.limits.max_image_px:
            raise ItemFailure("bad_param", f"item {item.id!r}: output {width}x{height} is over the limit of "
                                           f"{self.limits.max_image_px} pixels")
        return width, height


def load_worker(settings: EditorSettings, device: str) -> tuple[EditorWorker, Loaded]:
    """The worker on `device` with its model loaded, and what Status says of it (run in its worker process)."""
    if settings.model == IDENTITY_MODEL:
        backend: Backend = IdentityBackend()
    else:
        from editstack_editor import tiny
        from editstack_editor.pipeline import DiffusersEditor  # the one module that imports torch

        model = embedded_model(settings.tiny_dir, tiny.build) if settings.model == EMBEDDED_MODEL else settings.model
        backend = DiffusersEditor(model, settings.revision or None, device, settings.dtype, settings.condition_cap_px,
                                  batch_size=settings.batch_size, threads=settings.threads, offload=settings.offload,
                                  layerwise_cast=settings.layerwise_cast)
    return EditorWorker(backend, settings), Loaded(backend.backend)


def _param_problem(steps: int, guidance: float) -> str | None:
    if not 1 <= steps <= MAX_STEPS:
        return f"field 'steps': {steps} is not in 1..{MAX_STEPS}"
    if not math.isfinite(guidance) or guidance < 0:
        return f"field 'guidance': {guidance} is not a finite number >= 0"
    return None
