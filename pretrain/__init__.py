"""pretrain: the training loop, schedules, optimizer groups, checkpoints and metrics."""
