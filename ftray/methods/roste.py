"""Placeholder: the roste method is being written (issue 6)."""
