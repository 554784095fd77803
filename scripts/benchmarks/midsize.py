"""Mid-size models of the real architectures on a CUDA GPU, in bf16 (random weights, built from code).

    python scripts/benchmarks/midsize.py editor   # in the editor's environment (diffusers 0.39, transformers 4.57)
    python scripts/benchmarks/midsize.py scorer   # in the scorer's environment (transformers 5)

editor: QwenImageEditPipeline at the "mid" size of editstack_editor.tiny (~1.25 B parameters), 512x512
edits, 20 steps, true_cfg_scale 4 (guidance on: two transformer passes per step), the pipeline's own
~1024² conditioning size: seconds per edit one at a time and in a batch of 4, peak GPU memory.
scorer: Qwen3VLForConditionalGeneration at the "mid" size of editstack_scorer.tiny (~0.76 B parameters),
batches of 4 items of two 512x512 images: logits-mode and generate-mode items per second, peak memory.
The last line is the summary.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPEATS = 3


def _images(n: int, side: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def _timed(call: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def editor(folder: Path) -> str:
    from editstack_editor import tiny
    from editstack_editor.pipeline import DiffusersEditor
    from editstack_editor.worker import EditJob

    started = time.perf_counter()
    tiny.build(folder / "editor-mid", size="mid", pipeline="edit")  # batchable: batch 1 vs 4 is timed
    print(f"build: {time.perf_counter() - started:.1f} s")
    jobs = [EditJob([image], "make the sky blue", seed, 20, 4.0, " ", 512, 512)
            for seed, image in enumerate(_images(4, 512, 0))]
    figures = {}
    for batch_size in (1, 4):
        started = time.perf_counter()
        editor = DiffusersEditor(str(folder / "editor-mid"), None, "cuda:0", "bfloat16", None, batch_size=batch_size)
        load_s = time.perf_counter() - started
        params = sum(p.numel() for name in ("transformer", "text_encoder", "vae")
                     for p in getattr(editor._pipe, name).parameters())
        editor.edit(jobs[:1])  # warm-up: kernels, allocator
        torch.cuda.reset_peak_memory_stats()
        runs = [_timed(partial(editor.edit, jobs)) for _ in range(REPEATS)]
        outputs = editor.edit(jobs)
        assert all(isinstance(o, Image.Image) and o.size == (512, 512) for o in outputs), outputs
        per_edit = statistics.median(runs) / len(jobs)
        peak = torch.cuda.max_memory_allocated() / 2**30
        figures[batch_size] = (per_edit, peak)
        print(f"batch_size={batch_size}: {per_edit:.3f} s/edit (median of {REPEATS} batches of 4), "
              f"peak {peak:.2f} GiB, load {load_s:.1f} s, {params / 1e9:.2f} B parameters")
        del editor
        torch.cuda.empty_cache()
    (alone, peak), (batched, peak4) = figures[1], figures[4]
    return (f"editor-gpu: device={torch.cuda.get_device_name()} dtype=bfloat16 size=512 steps=20 cfg=4 "
            f"s_per_edit={alone:.3f} peak_gpu_gib={peak:.2f} batched4_s_per_edit={batched:.3f} "
            f"batched4_peak_gpu_gib={peak4:.2f}")


def scorer(folder: Path) -> str:
    from editstack_scorer import tiny
    from editstack_scorer.judge import Judge, ScoreJob
    from editstack_scorer.rubric import load_rubric

    started = time.perf_counter()
    tiny.build(folder / "scorer-mid", size="mid")
    print(f"build: {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    judge = Judge(str(folder / "scorer-mid"), None, "cuda:0", "bfloat16", max_new_tokens=64, generate_retries=0)
    load_s = time.perf_counter() - started
    params = sum(p.numel() for p in judge.model.parameters())
    rubric = load_rubric("viescore")
    sources, edits = _images(4, 512, 1), _images(4, 512, 2)
    jobs = [ScoreJob([s], e, "make the sky blue") for s, e in zip(sources, edits, strict=True)]
    judge.score(jobs[:1], "logits", rubric)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    rates = {}
    for mode in ("logits", "generate"):
        runs = [_timed(partial(judge.score, jobs, mode, rubric)) for _ in range(REPEATS)]
        rates[mode] = len(jobs) / statistics.median(runs)
        print(f"{mode}: {rates[mode]:.2f} items/s (median of {REPEATS} batches of 4)")
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"peak {peak:.2f} GiB, load {load_s:.1f} s, {params / 1e9:.2f} B parameters; generate: greedy, at most "
          "64 new tokens, no retries (random weights write gibberish, so every reply runs to the cap)")
    return (f"scorer-gpu: device={torch.cuda.get_device_name()} dtype=bfloat16 image=512 "
            f"logits_items_per_s={rates['logits']:.2f} generate_items_per_s={rates['generate']:.2f} "
            f"peak_gpu_gib={peak:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("service", choices=["editor", "scorer"])
    parser.add_argument("--models", type=Path, help="where to build the models (default: a temp folder)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("midsize: no CUDA GPU here; this benchmark is for GPU machines")
    folder = args.models or Path(tempfile.mkdtemp(prefix="editstack-midsize-"))
    print(editor(folder) if args.service == "editor" else scorer(folder))


if __name__ == "__main__":
    main()
