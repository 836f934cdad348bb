"""Training: optimiser and schedules, the jitted train/eval steps, checkpoints, metrics."""
