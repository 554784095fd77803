"""`transformers serve` where torchvision cannot be imported: the real OpenAI-compatible server of
transformers 5, started with the project's image-only processor patch applied first.

Run with the scorer's python: python tests/transformers_serve.py MODEL_FOLDER --port N [serve options].
The patch must be applied in the serving process itself (the server loads the processor there), so
this runs the transformers CLI in-process rather than as the `transformers` command.
"""

from __future__ import annotations

import sys

from transformers import Qwen3VLProcessor
from transformers.cli.transformers import app

from editstack.service.processors import drop_video_processor

if __name__ == "__main__":
    drop_video_processor(Qwen3VLProcessor)
    # `app`, not the CLI's `main`: main asks PyPI for a newer transformers first, and tests stay offline
    app(["serve", *sys.argv[1:]])
