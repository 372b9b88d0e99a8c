"""Analyses of what fine-tuning changed in a model: `ftray analyze shift BASE TUNED` (behaviour shift after
instruction tuning: attribution to instruction words, FFN concepts). See `ftray.analyze.shift`."""
