"""moiie_jax.parallel."""
