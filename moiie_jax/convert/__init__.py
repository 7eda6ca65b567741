"""moiie_jax.convert."""
