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
# libtpu (the test requirements' jax[tpu]) compiles for TPU slices on this CPU machine (tests/test_aot.py,
# tests/test_gmm.py); these keep it from looking for TPU metadata servers and from refusing a second process.
for _key, _value in (('TPU_SKIP_MDS_QUERY', '1'), ('ALLOW_MULTIPLE_LIBTPU_LOAD', '1'),
                     ('TPU_ACCELERATOR_TYPE', 'v5p-8'), ('TPU_WORKER_HOSTNAMES', 'localhost'), ('TPU_WORKER_ID', '0')):
  os.environ.setdefault(_key, _value)

import jax  # noqa: E402

from moiie_jax import compile_cache  # noqa: E402

compile_cache.enable()
