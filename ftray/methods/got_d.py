"""got_d — placeholder (issue 11, in progress)."""
