"""Training: loss, optimizers and schedules, precision, checkpoints, the trainer loop."""
