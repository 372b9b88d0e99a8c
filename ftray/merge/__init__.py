"""Weight merging: uniform soups, task arithmetic, LiNeS and sparse-diff composition over checkpoints that share a base.

Each method is one small registered class (`ftray/merge/<name>.py`); `merge_checkpoints` loads full
weights (LoRA adapters merged into their base), refuses mismatched architectures or bases, and writes
a normal Hugging Face checkpoint with a `merge.yaml` saying what was done. Greedy soups, which need a
held-out evaluation, live in `ftray.tune.soups`.

    ftray merge lines smollm2-135m runs/a/final --out merged/a-lines --alpha 0.1
"""

from ftray.merge.checkpoints import MergeError, describe, check_compatible
from ftray.merge.registry import MERGES, MergeConfig, MergeMethod, register
from ftray.merge.run import merge_checkpoints

# The one list of merge method modules; importing registers them.
from ftray.merge import depth_upscale, lines, sparse_diff, task_arithmetic, uniform  # noqa: E402,F401  isort: skip

__all__ = ["MERGES", "MergeConfig", "MergeError", "MergeMethod", "check_compatible", "describe", "merge_checkpoints", "register"]
