"""Placeholder: the locft_bf method is being written (issue 6)."""
