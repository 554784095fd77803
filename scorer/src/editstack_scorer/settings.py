"""The scorer's settings: one typed object read from SCORER_* environment variables."""

from __future__ import annotations

from typing import Annotated

import msgspec

from editstack.service.settings import LimitSettings
from editstack.wire.transport import default_endpoint
from editstack.wire.protocol import JudgeMode

from editstack_scorer.rubric import DEFAULT_RUBRIC

EMBEDDED_MODEL = "embedded-tiny"
# The area each image is shown to the judge at, by default: what GPT-4o and GPT-4.1 (the judges of the
# GEdit-Bench, KRIS-Bench, RISEBench and ImgEdit tables) see of a square image in their high-detail
# mode, which fits an image in 2048 x 2048 and then scales its shortest side to 768 px (OpenAI's
# vision guide, "Calculating costs"). A real Qwen3-VL reads it as 576 visual tokens, not ~4,000 at 2048².
JUDGE_IMAGE_PX = 768 * 768


class ScorerSettings(LimitSettings, frozen=True):
    """SCORER_<FIELD> for each field, e.g. SCORER_MODEL=Qwen/Qwen3-VL-8B-Instruct, SCORER_DEVICE=cuda:0."""

    other_names = ("gpu_ids",)  # SCORER_GPU_IDS: the host GPUs compose reserves for the scorer

    model: str = EMBEDDED_MODEL  # a model id or folder, or "embedded-tiny"
    revision: str = ""  # a branch, tag or commit of the model repository; "" = its default
    endpoint: str = default_endpoint("scorer")  # a private per-user folder; compose sets /run/editstack
    device: str = "cpu"
    dtype: str = "float32"  # float32, bfloat16, float16 or auto
    mode: JudgeMode = "logits"  # default scoring mode: logits or generate (a request may override)
    rubric: str = DEFAULT_RUBRIC  # default rubric id (a request may override)
    # a folder of the user's own rubric files, <id>.toml: they add rubrics, or replace shipped ones by id
    rubric_dir: str = ""
    batch_size: int = 4  # items per forward pass
    # each image is downscaled (aspect kept) to at most this area before the judge sees it; 0 = as sent
    judge_image_px: Annotated[int, msgspec.Meta(ge=0)] = JUDGE_IMAGE_PX
    max_new_tokens: int = 256  # generate mode: the reply's length limit
    generate_retries: int = 2  # generate mode: extra attempts after an unparseable reply
    threads: int = 0  # torch CPU threads; 0 = torch's default (all cores; two services on one CPU should share)
    tiny_dir: str = "~/.cache/editstack/models/tiny-qwen3-vl"  # where embedded-tiny is built

    @property
    def model_folder(self) -> str:
        """Where the model's files are when it is local: the tiny model's folder for embedded-tiny."""
        return self.tiny_dir if self.model == EMBEDDED_MODEL else self.model
