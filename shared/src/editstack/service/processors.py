"""Loading Qwen processors where torchvision cannot be imported (production code: the editor's
pipeline and the judge call it before loading a real checkpoint, not only the tiny builders)."""

from __future__ import annotations


def drop_video_processor(*processor_classes: type) -> bool:
    """Let Qwen processors load without torchvision, image-only.

    Every Qwen video processor needs torchvision, and PyPI's torchvision does not import beside the
    CPU torch build. The processors refuse `video_processor=None`, so the sub-processor is dropped
    from the class; image-only calls never touch it. Call before building and before any
    `from_pretrained`. Does nothing (returns False) where torchvision works, as on the GPU images.
    """
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return False
    for cls in processor_classes:
        cls.attributes = ["image_processor", "tokenizer"]  # transformers 4.57 reads this
        if hasattr(cls, "get_attributes"):  # transformers 5.x derives it from the __init__ signature
            cls.get_attributes = classmethod(lambda c: ["image_processor", "tokenizer"])
    return True
