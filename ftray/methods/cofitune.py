"""Placeholder: the cofitune method is being written (issue 6)."""
