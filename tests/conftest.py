"""Session-wide test settings, applied before any test module imports jax."""

import os

# The suite compiles hundreds of small programs and runs each a few times:
# XLA's backend optimizations cost more compile time than they save there
# (the suite runs about 17% faster without them). Benchmarks, examples and
# users keep XLA's defaults. Subprocesses started by tests inherit it.
_FLAG = '--xla_backend_optimization_level=0'
if _FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()
