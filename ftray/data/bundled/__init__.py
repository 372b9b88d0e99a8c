"""The datasets shipped with ftray: small seeded jsonl files written by `generate.py`.

Regenerate them with `python -m ftray.data.bundled.generate`; the output is byte-identical.
The image sets (`IMAGE_SETS`: math_images, shapes_vqa) are not shipped: `path` generates them into
ftray's cache on first use (`ftray.data.images`).
"""

from __future__ import annotations

from pathlib import Path

BUNDLED = {"arithmetic", "arithmetic_noisy", "factual_qa", "classification", "factual_edits", "classification_lt",
           "classification_sym20", "classification_sym40", "classification_asym20", "classification_asym40", "retrieval",
           "ood_qa", "arithmetic_dirty"}
IMAGE_SETS = {"math_images", "shapes_vqa"}  # generated into the cache by ftray.data.images, not shipped
CORPORA = {"retrieval"}  # datasets that also ship <name>_corpus.jsonl (rows {pid, text})
SPLITS = ("train", "test")
DIR = Path(__file__).parent


def path(name: str, split: str) -> Path:
    """The jsonl file of a bundled dataset split, e.g. path('arithmetic', 'train')."""
    if name in IMAGE_SETS:
        from ftray.data.images import image_set_path

        return image_set_path(name, split)
    if name not in BUNDLED:
        raise KeyError(f"no bundled dataset {name!r}; bundled datasets are {', '.join(sorted(BUNDLED | IMAGE_SETS))}")
    if split not in SPLITS:
        raise KeyError(f"bundled dataset {name!r} has no split {split!r}; splits are {', '.join(SPLITS)}")
    return DIR / f"{name}_{split}.jsonl"


def corpus_path(name: str) -> Path:
    """The passage corpus of a bundled retrieval dataset, e.g. corpus_path('retrieval')."""
    if name not in CORPORA:
        raise KeyError(f"bundled dataset {name!r} has no corpus; datasets with one are {', '.join(sorted(CORPORA))}")
    return DIR / f"{name}_corpus.jsonl"
