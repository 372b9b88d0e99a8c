"""us_tuning — placeholder (issue 11, in progress)."""
