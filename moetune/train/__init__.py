"""Training: optimizer groups, schedules, checkpoints with exact resume, metrics, the loop."""
