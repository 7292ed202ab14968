"""Shared core: config, mesh/sharding, checkpointing, training loop, metrics, plots."""
