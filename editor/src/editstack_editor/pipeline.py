"""The editor's model: a diffusers image-edit pipeline, loaded once, turning batches of jobs into images.

The only module of the editor that imports torch and diffusers. A failed item comes back as an
ItemFailure with its code in its slot of the result list; it never takes its batch neighbours or
the process down.
"""

from __future__ import annotations

import functools
import gc
import logging
import sys
import time
from types import ModuleType

import diffusers
import PIL.Image
import torch
import transformers
from diffusers import DiffusionPipeline
from transformers import Qwen2VLProcessor

from editstack.errors import ItemFailure
from editstack.service.processors import drop_video_processor

from editstack_editor.worker import EditJob

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_STORAGE_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
_OFFLOADS = ("none", "model", "group")
# The pipelines this module knows how to call, and whether one call may carry several items:
# QwenImageEditPlusPipeline refuses batch_size > 1 (diffusers 0.39.0).
_BATCHABLE = {"QwenImageEditPipeline": True, "QwenImageEditPlusPipeline": False}
# How many source images one edit may take: QwenImageEditPipeline conditions on one image;
# QwenImageEditPlusPipeline (Qwen-Image-Edit-2509) on a list of them ("Picture 1:", "Picture 2:"...).
_MAX_IMAGES = {"QwenImageEditPipeline": 1, "QwenImageEditPlusPipeline": None}
# Both pipelines' default output area when no size is given (their `calculate_dimensions(1024 * 1024, ratio)`)
_DEFAULT_AREA_PX = 1024 * 1024


