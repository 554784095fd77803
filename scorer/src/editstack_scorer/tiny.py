"""Build the embedded tiny judge: a random-weight Qwen3-VL of the real architecture, offline, in about a second.

It is saved with `save_pretrained` and loaded by `Judge` through the same `from_pretrained` path as a
real checkpoint, so the whole scorer runs on a CPU with no download. Its scores mean nothing; the
marker file `editstack_tiny.json` in the folder lets the service and the report say so.

Usage: python -m editstack_scorer.tiny OUT_DIR
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from editstack.service.tinymodels import build_model_folder

SEED = 0
# Widths and depths per size. "tiny" is the embedded default (1 MB, CPU); "mid" (~0.76 B parameters)
# times the same architecture on a GPU (scripts/benchmarks/midsize.py). "real" is Qwen3-VL-8B-Instruct
# itself, from its released config.json (8.8 B parameters, 17.5 GB in bf16; built on a GPU by
# scripts/benchmarks/gpu.py with --device cuda --dtype bfloat16). Keys only "real" has default to the
# tiny values: the tokenizer's vocabulary, 4096 positions and tied embeddings.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, mrope_section=[4, 2, 2],
                 vision_depth=2, vision_hidden=32, vision_intermediate=64, vision_heads=2, position_embeddings=64,
                 deepstack=[0, 1]),
    "mid": dict(hidden=2048, intermediate=6144, layers=12, heads=16, kv_heads=8, head_dim=128,
                mrope_section=[24, 20, 20], vision_depth=12, vision_hidden=768, vision_intermediate=3072,
                vision_heads=12, position_embeddings=2304, deepstack=[3, 7, 11]),
    "real": dict(hidden=4096, intermediate=12288, layers=36, heads=32, kv_heads=8, head_dim=128,
                 mrope_section=[24, 20, 20], vision_depth=27, vision_hidden=1152, vision_intermediate=4304,
                 vision_heads=16, position_embeddings=2304, deepstack=[8, 16, 24], vocab=151936,
                 positions=262144, tie_embeddings=False),
}

# A simplified Qwen3-VL chat template: system/user/assistant turns, images and text in the user's
# content, and the generation prompt. Real checkpoints bring their own template.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif c['type'] == 'text' -%}{{- c['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def build(out_dir: Path, size: str = "tiny", device: str = "cpu", dtype: str = "float32") -> Path:
    """Build the judge of `size` into `out_dir` (atomically) and return it; an existing build is kept.
    `device` and `dtype` (a torch dtype name) are where and in what its weights are made and saved."""
    return build_model_folder(out_dir, lambda folder: _write(folder, size, device, dtype))


def _write(folder: Path, size: str, device: str = "cpu", dtype: str = "float32") -> dict[str, object]:
    """Write tokenizer, processor, model and marker into `folder`; returns the marker's content."""
    import torch
    import transformers
    from transformers import (
        AutoTokenizer,
        Qwen2VLImageProcessorPil,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
    )

    from editstack.service.tinymodels import constructed_on, video_processor_kwargs, write_qwen_tokenizer

    video = video_processor_kwargs(Qwen3VLProcessor, "Qwen3VLVideoProcessor")
    ids = write_qwen_tokenizer(folder, chat_template=CHAT_TEMPLATE)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # the PIL backend needs no torchvision; the numbers are those of Qwen3-VL-*-Instruct's preprocessor
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        size={"shortest_edge": 65536, "longest_edge": 16777216},
    )
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                                 **video)

    dims = SIZES[size]
    tie_embeddings = dims.get("tie_embeddings", True)
    text_config = dict(
        vocab_size=dims.get("vocab", ids["vocab_size"]),
        hidden_size=dims["hidden"],
        intermediate_size=dims["intermediate"],
        num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv_heads"],
        head_dim=dims["head_dim"],
        hidden_act="silu",
        max_position_embeddings=dims.get("positions", 4096),
        rope_theta=5000000.0,
        # mrope sections sum to head_dim / 2
        rope_parameters={"rope_type": "default", "mrope_section": dims["mrope_section"], "mrope_interleaved": True},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=tie_embeddings,
    )
    vision_config = dict(
        depth=dims["vision_depth"],
        hidden_size=dims["vision_hidden"],
        intermediate_size=dims["vision_intermediate"],
        num_heads=dims["vision_heads"],
        out_hidden_size=dims["hidden"],
        in_channels=3,
        hidden_act="gelu_pytorch_tanh",
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=dims["position_embeddings"],
        deepstack_visual_indexes=dims["deepstack"],
    )
    config = Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie_embeddings,
    )
    # a private RNG stream: the weights are the same on every build, and a caller's seed is untouched
    with torch.random.fork_rng(devices=[]), constructed_on(device, dtype):
        torch.manual_seed(SEED)
        model = Qwen3VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)

    return {
        "note": "random weights: scores from this judge mean nothing",
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "size": size,
        "dtype": dtype,
        "seed": SEED,
        "built_by": "editstack_scorer.tiny",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m editstack_scorer.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to create (reused when it already holds a tiny judge)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", default="cpu", help="where the weights are made (real: cuda)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the weights' dtype, as saved")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(build(args.out_dir, args.size, args.device, args.dtype))


if __name__ == "__main__":
    main()
