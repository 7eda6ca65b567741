"""moiie_jax.train."""
