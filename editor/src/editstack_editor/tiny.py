"""Build the embedded tiny Qwen-Image-Edit pipeline: the real classes with tiny random weights.

`python -m editstack_editor.tiny OUT_DIR` writes a folder that `DiffusionPipeline.from_pretrained`
loads like a real checkpoint, so the whole stack runs on a CPU with no model download. Its edits
are noise; the marker file `editstack_tiny.json` lets reports say so. The default is a
QwenImageEditPlusPipeline (Qwen-Image-Edit-2509's class), which takes several source images, so
the embedded model edits multi-image items too; `--pipeline edit` builds QwenImageEditPipeline
(one image, but batchable) from the same components.
"""

from __future__ import annotations

import argparse
import tempfile
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from editstack.service.tinymodels import (
    build_model_folder,
    constructed_on,
    video_processor_kwargs,
    write_qwen_tokenizer,
)

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

SEED = 0
_Z_DIM = 16  # latent channels, as in the real Qwen-Image VAE
# Widths and depths per size. "tiny" is the embedded default (11 MB, CPU); "mid" (~1.25 B parameters)
# times the same architecture on a GPU (scripts/benchmarks/midsize.py). "real" is Qwen-Image-Edit-2509
# itself, from the released config.json files of Qwen/Qwen-Image-Edit-2509: transformer (diffusers'
# QwenImageTransformer2DModel defaults; 2509 has no zero_cond_t, which came with 2511), text_encoder
# (Qwen2.5-VL-7B-Instruct) and vae (AutoencoderKLQwenImage defaults): 20.4 B + 8.3 B + 0.13 B parameters,
# 58 GB in bf16, so it is built on a GPU (scripts/benchmarks/gpu.py: --device cuda --dtype bfloat16).
# Keys only "real" has default to the tiny values: the tokenizer's vocabulary, 8192 positions, one
# full-attention vision block, one VAE res block and neutral latent statistics.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(text_hidden=32, text_intermediate=64, text_layers=2, text_heads=2, text_kv_heads=1,
                 mrope_section=[2, 3, 3], vision_depth=2, vision_hidden=16, vision_intermediate=32,
                 vision_heads=2, vae_base_dim=16, layers=2, head_dim=16, heads=2, axes_dims_rope=(4, 6, 6)),
    "mid": dict(text_hidden=1024, text_intermediate=2816, text_layers=8, text_heads=16, text_kv_heads=4,
                mrope_section=[8, 12, 12], vision_depth=8, vision_hidden=640, vision_intermediate=1280,
                vision_heads=10, vae_base_dim=96, layers=12, head_dim=128, heads=12, axes_dims_rope=(16, 56, 56)),
    "real": dict(text_hidden=3584, text_intermediate=18944, text_layers=28, text_heads=28, text_kv_heads=4,
                 mrope_section=[16, 24, 24], vision_depth=32, vision_hidden=1280, vision_intermediate=3420,
                 vision_heads=16, vae_base_dim=96, layers=60, head_dim=128, heads=24, axes_dims_rope=(16, 56, 56),
                 text_vocab=152064, text_positions=128000, fullatt_block_indexes=[7, 15, 23, 31],
                 vae_res_blocks=2, vae_latent_stats="released"),
}


PIPELINES = ("plus", "edit")


def build(out_dir: Path, size: str = "tiny", pipeline: str = "plus", device: str = "cpu",
          dtype: str = "float32") -> Path:
    """Build the `pipeline` of `size` into `out_dir` (atomically) and return it; an existing build is kept.
    `device` and `dtype` (a torch dtype name) are where and in what its weights are made and saved."""
    return build_model_folder(out_dir, lambda folder: _write(folder, size, pipeline, device, dtype))


def _write(folder: Path, size: str, pipeline: str, device: str = "cpu", dtype: str = "float32") -> dict[str, object]:
    pipe = _tiny_pipeline(SIZES[size], pipeline, device, dtype)
    pipe.save_pretrained(folder)
    return {
        "builder": "editstack_editor.tiny",
        "pipeline_class": type(pipe).__name__,
        "size": size,
        "dtype": dtype,
        "seed": SEED,
        "note": "random weights: its edits, and any scores of them, mean nothing",
        "versions": {name: metadata.version(name) for name in ("torch", "diffusers", "transformers")},
    }


