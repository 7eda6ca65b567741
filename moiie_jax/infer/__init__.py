"""moiie_jax.infer."""
