"""ppl_filter — placeholder (issue 11, in progress)."""
