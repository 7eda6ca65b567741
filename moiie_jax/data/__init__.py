"""moiie_jax.data."""
