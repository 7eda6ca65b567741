"""moiie_jax.models."""
