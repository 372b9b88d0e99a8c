"""Tiny random-weight vision-language models built from configs (no hub): a LLaVA and an Idefics3.

Both pair a 2-layer vision tower (hidden 32, 32×32 images, 8×8 patches) with the 2-layer Llama of
`tests/conftest.py` (hidden 64) and its ChatML tokenizer plus the image tokens, saved with a processor
whose chat template renders image parts, so `AutoProcessor` / `AutoModelForImageTextToText` load them.
The same recipes run unchanged with SmolVLM-256M where the hub is reachable (docs/vision_language.md).
"""

from ftray.tiny_models import IMAGE_SIZE, PATCH, VLM_TEMPLATE, build_tiny_idefics3, build_tiny_llava  # noqa: F401
