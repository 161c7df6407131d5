"""Training: optimizer, schedules, loss, the jit-compiled step, metrics, FLOPs and the loop."""
