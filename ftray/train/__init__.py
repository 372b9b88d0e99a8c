"""Training on Ray Train: the one loop, its trainer builder and checkpoints."""
