"""The one exception the data layer raises for bad input."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data: the message names the file (or dataset), the 1-based row and what is wrong."""


def row_error(source: str, row: int, message: str) -> DataError:
    """DataError for 1-based `row` of `source`, in the one format every message uses."""
    return DataError(f"{source} row {row}: {message}")
