"""Sweeps with Ray Tune over `tune_spaces/<method>.yaml`."""
