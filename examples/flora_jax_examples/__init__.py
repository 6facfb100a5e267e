"""Support code of flora_jax's examples, benchmarks and notebooks.

Not part of the flora_jax library: the models, data loaders and training
loops that the scripts in ``examples/`` and ``benchmarks/`` share. Install
it beside the library with ``pip install -e . -e ./examples``.
"""
