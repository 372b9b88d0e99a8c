"""Placeholder: the loramoe method is being written (issue 6)."""
