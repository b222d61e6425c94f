"""Training: the training loop, losses, weight averaging, checkpoints and data parallelism."""
