"""Placeholder: the lt_sft method is being written (issue 6)."""
