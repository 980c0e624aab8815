"""Training: the loop, optimizer and schedules, checkpoints, run directories and reporting."""
