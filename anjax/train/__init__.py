"""Training: data pipeline, run config, train step, metrics, the training loop."""
