"""Placeholder: the owlore method is being written (issue 6)."""
