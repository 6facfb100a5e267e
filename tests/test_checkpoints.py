"""flora_jax_examples.checkpoints: orbax checkpoints verified on restore.

Orbax restores a chunk with a flipped byte without complaint; these tests
show that on a checkpoint corrupted on disk, then that `restore` refuses it
with the step, the directory and the damaged leaf, while an intact one comes
back bit for bit.
"""

import gc
import pathlib

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flora_jax_examples import byte_lm
from flora_jax_examples import checkpoints
from flora_jax_examples import lm_training

STEP = 3


def _state():
  # Random float32s: zstd cannot compress them, so their bytes are stored
  # as they are and a flipped byte decodes to a wrong value, not an error.
  rng = np.random.default_rng(0)
  return {
      'params': {'w': jnp.asarray(rng.standard_normal((64, 64)), jnp.float32),
                 'b': jnp.arange(8, dtype=jnp.bfloat16)},
      'count': jnp.int32(STEP),
      'key': jax.random.key(7),
  }


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _assert_bitwise_equal(a, b):
  def same(x, y):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  jax.tree.map(same, a, b)


def _largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
  """The biggest chunk file tensorstore wrote for the state (``.../d/*``)."""
  files = [p for p in (step_dir / checkpoints.STATE).rglob('*')
           if p.is_file() and p.parent.name == 'd']
  assert files, f'no data files under {step_dir}'
  return max(files, key=lambda p: p.stat().st_size)


def _flip_byte(path: pathlib.Path, offset: int):
  data = bytearray(path.read_bytes())
  data[offset] ^= 0xFF
  path.write_bytes(bytes(data))


def _restore(directory):
  with ocp.CheckpointManager(directory) as manager:
    return checkpoints.restore(manager, STEP, _abstract(_state()))


@pytest.fixture
def saved(tmp_path):
  """A checkpoint of `_state` at `STEP` under ``tmp_path``."""
  with ocp.CheckpointManager(tmp_path) as manager:
    assert checkpoints.save(manager, STEP, _state())
  return tmp_path


def test_intact_checkpoint_restores_bitwise(saved):
  _assert_bitwise_equal(_restore(saved), _state())


def test_flipped_byte_orbax_misses_is_refused(saved):
  _flip_byte(data := _largest_data_file(saved / str(STEP)),
             data.stat().st_size // 2)
  # Orbax alone reads the damaged chunk as a wrong value, silently.
  with ocp.CheckpointManager(saved) as manager:
    silent = manager.restore(STEP, args=ocp.args.Composite(**{
        checkpoints.STATE: ocp.args.StandardRestore(_abstract(_state()))}))
  w = np.asarray(silent[checkpoints.STATE]['params']['w'])
  assert not np.array_equal(w, np.asarray(_state()['params']['w']))

  with pytest.raises(checkpoints.CheckpointError) as error:
    _restore(saved)
  message = str(error.value)
  assert 'corrupt' in message and f'step {STEP} ' in message
  assert str(saved) in message
  assert "leaf ['params']['w']" in message


# Orbax leaves a coroutine un-awaited when tensorstore fails.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_unreadable_chunk_is_a_clear_error(saved):
  # The chunk's first byte starts its zstd frame: tensorstore fails to
  # decode it, and the error says which checkpoint.
  _flip_byte(_largest_data_file(saved / str(STEP)), 0)
  with pytest.raises(checkpoints.CheckpointError) as error:
    _restore(saved)
  message = str(error.value)
  assert message.startswith(f'Cannot read the checkpoint of step {STEP} in')
  assert str(saved) in message and 'damaged' in message
  del error
  gc.collect()  # that coroutine is reported here, where it is filtered


def test_checkpoint_without_checksums_is_refused(tmp_path):
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(STEP, args=ocp.args.StandardSave(_state()))
  with pytest.raises(checkpoints.CheckpointError,
                     match="no 'checksums' item"):
    _restore(tmp_path)


def test_checksums_cover_values_dtype_and_structure():
  state = _state()
  digests = checkpoints.leaf_checksums(state)
  assert list(digests) == ["['count']", "['key']", "['params']['b']",
                           "['params']['w']"]
  assert checkpoints.leaf_checksums(_state()) == digests
  as_uint = dict(state, count=jnp.uint32(STEP))  # same bytes, other dtype
  assert (checkpoints.leaf_checksums(as_uint)["['count']"]
          != digests["['count']"])
  checkpoints.verify(state, digests)
  with pytest.raises(checkpoints.CheckpointError, match=r"\['count'\]"):
    checkpoints.verify(as_uint, digests)
  with pytest.raises(checkpoints.CheckpointError, match='missing'):
    checkpoints.verify({'params': state['params']}, digests)


def test_lm_training_refuses_to_resume_from_a_corrupt_checkpoint(tmp_path):
  cfg = byte_lm.ModelConfig(d_model=32, num_heads=2, num_layers=1, d_mlp=64)

  def fresh(seed):
    model = byte_lm.ByteTransformer(cfg, rngs=nnx.Rngs(seed))
    tx = lm_training.make_optimizer('flora', 1e-3, rank=4, period=5,
                                    min_dim=16)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  model, optimizer = fresh(0)
  with ocp.CheckpointManager(tmp_path) as manager:
    lm_training.save_checkpoint(manager, STEP, model, optimizer)
  saved = lm_training.checkpoint_tree(model, optimizer)

  model, optimizer = fresh(1)
  with ocp.CheckpointManager(tmp_path) as manager:
    assert lm_training.restore_latest(manager, model, optimizer) == STEP
  _assert_bitwise_equal(lm_training.checkpoint_tree(model, optimizer), saved)

  _flip_byte(data := _largest_data_file(tmp_path / str(STEP)),
             data.stat().st_size // 2)
  with (ocp.CheckpointManager(tmp_path) as manager,
        pytest.raises(checkpoints.CheckpointError, match=f'step {STEP} ')):
    lm_training.restore_latest(manager, *fresh(1))
