"""The editor's settings: one typed object read from EDITOR_* environment variables."""

from __future__ import annotations

from typing import Literal

from editstack.errors import SettingsError
from editstack.service.settings import LimitSettings, device_list
from editstack.wire.transport import default_endpoint

EMBEDDED_MODEL = "embedded-tiny"
IDENTITY_MODEL = "identity"
EMBEDDED_CONDITION_PX = 64 * 64
EMBEDDED_OUTPUT_PX = 256 * 256


class EditorSettings(LimitSettings, frozen=True):
    """EDITOR_<FIELD> for each field, e.g. EDITOR_MODEL, EDITOR_DEVICES=cuda:0,cuda:1."""

    other_names = ("gpu_ids",)  # EDITOR_GPU_IDS: the host GPUs compose reserves for the editor

    model: str = EMBEDDED_MODEL  # a model id or folder, "identity", or "embedded-tiny"
    revision: str = ""  # a branch, tag or commit of the model repository; "" = its default
    endpoint: str = default_endpoint("editor")  # a private per-user folder; compose sets /run/editstack
    devices: str = "cpu"  # one worker, with its own copy of the model, per listed device
    dtype: str = "float32"  # float32, bfloat16 or float16
    steps: int = 4  # default sampling steps (a request may override)
    guidance: float = 1.0  # default true_cfg_scale; <= 1 disables classifier-free guidance
    negative_prompt: str = " "  # default; None would silently disable CFG in the Qwen pipelines
    # default output size; 0 = the model's own rule: ~1024² at the source's aspect ratio for the Qwen
    # pipelines (the source's size for identity), capped by max_output_px
    width: int = 0
    height: int = 0
    # cap on that default output area; unset = 256² for embedded-tiny (CPU edits), else none
    max_output_px: int | None = None
    # cap on the conditioning image's area (the Qwen edit pipelines resize it to ~1024² whatever the
    # output size); unset = 4096 (64²) for embedded-tiny, whose CPU edits take 10 s at 1024², and
    # the pipeline's own size for every other model; 0 = the pipeline's own size
    condition_max_px: int | None = None
    # items per pipeline call; > 1 is faster but makes an item's pixels depend on its batch
    # neighbours, so a resumed or re-batched run no longer reproduces bytes; 1 keeps them exact
    batch_size: int = 1
    # torch CPU threads of each worker process; 0 = torch's default (all cores; two services on one CPU should share)
    threads: int = 0
    # where the weights wait between uses, for GPUs too small for the model: "model" moves each
    # component to the device while it runs (diffusers' enable_model_cpu_offload), "group" each group
    # of blocks (diffusers' group offloading, block_level, with a CUDA stream): least memory, slowest
    offload: Literal["none", "model", "group"] = "none"
    # the transformer's weights stored in this dtype, cast to EDITOR_DTYPE layer by layer as it runs
    # (diffusers' enable_layerwise_casting): about half the memory of bfloat16; "" = off
    layerwise_cast: Literal["", "float8_e4m3fn", "float8_e5m2"] = ""
    tiny_dir: str = "~/.cache/editstack/models/tiny-qwen-image-edit"  # where embedded-tiny is built

    @property
    def condition_cap_px(self) -> int | None:
        """The cap the pipeline gets: None for the pipeline's own size."""
        if self.condition_max_px is None:
            return EMBEDDED_CONDITION_PX if self.model == EMBEDDED_MODEL else None
        return self.condition_max_px or None

    @property
    def output_cap_px(self) -> int | None:
        """The cap on a default output size: None for the model's own size."""
        if self.max_output_px is None:
            return EMBEDDED_OUTPUT_PX if self.model == EMBEDDED_MODEL else None
        return self.max_output_px or None

    @property
    def model_folder(self) -> str:
        """Where the model's files are when it is local: the tiny model's folder for embedded-tiny."""
        return self.tiny_dir if self.model == EMBEDDED_MODEL else self.model

    @property
    def device_list(self) -> list[str]:
        return device_list(self.devices)

    def check(self) -> EditorSettings:
        """These settings, or SettingsError for a combination no worker could load."""
        if not self.device_list:
            raise SettingsError(f"EDITOR_DEVICES={self.devices!r} lists no device (e.g. cuda:0,cuda:1 or cpu)")
        cpus = [device for device in self.device_list if device.startswith("cpu")]
        if self.offload == "group" and cpus:
            # diffusers 0.39's group offloading needs an accelerator: on a CPU-only machine it raises
            # AttributeError ('NoneType' object has no attribute 'type') at its first block
            raise SettingsError(f"EDITOR_OFFLOAD='group' moves weights between the CPU and an accelerator, but "
                                f"EDITOR_DEVICES={self.devices!r} lists {cpus[0]!r} (use 'none' or 'model' there)")
        return self
