"""Test set-up: 8 fake CPU devices (for the sharding tests) and the persistent compilation cache.

The XLA flag must be set before jax is imported anywhere, which is why it lives here.
"""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# 8 CPU devices; and, for the suite's speed, cheaper LLVM code generation on the CPU: the tests are tiny, so they are
# bound by compiling, not running (test_moe + test_decoder_scan, cold: 273 s -> 223 s on 2 cores; same results).
# XLA:CPU's older loop emitters instead of its fusion emitters halve the fixed cost of a compile (57 -> 29 ms for
# an eager op; the suite compiles ~4,000 programs, most of them eager ops of the reference forwards; the quick
# study's compiles 48 s -> 39 s). tests/test_aot.py takes these out again for its TPU compiles, whose reports must
# be the real ones.
TEST_ONLY_XLA_FLAGS = ('--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true',
                       '--xla_cpu_use_fusion_emitters=false')
# The older emitters round some elementwise ops differently from one program to another (a [R, F] tile against the
# whole [M, F] array); a test that checks two programs bit for bit compiles them with the emitters the library runs
# with outside the tests: jax.jit(..., compiler_options=PRODUCTION_EMITTERS).
PRODUCTION_EMITTERS = {'xla_cpu_use_fusion_emitters': True}
for _flag in ('--xla_force_host_platform_device_count=8',) + TEST_ONLY_XLA_FLAGS:
  if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _flag).strip()
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

# pytest-xdist's two workers (pytest.ini) share the cache folder with each other and with the processes the tests
# start, as those processes always did. JAX's cache has no lock unless it evicts (and then it rescans the folder on
# every write: 3x slower here); an entry read while another process is still writing it fails to load, and JAX
# warns and compiles it again.
compile_cache.enable()

# The slowest modules run first (whole modules, so module fixtures are still made once per worker): pytest-xdist
# hands out tests in collection order, and a 70-second test collected last keeps one worker busy while the other
# idles. Ordered by their measured share of the suite on the 2-core CI machine; the rest keep their order.
SLOW_MODULES_FIRST = ('test_train.py', 'test_aot.py', 'test_study.py', 'test_moe.py', 'test_s2.py', 'test_parallel.py',
                      'test_train_errors.py', 'test_decoder_scan.py', 'test_multiprocess.py')


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(SLOW_MODULES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order within a module
