"""Stage two: data joined with the cache, the loss, the training loop, checkpoints, metrics and trackers."""