class DiffusersEditor:
    """A Qwen-Image-Edit family pipeline, loaded once; `edit` returns an image or an ItemFailure per job."""

    def __init__(
        self,
        model: str,
        revision: str | None,
        device: str,
        dtype: str,
        condition_max_px: int | None = None,
        *,
        batch_size: int = 1,
        threads: int = 0,
        offload: str = "none",
        layerwise_cast: str = "",
    ) -> None:
        """`batch_size`: items per pipeline call where the pipeline can batch. Larger is faster, but an
        item's pixels then depend on its neighbours (padding and kernel choice change the rounding:
        on an H200 hundreds of pixels of a 64x64 edit moved), so resumed or re-batched runs stop
        reproducing. 1 makes every edit a function of its own job alone. `offload` ("none", "model",
        "group") and `layerwise_cast` (a float8 storage dtype, or "") trade speed for device memory."""
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        if offload not in _OFFLOADS:
            raise ValueError(f"offload {offload!r} is not one of {_OFFLOADS}")
        if layerwise_cast and layerwise_cast not in _STORAGE_DTYPES:
            raise ValueError(f"layerwise_cast {layerwise_cast!r} is not one of {sorted(_STORAGE_DTYPES)}")
        if condition_max_px is not None and condition_max_px < 32 * 32:
            raise ValueError(f"condition_max_px {condition_max_px} is below 32*32, the pipelines' size step")
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be at least 1")
        if threads:
            torch.set_num_threads(threads)
        if torch.device(device).type == "cuda":
            # libraries that allocate on the current device (group offloading's CUDA stream) use this one;
            # a bare "cuda" means the first device, as .to("cuda") does
            torch.cuda.set_device(torch.device(device).index or 0)
        # read the class first: refusing an unsupported model should not cost loading its weights
        pipeline_class = DiffusionPipeline.load_config(model, revision=revision)["_class_name"]
        if pipeline_class not in _BATCHABLE:
            raise ValueError(f"model {model!r} is a {pipeline_class}; supported: {', '.join(_BATCHABLE)}")
        drop_video_processor(Qwen2VLProcessor)  # no-op where torchvision works (GPU images)
        # a service's log is read line by line: no loading bars (the call below disables the edit bars)
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()

        started = time.perf_counter()
        pipe = DiffusionPipeline.from_pretrained(model, revision=revision, torch_dtype=_DTYPES[dtype])
        if layerwise_cast:  # before offloading, whose hooks then move the weights in their storage dtype
            pipe.transformer.enable_layerwise_casting(storage_dtype=_STORAGE_DTYPES[layerwise_cast],
                                                      compute_dtype=_DTYPES[dtype])
        _place(pipe, device, offload)
        pipe.set_progress_bar_config(disable=True)
        _cap_condition_area(sys.modules[type(pipe).__module__], condition_max_px)
        logger.info("loaded %s (%s, revision %s) on %s as %s (offload %s, layerwise cast %s) in %.1f s; "
                    "transformer weights %s", model, pipeline_class, revision, device, dtype, offload,
                    layerwise_cast or "off", time.perf_counter() - started, _weights(pipe.transformer))

        self.pipeline_class: str = pipeline_class
        self.backend = f"diffusers/{pipeline_class}"
        self.max_images: int | None = _MAX_IMAGES[pipeline_class]
        module = sys.modules[type(pipe).__module__]
        # the module's own rule, not the conditioning cap `_cap_condition_area` wraps around it
        self._calculate_dimensions = getattr(module.calculate_dimensions, "__wrapped__", module.calculate_dimensions)
        self._pipe = pipe
        self._batch_size = batch_size if _BATCHABLE[pipeline_class] else 1
        # output sides must be multiples of this: both pipelines floor other sizes without a word
        self.size_multiple: int = pipe.vae_scale_factor * 2

    def default_size(self, width: int, height: int, max_px: int | None) -> tuple[int, int]:
        """The size the pipeline itself gives a width x height source (~1024² at its aspect ratio, sides
        multiples of 32), its area capped at max_px."""
        area = _DEFAULT_AREA_PX if max_px is None else min(_DEFAULT_AREA_PX, max_px)
        out_width, out_height = self._calculate_dimensions(area, width / height)[:2]
        return max(32, int(out_width)), max(32, int(out_height))

    def edit(self, jobs: list[EditJob]) -> list[PIL.Image.Image | ItemFailure]:
        """Edit each job; one entry per job, in order: the RGB image, or the ItemFailure that names why not."""
        results: dict[int, PIL.Image.Image | ItemFailure] = {}
        batches: dict[tuple[object, ...], list[int]] = {}
        for index, job in enumerate(jobs):
            problem = self._problem(job)
            if problem is not None:
                results[index] = ItemFailure("bad_param", problem)
            else:
                batches.setdefault(_batch_key(job), []).append(index)

        for indices in batches.values():
            for start in range(0, len(indices), self._batch_size):
                chunk = indices[start : start + self._batch_size]
                if len(chunk) > 1:
                    images = self._run_batch([jobs[i] for i in chunk])
                    if images is not None:
                        results.update(zip(chunk, images, strict=True))
                        continue
                for i in chunk:
                    results[i] = self._run_alone(jobs[i])
        return [results[i] for i in range(len(jobs))]

    def _problem(self, job: EditJob) -> str | None:
        """What would make the pipeline fail or quietly return another size (the worker checks requests
        first; this guards the output size promise for any caller)."""
        if job.steps < 1:
            return f"steps is {job.steps}, must be at least 1"
        for name, value in (("width", job.width), ("height", job.height)):
            if value < self.size_multiple or value % self.size_multiple:
                return f"{name} is {value}, must be a positive multiple of {self.size_multiple}"
        return None

    def _run_batch(self, jobs: list[EditJob]) -> list[PIL.Image.Image] | None:
        """All jobs in one pipeline call, or None when that call failed (the caller retries them alone)."""
        try:
            return self._call(jobs)
        except Exception as exc:
            logger.warning("batch of %d edits failed (%s: %s); retrying them one by one",
                           len(jobs), type(exc).__name__, exc)
        self._free_memory()
        return None

    def _run_alone(self, job: EditJob) -> PIL.Image.Image | ItemFailure:
        try:
            return self._call([job])[0]
        except Exception as exc:
            if isinstance(exc, torch.OutOfMemoryError):
                failure = ItemFailure("model_error", f"out of memory in {self.pipeline_class}: {exc}")
            else:
                failure = ItemFailure("model_error", f"{self.pipeline_class} failed: {type(exc).__name__}: {exc}")
            # the traceback stays in the service's log; the item's error carries the one-line cause
            logger.warning("edit failed (seed %d, %dx%d, %d steps): %s", job.seed, job.width, job.height, job.steps,
                           failure, exc_info=True)
        # outside the except block: the traceback's frames, and the tensors they hold, are gone now
        self._free_memory()
        return failure

    def _call(self, jobs: list[EditJob]) -> list[PIL.Image.Image]:
        """One pipeline call; the jobs share everything in `_batch_key`."""
        first = jobs[0]
        result = self._pipe(
            # QwenImageEditPipeline: one image per item; QwenImageEditPlusPipeline (never batched): the
            # list of one item's input images. Both read a list of PIL images.
            image=[job.images[0] for job in jobs] if _BATCHABLE[self.pipeline_class] else first.images,
            prompt=[job.instruction for job in jobs],
            # without guidance the negative prompt is unused; passing it would only log a warning per call
            negative_prompt=[first.negative_prompt] * len(jobs) if first.guidance > 1 else None,
            true_cfg_scale=first.guidance,
            num_inference_steps=first.steps,
            width=first.width,
            height=first.height,
            # one CPU generator per item: its noise depends only on its own seed, in any batch and on
            # any device
            generator=[torch.Generator("cpu").manual_seed(job.seed) for job in jobs],
        )
        return result.images

    def _free_memory(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _place(pipe: DiffusionPipeline, device: str, offload: str) -> None:
    """Put the pipeline on `device`, or keep its weights on the CPU and move them there as they run."""
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "group":
        # one block per group, streamed ahead of its use on CUDA. The VAE stays on the device: the
        # pipelines call vae.encode, not its forward, so block-level hooks leave its conv_in on the CPU
        # (diffusers 0.39 on an H100: "weight type (CPUBFloat16Type)"), and it is small (0.13 B of ~29 B).
        # Each block is pinned as it moves (low_cpu_mem_usage): streaming otherwise pins a copy of every
        # weight at once beside the loaded one, two host copies (~116 GB for Qwen-Image-Edit-2509 in
        # bf16), which the hosts of the small GPUs this is for do not have
        pipe.enable_group_offload(onload_device=torch.device(device), offload_device=torch.device("cpu"),
                                  offload_type="block_level", num_blocks_per_group=1,
                                  use_stream=torch.device(device).type == "cuda", low_cpu_mem_usage=True,
                                  exclude_modules=["vae"])
    else:
        pipe.to(device)


def _weights(module: torch.nn.Module) -> str:
    """What `module`'s weights take, as stored: "19.2 GiB (float8_e4m3fn 97%, bfloat16 3%)", the shares
    by bytes. Layerwise casting keeps some layers (norms, embeddings) in the compute dtype."""
    by_dtype: dict[torch.dtype, int] = {}
    for parameter in module.parameters():
        by_dtype[parameter.dtype] = by_dtype.get(parameter.dtype, 0) + parameter.numel() * parameter.element_size()
    total = sum(by_dtype.values())
    shares = ", ".join(f"{str(dtype).removeprefix('torch.')} {size / total:.0%}"
                       for dtype, size in sorted(by_dtype.items(), key=lambda kv: -kv[1]))
    size = f"{total / 2**30:.2f} GiB" if total >= 2**30 else f"{total / 2**20:.1f} MiB"
    return f"{size} ({shares})"


def _batch_key(job: EditJob) -> tuple[object, ...]:
    # QwenImageEditPipeline sizes every item's conditioning image from the first image's aspect
    # ratio, so only jobs with equal ratios may share a call
    return (job.steps, job.guidance, job.negative_prompt, job.width, job.height,
            job.images[0].width / job.images[0].height)


def _cap_condition_area(module: ModuleType, max_px: int | None) -> None:
    """Cap the area the pipeline module resizes conditioning images to; None restores its own sizes.

    The Qwen edit pipelines resize every conditioning image to about 1024x1024 (Plus: also 384x384
    for the text encoder), whatever the input and output sizes. For the tiny CPU model the VAE
    encode at that size takes ~5 s against ~0.1 s for the rest of an edit, so tests cap it. The
    pipelines offer no argument for it: this rebinds the module's `calculate_dimensions`, for every
    pipeline of that module in the process (the editor's workers share one setting).
    """
    original = getattr(module.calculate_dimensions, "__wrapped__", module.calculate_dimensions)
    if max_px is None:
        module.calculate_dimensions = original
        return

    @functools.wraps(original)
    def capped(target_area: int, ratio: float) -> tuple[int, ...]:
        return original(min(target_area, max_px), ratio)

    module.calculate_dimensions = capped
