"""Training: runner, reference log-probs, checkpoints, metrics."""
