"""mixture — placeholder (issue 11, in progress)."""
