"""Training the byte-level LM with any optimizer of the library, resumably.

The training loop of ``examples/train_lm.py``, which
``benchmarks/benchmark_lm_quality.py`` runs once per optimizer and seed: the
model of `flora_jax_examples.byte_lm` on the Shakespeare plays (or the Python
standard library's sources), the optimizer chosen by name, periodic
held-out evaluation, and orbax checkpoints from which an interrupted run
resumes exactly where it stopped (verified by `flora_jax_examples.checkpoints`
when restored: a damaged checkpoint is refused, not resumed from).
"""

from __future__ import annotations

import dataclasses
import os
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

import flora_jax
from flora_jax_examples import byte_lm
from flora_jax_examples import checkpoints
from flora_jax_examples import datasets

OPTIMIZERS = ('adamw', 'adafactor', 'flora', 'flora-rademacher',
              'flora-staggered', 'galore', 'galore-randomized', 'fira',
              'apollo', 'apollo-mini')
CORPORA = ('shakespeare', 'stdlib')


def make_optimizer(name: str, lr: float, rank: int, period: int,
                   min_dim: int) -> optax.GradientTransformation:
  """The optimizer ``name``; the low-rank ones project the block matrices.

  ``'flora-staggered'``: Flora with stored projectors, each re-drawn at
  its own step (``store_projectors=True, refresh_schedule='staggered'``).
  ``'apollo'`` and ``'apollo-mini'`` (`flora_jax.apollo`,
  `flora_jax.apollo_mini`) keep their paper defaults but the rank, which is
  ``rank`` for both (APOLLO-Mini's paper rank is 1: pass it), and T =
  ``period``.
  """
  in_blocks = flora_jax.path_mask(byte_lm.in_blocks)
  low_rank = dict(min_dim=min_dim, projection_mask=in_blocks)
  if name == 'adamw':
    return optax.adamw(lr)
  if name == 'adafactor':
    return optax.adafactor(lr, min_dim_size_to_factor=min_dim)
  if name in ('flora', 'flora-rademacher'):
    sketch = 'rademacher' if name == 'flora-rademacher' else 'gaussian'
    return flora_jax.flora(lr, rank=rank, kappa=period, sketch=sketch,
                           min_dim_size_to_factor=min_dim, **low_rank)
  if name == 'flora-staggered':
    return flora_jax.flora(lr, rank=rank, kappa=period, store_projectors=True,
                           refresh_schedule='staggered',
                           min_dim_size_to_factor=min_dim, **low_rank)
  if name in ('galore', 'galore-randomized'):
    projector = 'randomized' if name == 'galore-randomized' else 'svd'
    return flora_jax.galore(lr, rank, update_proj_gap=period,
                            projector=projector, **low_rank)
  if name == 'fira':
    return flora_jax.fira(lr, rank, update_proj_gap=period, **low_rank)
  if name == 'apollo':
    return flora_jax.apollo(lr, rank, update_proj_gap=period,
                            min_dim=min_dim, projection_mask=in_blocks)
  if name == 'apollo-mini':
    return flora_jax.apollo_mini(lr, rank, update_proj_gap=period,
                                 min_dim=min_dim, projection_mask=in_blocks)
  raise ValueError(f'optimizer must be one of {OPTIMIZERS}, got {name!r}')


