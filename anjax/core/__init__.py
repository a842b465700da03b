"""The model and its invariants: config, mask predicate, KV cache, Llama, sharding rules (jax/flax/numpy only)."""
