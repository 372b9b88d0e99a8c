"""Placeholder: the lofit method is being written (issue 6)."""
