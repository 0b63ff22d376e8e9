"""Training engine: one loop for both FixRes stages, checkpoints, distributed setup, resolution sweep."""
