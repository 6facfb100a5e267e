"""Session-wide test settings, applied before any test module imports jax."""

import atexit
import os
import shutil
import tempfile

# The suite compiles hundreds of small programs and runs each a few times:
# XLA's backend optimizations cost more compile time than they save there
# (the suite runs about 17% faster without them). Benchmarks, examples and
# users keep XLA's defaults. Subprocesses started by tests inherit it.
_FLAG = '--xla_backend_optimization_level=0'
if _FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()

# Programs that several tests compile alike (shared shapes, parametrized
# cases, both xdist workers) are compiled once per run: JAX's persistent
# compilation cache, every program kept, in a directory of this run's own
# (made where pytest starts, inherited by its workers and subprocesses,
# removed at exit). The suite takes about 16% less time on 2 cores. A
# cache directory set by the user is used as it is.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix='flora_jax_tests_jit_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
