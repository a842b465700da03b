"""The inference runtime: jitted prefill/decode steps, the generation engine, the scorer (no optax/orbax/datasets)."""
