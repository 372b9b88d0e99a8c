"""Placeholder: the corda method is being written (issue 6)."""
