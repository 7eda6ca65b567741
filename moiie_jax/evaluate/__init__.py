"""moiie_jax.evaluate."""
