"""metacognition — placeholder (issue 11, in progress)."""
