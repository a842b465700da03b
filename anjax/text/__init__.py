"""Text to ids: anchor ids and the one encoder shared by training, inference and evaluation (no jax, no datasets)."""
