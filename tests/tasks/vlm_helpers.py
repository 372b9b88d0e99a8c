"""Tiny random-weight vision-language models built from configs (no hub): a LLaVA and an Idefics3.

Both pair a 2-layer vision tower (hidden 32, 32×32 images, 8×8 patches) with the 2-layer Llama of
`tests/conftest.py` (hidden 64) and its ChatML tokenizer plus the image tokens, saved with a processor
whose chat template renders image parts, so `AutoProcessor` / `AutoModelForImageTextToText` load them.
The same recipes run unchanged with SmolVLM-256M where the hub is reachable (docs/vision_language.md).
"""

from typing import Any

import torch

from ftray.tiny_models import IMAGE_SIZE, PATCH, VLM_TEMPLATE, build_tiny_idefics3, build_tiny_llava  # noqa: F401


def overfit(task: Any, batch: dict, steps: int = 120) -> tuple[torch.nn.Module, float]:
    """Full-batch AdamW (lr 3e-3, seed 0) on one collated batch, clipped at norm 1 as the loop does; model and last loss.

    Without clipping the tiny models' loss spikes at random steps (0.005 → 0.18 at step 120 after a
    dependency refresh), so a threshold on the last step's loss passed or failed by luck.
    """
    torch.manual_seed(0)
    model = task.load_model().train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds contention on a shared 2-core machine
    try:
        for _ in range(steps):
            _, loss, n = task.forward_and_loss(model, dict(batch), None)
            (loss / n).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    return model, float(loss.detach() / n)
