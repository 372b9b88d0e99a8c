"""Readers for local .jsonl/.json/.csv/.parquet files that report bad rows by file and 1-based row number.

Rows are parsed in Python before Arrow sees them: pyarrow's own errors ("JSON parse error: Missing a
name for object member. in row 0" of some block, "cannot mix list and non-list") name neither the
file nor the row. A row is the n-th record: the n-th non-blank line of a jsonl file, the n-th
element of a JSON array, the n-th data row under a CSV header.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from ftray.data.errors import DataError, row_error
from ftray.data.formats import format_of_columns, validate_rows

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def read_file(path: Path, name: str) -> datasets.Dataset:
    """Load one local data file; `name` is how error messages refer to it."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path, name)
    if suffix == ".jsonl":
        rows = _jsonl_rows(path.read_text(encoding="utf-8"), name)
    elif suffix == ".json":
        rows = _json_rows(path.read_text(encoding="utf-8"), name)
    elif suffix == ".csv":
        rows = _csv_rows(path, name)
    else:
        raise DataError(f"{name}: unsupported file type '{suffix}'; use {', '.join(SUFFIXES)}")
    return rows_to_dataset(rows, name)


def _jsonl_rows(text: str, name: str) -> list[dict]:
    rows: list[dict] = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = len(rows) + 1
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            line_note = f", line {line_no}" if line_no != where else ""
            problem = f"invalid JSON ({e.msg} at column {e.colno}{line_note}): {line[:80]!r}"
            raise row_error(name, where, problem) from None
        if not isinstance(value, dict):
            raise row_error(name, where, f"expected a JSON object, got {type(value).__name__}")
        rows.append(value)
    return rows


def _json_rows(text: str, name: str) -> list[dict]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: it is JSON lines with a .json suffix
            return _jsonl_rows(text, name)
        raise DataError(f"{name}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{name}: expected a JSON array of row objects (or an object holding one such array)")
        value = lists[0]
    if not isinstance(value, list):
        raise DataError(f"{name}: expected a JSON array of row objects, got {type(value).__name__}")
    for i, row in enumerate(value, 1):
        if not isinstance(row, dict):
            raise row_error(name, i, f"expected a JSON object, got {type(row).__name__}")
    return value


def _csv_rows(path: Path, name: str) -> list[dict]:
    """CSV cells are strings; a classification 'label' is parsed as an int and a chat 'messages' cell as JSON."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        records = list(csv.reader(f))
    if not records:
        raise DataError(f"{name}: the file is empty (expected a header row)")
    header, body = records[0], [r for r in records[1:] if any(cell.strip() for cell in r)]
    fmt = format_of_columns(header)
    rows = []
    for i, values in enumerate(body, 1):
        if len(values) != len(header):
            raise row_error(name, i, f"has {len(values)} cells but the header has {len(header)} columns")
        row: dict = dict(zip(header, values))
        if fmt == "classification":
            try:
                row["label"] = int(row["label"])
            except ValueError:
                raise row_error(name, i, f"field 'label' must be an integer, got {row['label']!r}") from None
        if fmt == "chat":
            try:
                row["messages"] = json.loads(row["messages"])
            except json.JSONDecodeError as e:
                raise row_error(name, i, f"the 'messages' cell must be a JSON list ({e.msg})") from None
        rows.append(row)
    return rows


def rows_to_dataset(rows: list[dict], name: str) -> datasets.Dataset:
    """Validate Python rows (when their format is recognisable) and build a Dataset from them."""
    if not rows:
        raise DataError(f"{name}: no rows")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    fmt = format_of_columns(columns)
    if fmt is not None:
        validate_rows(rows, fmt, name)
    try:
        return datasets.Dataset.from_dict({c: [row.get(c) for row in rows] for c in columns})
    except (pa.ArrowException, TypeError, ValueError) as e:
        raise _mixed_type_error(rows, columns, name) or DataError(f"{name}: cannot build a table: {e}") from None


def _mixed_type_error(rows: list[dict], columns: list[str], name: str) -> DataError | None:
    """The first row whose value type differs from earlier rows in the same column (Arrow needs one type)."""
    for column in columns:
        first: tuple[int, type] | None = None
        for i, row in enumerate(rows, 1):
            value = row.get(column)
            if value is None:
                continue
            if first is None:
                first = (i, type(value))
            elif type(value) is not first[1] and not {type(value), first[1]} <= {int, float}:
                return row_error(name, i, f"field '{column}' is {type(value).__name__} {value!r:.40} but row "
                                          f"{first[0]} has {first[1].__name__}; a column must have one type")
    return None


def _read_parquet(path: Path, name: str) -> datasets.Dataset:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{name}: not a readable parquet file ({e})") from None
    ds = datasets.Dataset(datasets.table.InMemoryTable(table))
    fmt = format_of_columns(ds.column_names)
    if fmt is not None:
        validate_rows(ds, fmt, name)
    if len(ds) == 0:
        raise DataError(f"{name}: no rows")
    return ds
