"""Where rows come from: `bundled:<name>`, a local file or directory, or a Hugging Face datasets id."""

from __future__ import annotations

import re
from pathlib import Path

import datasets

from ftray.data import bundled
from ftray.data.bundled import BUNDLED
from ftray.data.errors import DataError
from ftray.data.formats import add_classification_info, format_of_columns
from ftray.data.readers import SUFFIXES, read_file

# file stems that name a split ("train.jsonl", "test-00000-of-00001.parquet")
_SPLIT_STEM = re.compile(r"^(train|test|validation|valid|dev|eval)(?:[-_.].*)?$", re.IGNORECASE)


def load_rows(source: str, split: str = "train", max_samples: int | None = None) -> datasets.Dataset:
    """Load rows from `source` as a Dataset; local files are validated row by row.

    Args:
        source: 'bundled:<name>' (ftray/data/bundled/<name>_<split>.jsonl); a local .jsonl/.json/
            .csv/.parquet file (split ignored); a directory of such files (the ones named for
            `split`, e.g. train.jsonl, if any file is named for a split, else all of them); or a
            Hugging Face datasets id, loaded with datasets.load_dataset(source, split=split).
        split: which split to load.
        max_samples: keep only the first n rows.

    Classification data gets an 'options' column (the label names) so that training and eval
    prompts list the same labels; see formats.add_classification_info.
    """
    ds = _load(source, split)
    if format_of_columns(ds.column_names) == "classification":
        ds = add_classification_info(ds, source)
    if max_samples is not None:
        if max_samples < 1:
            raise DataError(f"{source}: max_samples must be a positive number of rows, got {max_samples}")
        ds = ds.select(range(min(max_samples, len(ds))))
    return ds


def _load(source: str, split: str) -> datasets.Dataset:
    if source.startswith("bundled:"):
        return _load_bundled(source.removeprefix("bundled:"), split)
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_dir(path, split, source)
    if path.is_file():
        return read_file(path, source)
    if path.suffix.lower() in SUFFIXES or source.startswith((".", "/", "~")):
        raise DataError(f"{source}: no such file or directory")
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:  # hub, network and script errors all mean the same thing to the user
        raise DataError(
            f"{source}: not 'bundled:<name>' ({', '.join(sorted(BUNDLED))}), not a local file or directory, "
            f"and datasets.load_dataset({source!r}, split={split!r}) failed: {e}"
        ) from e


def _load_bundled(name: str, split: str) -> datasets.Dataset:
    try:
        path = bundled.path(name, split)
    except KeyError as e:
        raise DataError(f"bundled:{name}: {e.args[0]}") from None
    if not path.exists():
        raise DataError(f"bundled:{name}: {path} is missing; run `python -m ftray.data.bundled.generate`")
    return read_file(path, f"bundled:{path.name}")


def _load_dir(path: Path, split: str, source: str) -> datasets.Dataset:
    files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in SUFFIXES)
    if not files:
        raise DataError(f"{source}: the directory has no {', '.join(SUFFIXES)} files")
    split_of = {f: m.group(1).lower() for f in files if (m := _SPLIT_STEM.match(f.stem))}
    if split_of:
        files = [f for f in files if split_of.get(f) == split.lower()]
        if not files:
            found = ", ".join(sorted(f.name for f in split_of))
            raise DataError(f"{source}: no file for split '{split}' in the directory (found {found})")
    parts = [read_file(f, str(f)) for f in files]
    if len(parts) == 1:
        return parts[0]
    columns = {f.name: sorted(p.column_names) for f, p in zip(files, parts)}
    if len({tuple(c) for c in columns.values()}) > 1:
        raise DataError(f"{source}: the files have different columns: {columns}")
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as e:
        raise DataError(f"{source}: the files' column types differ ({e})") from None