def load_corpus(name: str, max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
  """(train, held-out) bytes of the corpus ``name``, one of `CORPORA`."""
  if name == 'shakespeare':
    return datasets.shakespeare_split()
  return byte_lm.held_out_split(datasets.stdlib_corpus(max_bytes))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One run: the optimizer, the data, and how often to log and save.

  The defaults are those of ``examples/train_lm.py``.

  Attributes:
    optimizer: one of `OPTIMIZERS`.
    corpus: one of `CORPORA`.
    corpus_bytes: bytes of stdlib source read (``corpus='stdlib'``).
    steps: training steps in all (a resumed run counts the earlier ones).
    batch_size: sequences per step.
    lr: the learning rate.
    rank: the rank of the low-rank optimizers.
    period: Flora's ``kappa`` / GaLore's, Fira's and APOLLO's
      ``update_proj_gap``.
    min_dim: the smallest matrix side that is projected (and factored).
    seed: of the initial weights and the batches.
    log_every: steps between two recorded training losses.
    eval_every: steps between two held-out evaluations.
    eval_batches: held-out batches of 32 sequences per evaluation.
    checkpoint_dir: where orbax checkpoints go; None for none.
    checkpoint_every: steps between two checkpoints.
    param_dtype: the parameters' dtype, ``'float32'`` or ``'bfloat16'``
      (the model is initialised in float32, then cast).
    rounding: how updates are rounded to a ``param_dtype`` narrower than
      float32: ``'nearest'`` (`optax.apply_updates`) or ``'stochastic'``
      (`flora_jax.stochastic_rounding`).
    state_bits: 32, or 8 for the optimizer's large state leaves stored
      block-wise in 8 bits (`flora_jax.quantize_state`).
    fused: the blocks stacked and scanned (`byte_lm.ScannedByteTransformer`)
      and updated inside the backward pass
      (`flora_jax.nnx.fused_train_step`): the same training, without the
      blocks' stacked gradient.
  """

  optimizer: str = 'flora'
  corpus: str = 'shakespeare'
  corpus_bytes: int = 4 << 20
  steps: int = 1000
  batch_size: int = 16
  lr: float = 2e-3
  rank: int = 32
  period: int = 200
  min_dim: int = 64
  seed: int = 0
  log_every: int = 10
  eval_every: int = 100
  eval_batches: int = 8
  checkpoint_dir: str | None = None
  checkpoint_every: int = 100
  param_dtype: str = 'float32'
  rounding: str = 'nearest'
  state_bits: int = 32
  fused: bool = False


@dataclasses.dataclass
class History:
  """The loss curves of a run, its duration and its optimizer's state size."""

  steps: list[int] = dataclasses.field(default_factory=list)
  train_loss: list[float] = dataclasses.field(default_factory=list)
  eval_steps: list[int] = dataclasses.field(default_factory=list)
  eval_loss: list[float] = dataclasses.field(default_factory=list)
  seconds: float = 0.0
  state_bytes: int = 0


def checkpoint_tree(model: nnx.Module, optimizer: nnx.Optimizer) -> dict:
  """What a checkpoint holds: the model's and the optimizer's state."""
  return {'model': nnx.to_pure_dict(nnx.state(model)),
          'optimizer': nnx.to_pure_dict(nnx.state(optimizer))}


def save_checkpoint(manager: ocp.CheckpointManager, step: int,
                    model: nnx.Module, optimizer: nnx.Optimizer) -> bool:
  """Saves `checkpoint_tree` at ``step`` with its checksums."""
  return checkpoints.save(manager, step, checkpoint_tree(model, optimizer))


def restore_latest(manager: ocp.CheckpointManager, model: nnx.Module,
                   optimizer: nnx.Optimizer) -> int:
  """Loads the latest checkpoint into ``model`` and ``optimizer``, in place.

  Returns:
    The step the checkpoint was saved at, 0 when there is none.

  Raises:
    checkpoints.CheckpointError: the checkpoint is damaged (a leaf's
      checksum differs from the one saved) or holds another state.
  """
  step = manager.latest_step()
  if step is None:
    return 0
  restored = checkpoints.restore(manager, step, jax.tree.map(
      ocp.utils.to_shape_dtype_struct, checkpoint_tree(model, optimizer)))
  for part, name in ((model, 'model'), (optimizer, 'optimizer')):
    state = nnx.state(part)
    nnx.replace_by_pure_dict(state, restored[name])
    nnx.update(part, state)
  return step


def train(config: TrainConfig, *, progress: bool = True) -> History:
  """Trains (or resumes) one run; returns its loss curves."""
  cfg = byte_lm.ModelConfig()
  train_data, val_data = load_corpus(config.corpus, config.corpus_bytes)
  val_batches = byte_lm.eval_batches(val_data, config.eval_batches, 32,
                                     cfg.seq_len)
  model_class = (byte_lm.ScannedByteTransformer if config.fused
                 else byte_lm.ByteTransformer)
  model = model_class(cfg, rngs=nnx.Rngs(config.seed))
  if config.param_dtype != 'float32':
    nnx.update(model, jax.tree.map(
        lambda x: x.astype(config.param_dtype), nnx.state(model, nnx.Param)))
  tx = make_optimizer(config.optimizer, config.lr, config.rank,
                      config.period, config.min_dim)
  if config.state_bits == 8:
    tx = flora_jax.quantize_state(tx)
  elif config.state_bits != 32:
    raise ValueError(f'state_bits must be 32 or 8, got {config.state_bits}')
  if config.rounding == 'stochastic':
    tx = optax.chain(tx, flora_jax.stochastic_rounding(config.seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  train_step = (byte_lm.fused_train_step(model, optimizer) if config.fused
                else byte_lm.train_step)
  history = History(state_bytes=flora_jax.memory.state_bytes(
      nnx.as_pure(optimizer.opt_state)))

  manager, start = None, 0
  if config.checkpoint_dir:
    manager = ocp.CheckpointManager(
        os.path.abspath(config.checkpoint_dir),
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=config.checkpoint_every, max_to_keep=2))
    start = restore_latest(manager, model, optimizer)
    if start:
      print(f'resumed from step {start} in {config.checkpoint_dir}')

  # The batch stream is a function of the seed and the step, so a resumed
  # run sees exactly the batches the uninterrupted one would have.
  batches = byte_lm.train_batches(train_data, config.steps, config.batch_size,
                                  cfg.seq_len, config.seed)
  bar = range(config.steps)
  if progress:
    bar = tqdm(bar, desc=config.optimizer + (' fused' if config.fused else ''),
               unit='step', dynamic_ncols=True)
  began = time.perf_counter()
  for step, batch in zip(bar, batches, strict=True):
    if step < start:
      continue
    loss = train_step(model, optimizer, jnp.asarray(batch))
    # Reading a loss waits for the device: only every few steps.
    if step % config.log_every == 0 or step == config.steps - 1:
      history.steps.append(step)
      history.train_loss.append(float(loss))
      if progress:
        bar.set_postfix(loss=f'{history.train_loss[-1]:.3f}')
    if (step + 1) % config.eval_every == 0 or step == config.steps - 1:
      history.eval_steps.append(step + 1)
      history.eval_loss.append(float(np.mean(
          [byte_lm.eval_step(model, b) for b in val_batches])))
    if manager is not None and manager.should_save(step + 1):
      save_checkpoint(manager, step + 1, model, optimizer)
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  history.seconds = time.perf_counter() - began
  return history
