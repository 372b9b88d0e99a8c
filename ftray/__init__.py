"""ftray: fine-tune language models with published methods on Ray — train, sweep, merge, serve."""

__version__ = "0.1.0"
