"""depth_upscale — placeholder (issue 11, in progress)."""
