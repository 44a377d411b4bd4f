"""Training: the sharded trainer, metrics, checkpoints, sharding plans."""