def _tiny_pipeline(dims: dict[str, Any], pipeline: str, device: str = "cpu",
                   dtype: str = "float32") -> DiffusionPipeline:
    """Mirror the real Qwen-Image-Edit structure (configs of the released checkpoint) at tiny widths;
    `pipeline` "plus" wraps the same components in QwenImageEditPlusPipeline, as Qwen-Image-Edit-2509 does."""
    # imported here, not at the top: only `pipeline` imports torch and the model libraries up front
    import torch
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageEditPlusPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2TokenizerFast,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
    )

    video = video_processor_kwargs(Qwen2VLProcessor, "Qwen2VLVideoProcessor")
    with tempfile.TemporaryDirectory() as tok_dir:
        ids = write_qwen_tokenizer(tok_dir)
        tokenizer = Qwen2TokenizerFast.from_pretrained(tok_dir)
    # Qwen2VLImageProcessor ignores `size=`; these are the checkpoint's preprocessor_config.json values.
    image_processor = Qwen2VLImageProcessor(
        min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2
    )
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, **video)

    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=dims["text_hidden"], intermediate_size=dims["text_intermediate"],
            num_hidden_layers=dims["text_layers"], num_attention_heads=dims["text_heads"],
            num_key_value_heads=dims["text_kv_heads"], rope_theta=1000000.0,
            vocab_size=dims.get("text_vocab", ids["vocab_size"]),
            max_position_embeddings=dims.get("text_positions", 8192),
            # mrope sections sum to head_dim / 2
            rope_scaling={"type": "mrope", "rope_type": "default", "mrope_section": dims["mrope_section"]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=dims["vision_depth"], hidden_size=dims["vision_hidden"],
            intermediate_size=dims["vision_intermediate"], num_heads=dims["vision_heads"],
            out_hidden_size=dims["text_hidden"],
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
            fullatt_block_indexes=dims.get("fullatt_block_indexes", [1]), in_channels=3,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        # some code paths still read these top-level copies of the text config
        vocab_size=dims.get("text_vocab", ids["vocab_size"]), hidden_size=dims["text_hidden"],
    )
    # the class defaults are the released VAE's latent statistics
    latent_stats = {} if dims.get("vae_latent_stats") == "released" else dict(
        latents_mean=[0.0] * _Z_DIM, latents_std=[1.0] * _Z_DIM)
    with constructed_on(device, dtype):
        torch.manual_seed(SEED)
        text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
        torch.manual_seed(SEED)
        # temperal_downsample has three entries -> 8x spatial compression, as in the real VAE
        vae = AutoencoderKLQwenImage(
            base_dim=dims["vae_base_dim"], z_dim=_Z_DIM, dim_mult=[1, 2, 4, 4],
            num_res_blocks=dims.get("vae_res_blocks", 1), temperal_downsample=[False, True, True], **latent_stats,
        )
        torch.manual_seed(SEED)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=4 * _Z_DIM, out_channels=_Z_DIM, num_layers=dims["layers"],
            attention_head_dim=dims["head_dim"], num_attention_heads=dims["heads"],
            joint_attention_dim=dims["text_hidden"], guidance_embeds=False,
            axes_dims_rope=dims["axes_dims_rope"],  # sums to attention_head_dim
        )
    scheduler = FlowMatchEulerDiscreteScheduler(  # the checkpoint's scheduler_config.json values
        base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192, max_shift=0.9,
        num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, stochastic_sampling=False,
        time_shift_type="exponential", use_beta_sigmas=False, use_dynamic_shifting=True,
        use_exponential_sigmas=False, use_karras_sigmas=False,
    )
    pipeline_class = QwenImageEditPlusPipeline if pipeline == "plus" else QwenImageEditPipeline
    pipe = pipeline_class(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, processor=processor,
        transformer=transformer,
    )
    # The pipeline drops the first `prompt_template_encode_start_idx` hidden states: the template's
    # system prefix (before the user's images and prompt) must tokenize to exactly that many tokens,
    # or the edit prompt gets cut.
    prefix = pipe.prompt_template_encode.split("{}")[0].split("<|vision_start|>")[0]
    n_prefix = len(tokenizer(prefix).input_ids)
    if n_prefix != pipe.prompt_template_encode_start_idx:
        raise RuntimeError(
            f"tiny tokenizer gives the edit template's prefix {n_prefix} tokens, "
            f"the pipeline drops {pipe.prompt_template_encode_start_idx}"
        )
    return pipe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m editstack_editor.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to create (kept as is when already built)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--pipeline", choices=PIPELINES, default="plus",
                        help="plus: QwenImageEditPlusPipeline (several source images); edit: QwenImageEditPipeline")
    parser.add_argument("--device", default="cpu", help="where the weights are made (real: cuda)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the weights' dtype, as saved")
    args = parser.parse_args(argv)
    print(build(args.out_dir, args.size, args.pipeline, args.device, args.dtype))


if __name__ == "__main__":
    main()
