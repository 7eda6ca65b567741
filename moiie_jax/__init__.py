"""moiie_jax: MoIIE (Mixture of Intra- and Inter-Modality Experts) vision-language models in JAX/Flax NNX."""

__version__ = '0.1.0'
