"""The scorer's settings: one typed object read from SCORER_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from editstack.errors import SettingsError
from editstack.service.settings import LimitSettings, device_list
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
    """SCORER_<FIELD> for each field, e.g. SCORER_MODEL=Qwen/Qwen3-VL-8B-Instruct, SCORER_DEVICES=cuda:0,cuda:1."""

    other_names = ("gpu_ids",)  # SCORER_GPU_IDS: the host GPUs compose reserves for the scorer
    renamed = {"device": "devices"}  # a list since the judge runs one process per device

    model: str = EMBEDDED_MODEL  # a model id or folder, or "embedded-tiny"
    revision: str = ""  # a branch, tag or commit of the model repository; "" = its default
    endpoint: str = default_endpoint("scorer")  # a private per-user folder; compose sets /run/editstack
    # one judge process, with its own copy of the model, per listed device (the transformers backend)
    devices: str = "cpu"
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
    # a folder of judgements kept by content and shared across runs (cache.py); "" = no cache
    cache_dir: str = ""
    # who judges: a transformers model in this process, or an OpenAI-compatible server (the API_* settings)
    backend: Literal["transformers", "openai"] = "transformers"
    api_base: str = ""  # the server's base URL, e.g. https://api.openai.com/v1 or http://vllm-host:8000/v1
    api_model: str = ""  # the model name the server knows, e.g. gpt-4.1-2025-04-14
    # the API key: read from this file, else from the environment variable named here (unset: no key)
    api_key_file: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    api_concurrency: Annotated[int, msgspec.Meta(ge=1)] = 8  # requests in flight at once
    api_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 120.0  # one request's limit, each retry alike
    # retries of a request answered 408, 409, 429 or 5xx, or not at all (the openai client's backoff)
    api_retries: Annotated[int, msgspec.Meta(ge=0)] = 4
    # how long the service waits at start for the server to answer (a vLLM server may still be loading)
    api_start_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 900.0

    def api_key(self) -> str:
        """The API key (SCORER_API_KEY_FILE, else the variable SCORER_API_KEY_ENV names; "" for none).
        Raises SettingsError naming the file, never showing the key."""
        if not self.api_key_file:
            return os.environ.get(self.api_key_env, "").strip()
        try:
            key = Path(self.api_key_file).expanduser().read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"SCORER_API_KEY_FILE={self.api_key_file!r}: cannot read it: "
                                f"{getattr(exc, 'strerror', None) or exc}") from None
        if not key:
            raise SettingsError(f"SCORER_API_KEY_FILE={self.api_key_file!r}: the file is empty")
        return key

    def backend_problem(self) -> str | None:
        """Why the backend settings do not fit together, or None."""
        if self.backend == "openai":
            missing = [f"SCORER_{name.upper()}" for name in ("api_base", "api_model") if not getattr(self, name)]
            return f"SCORER_BACKEND=openai needs {' and '.join(missing)}" if missing else None
        if self.api_base:
            return (f"SCORER_API_BASE is set but SCORER_BACKEND is {self.backend!r}: set SCORER_BACKEND=openai to "
                    "judge through that server")
        if not self.device_list:
            return f"SCORER_DEVICES={self.devices!r} lists no device (e.g. cuda:0,cuda:1 or cpu)"
        return None

    @property
    def device_list(self) -> list[str]:
        return device_list(self.devices)

    @property
    def model_folder(self) -> str:
        """Where the model's files are when it is local: the tiny model's folder for embedded-tiny."""
        return self.tiny_dir if self.model == EMBEDDED_MODEL else self.model
