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

from editstack.tinymodels import build_model_folder

SEED = 0

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


def build(out_dir: Path) -> Path:
    """Build the tiny judge into `out_dir` (atomically) and return it; an existing build is kept."""
    return build_model_folder(out_dir, _write)


def _write(folder: Path) -> dict[str, object]:
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

    from editstack.tinymodels import drop_video_processor, write_qwen_tokenizer

    drop_video_processor(Qwen3VLProcessor)
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
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)

    text_config = dict(
        vocab_size=ids["vocab_size"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        hidden_act="silu",
        max_position_embeddings=4096,
        rope_theta=5000000.0,
        # mrope sections sum to head_dim / 2
        rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )
    vision_config = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        in_channels=3,
        hidden_act="gelu_pytorch_tanh",
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0, 1],
    )
    config = Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    # a private RNG stream: the weights are the same on every build, and a caller's seed is untouched
    with torch.random.fork_rng(devices=[]):
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
        "seed": SEED,
        "built_by": "editstack_scorer.tiny",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m editstack_scorer.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to create (reused when it already holds a tiny judge)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(build(args.out_dir))


if __name__ == "__main__":
    main()
