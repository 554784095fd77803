"""Building blocks for the embedded tiny models, shared by the editor's and the scorer's builders.

Imported only inside a service environment: it needs `tokenizers` and `transformers`, which the
editstack distribution itself does not depend on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from editstack.service.processors import drop_video_processor

log = logging.getLogger(__name__)

# the builders write this file into a tiny model's folder: what it produces means nothing
TINY_MARKER = "editstack_tiny.json"

# Qwen2/2.5/3 pre-tokenizer split: digits split one by one, so "10" is the two tokens "1", "0".
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<think>", "</think>"]
_CORPUS = [
    "Describe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate.",
    "You are a strict judge. Rate how well the edited image follows the instruction. Score (0-10): 0 1 2 3 4 5 6 7 8 9 10",
    "make the sky blue, add a red hat to the cat, remove the dog, turn it into a watercolor painting",
    'system user assistant Picture Video image the a an of to and in is it that {"score": 7, "reasoning": ""}',
]


def write_qwen_tokenizer(out_dir: str | Path, vocab_size: int = 600, chat_template: str | None = None) -> dict[str, int]:
    """Train a tiny byte-level BPE with Qwen's split rule and special tokens; write tokenizer.json and
    tokenizer_config.json (loadable as Qwen2Tokenizer). Returns the special tokens' ids and the vocab size."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    # special tokens take the ids right after the BPE vocabulary, as in the real Qwen tokenizers
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.add_tokens(ADDED_TOKENS)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 32768,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
        "add_prefix_space": False,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + ADDED_TOKENS}
    ids["vocab_size"] = tok.get_vocab_size(with_added_tokens=True)
    return ids


def video_processor_kwargs(processor_class: type, video_processor_class: str) -> dict[str, Any]:
    """What building a `processor_class` here needs for its video part: a default
    `video_processor_class` (a transformers class name) where torchvision works, since the processor
    then insists on one; nothing where it does not (the sub-processor is dropped from the class)."""
    if drop_video_processor(processor_class):
        return {}
    import transformers

    return {"video_processor": getattr(transformers, video_processor_class)()}


@contextlib.contextmanager
def constructed_on(device: str, dtype: str) -> Iterator[None]:
    """Modules constructed inside have their parameters made on `device` in `dtype` (a torch dtype
    name). A real-size model (tens of GB) can only be initialised in reasonable time on a GPU, in the
    dtype it is served in; cpu and float32, the tiny models' build, change nothing."""
    if device == "cpu" and dtype == "float32":
        yield
        return
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_model_folder(out_dir: str | Path, write: Callable[[Path], dict[str, Any]]) -> Path:
    """Build a tiny model into `out_dir` atomically and return it.

    `write(folder)` saves the model into a temporary folder beside `out_dir` and returns what the
    marker file should say; the folder is then renamed into place. A folder that already holds the
    marker is kept as it is (so concurrent or repeated builds are safe); an existing folder
    without it is refused rather than overwritten.
    """
    out_dir = Path(out_dir)
    if (out_dir / TINY_MARKER).is_file():
        return out_dir
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists but holds no {TINY_MARKER}: not an editstack tiny model, left alone")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        marker = {"embedded_tiny": True, **write(tmp)}
        (tmp / TINY_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        # mkdtemp makes the folder private and safetensors writes 0600: a model built as root (in an
        # image build) must stay readable by the service's non-root user
        tmp.chmod(0o755)
        for path in tmp.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        try:
            tmp.rename(out_dir)
        except OSError:
            # another process finished the same deterministic build first: keep theirs
            if not (out_dir / TINY_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("embedded tiny model ready at %s", out_dir)
    return out_dir
