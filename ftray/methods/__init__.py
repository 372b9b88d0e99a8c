"""Fine-tuning methods, one module each, registered by name.

Adding a method: write `ftray/methods/<name>.py` with a `@register`-ed class, add it to the import
list below, a test in `tests/methods/test_<name>.py` and a space in `tune_spaces/<name>.yaml`.
"""

from ftray.methods.base import Context, Method, MethodConfig, Phase, stable_seed
from ftray.methods.registry import REGISTRY, build_methods, register, validate_method_entries

# The one list of method modules; importing registers them.
from ftray.methods import (  # noqa: E402,F401  isort: skip
    car, cofitune, core_tuning, corda, curate, depth_upscale, dr_tune, full, glue_tricks, got_d, hft, kaft, knowada, levi, lfu, listwise_distill,
    llmboost, locft_bf, lofit, lora, loramoe, lt_sft, manyicl, masked_thought, metacognition, mixture, mpcc, nlki, noise_robust, noisefit, owlore,
    ppl_filter, q_tuning, r_tuning, roste, ul2, uni_mumer, us_tuning,
)

__all__ = ["REGISTRY", "Context", "Method", "MethodConfig", "Phase", "build_methods", "stable_seed", "register", "validate_method_entries"]
