"""Test set-up: 8 fake CPU devices (for the sharding tests) and the persistent compilation cache.

The XLA flag must be set before jax is imported anywhere, which is why it lives here.
"""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if '--xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import jax  # noqa: E402

from moiie_jax import compile_cache  # noqa: E402

compile_cache.enable()
