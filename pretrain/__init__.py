"""Model, training loop, checkpoints and metrics."""
