"""docs/recipes.md, run: every recipe's Python blocks, as the page writes them.

Each recipe of the page starts at a MyST target ``(recipe-<name>)=``; its
``python`` blocks run in one namespace (compiled with the page's file name
and line numbers, so that a traceback points into the page), once per
module, and the tests check what the page says of them. The Tunix block
runs only where google-tunix is installed (it is not a test dependency);
the loop that does what the trainer does runs everywhere.
"""

import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flora_jax
from flora_jax import memory

PAGE = pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'recipes.md'
_TARGET = re.compile(r'^\((recipe-[\w-]+)\)=$')


def _recipe_blocks() -> dict[str, list[tuple[int, str]]]:
  """``{target: [(first line, code), ...]}``: the python blocks, in order."""
  recipes: dict[str, list[tuple[int, str]]] = {}
  target, block, start = None, None, 0
  for number, line in enumerate(PAGE.read_text().splitlines(), start=1):
    if block is not None:
      if line.startswith('```'):
        recipes.setdefault(target, []).append((start, '\n'.join(block)))
        block = None
      else:
        block.append(line)
    elif match := _TARGET.match(line):
      target = match.group(1)
    elif line == '```python':
      assert target is not None, f'{PAGE}:{number}: a block before a recipe'
      block, start = [], number + 1
  return recipes


RECIPES = _recipe_blocks()


def _is_tunix(code: str) -> bool:
  return re.search(r'^(from|import) tunix\b', code, re.M) is not None


def _run(target: str, blocks: tuple[int, ...], namespace=None) -> dict:
  """Runs the recipe's ``blocks`` (indices) in ``namespace`` (or a new one)."""
  if namespace is None:
    namespace = {'__name__': 'recipes_' + target.replace('-', '_')}
  for index in blocks:
    start, code = RECIPES[target][index]
    # Padded with newlines: the line numbers are the page's.
    exec(compile('\n' * (start - 1) + code, str(PAGE), 'exec'), namespace)
  return namespace


def _host(x):
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def _assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, a), b in zip(jax.tree.leaves_with_path(actual),
                          jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(_host(a), _host(b),
                                  err_msg=jax.tree_util.keystr(path))


def _keys(path: str) -> list[str]:
  """``"['decoder']['layers']['mlp']['wo']['kernel']"`` -> its names."""
  return re.findall(r"\['([^']*)'\]", path)


def test_the_page_has_three_recipes_and_one_tunix_block():
  assert {target: len(blocks) for target, blocks in RECIPES.items()} == {
      'recipe-linen': 2, 'recipe-maxtext': 1, 'recipe-tunix': 3}
  tunix = [_is_tunix(code) for _, code in RECIPES['recipe-tunix']]
  assert tunix == [False, True, False]


# ------------------------------------------------------------ Flax Linen


@pytest.fixture(scope='module')
def linen():
  namespace = _run('recipe-linen', (0,))
  saved = namespace['state']
  _run('recipe-linen', (1,), namespace)   # saves, restores, one more step
  yield namespace, saved
  shutil.rmtree(namespace['ckpt_dir'], ignore_errors=True)


def test_linen_train_state_lowers_the_loss(linen):
  namespace, saved = linen
  losses = namespace['losses']
  assert len(losses) == 50 and int(saved.step) == 50
  assert losses[-1] < 0.6 * losses[0]
  # The page's numbers.
  assert losses[0] == pytest.approx(0.484, abs=2e-3)
  assert losses[-1] == pytest.approx(0.236, abs=2e-3)


def test_linen_train_state_projects_the_hidden_kernels(linen):
  namespace, saved = linen
  report = flora_jax.memory_report(namespace['tx'], saved.params)
  projected = {leaf.path: leaf.projected for leaf in report.leaves}
  assert projected == {
      "['Dense_0']['bias']": False, "['Dense_0']['kernel']": True,
      "['Dense_1']['bias']": False, "['Dense_1']['kernel']": True,
      "['Dense_2']['bias']": False, "['Dense_2']['kernel']": False,
  }
  assert report.state_bytes == memory.state_bytes(saved.opt_state)


def test_linen_checkpoint_restores_bit_for_bit(linen):
  from flax.training import train_state

  namespace, saved = linen
  restored = namespace['restored']
  assert type(restored) is train_state.TrainState
  assert restored.tx is namespace['tx']
  assert restored.apply_fn == namespace['model'].apply
  _assert_trees_equal(restored, saved)
  # The page's next step, from the restored copy, is the saved state's.
  x, y = namespace['x'], namespace['y']
  _assert_trees_equal(namespace['state'],
                      namespace['train_step'](saved, x, y)[0])


# --------------------------------------------------------------- MaxText

# LLaMA-2-7B, as the page; and small sizes for the numerical test.
_7B = dict(embed=4096, layers=32, mlp=11008, heads=32, head_dim=128,
           vocab=32000)
_SMALL = dict(embed=32, layers=2, mlp=64, heads=4, head_dim=8, vocab=256)


def _matrix_shapes(embed, layers, mlp, heads, head_dim, vocab):
  """Each scanned kernel's matrix view ``(layers, rows, columns)``."""
  del vocab
  attention_in = (layers, embed, heads * head_dim)
  return {'query': attention_in, 'key': attention_in, 'value': attention_in,
          'out': (layers, heads * head_dim, embed),
          'wi_0': (layers, embed, mlp), 'wi_1': (layers, embed, mlp),
          'wo': (layers, mlp, embed)}


def _kernel_module(keys: list[str]) -> str | None:
  """The module of a scanned kernel (``'wo'``), None for other leaves."""
  return keys[-2] if 'layers' in keys and keys[-1] == 'kernel' else None


@pytest.fixture(scope='module')
def maxtext():
  return _run('recipe-maxtext', (0,))


def test_maxtext_every_kernel_is_projected_per_layer(maxtext):
  report = maxtext['report']
  matrices = _matrix_shapes(**_7B)
  kernels = 0
  for leaf in report.leaves:
    module = _kernel_module(_keys(leaf.path))
    if module is None:
      assert not leaf.projected, leaf.path
      continue
    kernels += 1
    plan = leaf.plan
    assert leaf.projected, leaf.path
    assert plan.axes is not None and plan.axes.stack == (1,), leaf.path
    assert plan.matrix_shape == matrices[module], leaf.path
    assert plan.rank == 256
    assert plan.projector_shape == (32, 4096, 256), leaf.path  # the page's
  assert kernels == 7
  # The page's summary line.
  assert report.table().splitlines()[-1] == (
      'flora_jax.scale_by_galore: 96.1% of the parameter values projected;'
      ' state 5.85 GiB (6,276,808,725 bytes), 11.6% of optax.adamw\'s'
      ' 50.21 GiB.')


def test_maxtext_default_rule_projects_nothing_or_the_wrong_axes(maxtext):
  params = maxtext['params']
  default = flora_jax.memory_report(flora_jax.galore(1e-2, rank=256), params)
  assert not any(leaf.projected for leaf in default.leaves)
  assert (default.state_bytes - default.shared_bytes
          == default.adamw_state_bytes - default.adamw_shared_bytes)
  with pytest.warns(memory.LowCompressionWarning,
                    match='projects none of the parameters'):
    jax.eval_shape(flora_jax.galore(1e-2, rank=256).init, params)

  # A smaller min_dim projects the (heads, head_dim) blocks instead.
  wrong = flora_jax.memory_report(
      flora_jax.galore(1e-2, rank=16, min_dim=32), params)
  leaves = {tuple(_keys(leaf.path)[-2:]): leaf for leaf in wrong.leaves}
  for module in ('query', 'key', 'value'):
    plan = leaves[module, 'kernel'].plan
    assert plan.projected and plan.axes is None
    assert plan.matrix_shape == (4096, 32, 32, 128)   # 131,072 32 x 128s
    assert plan.projector_shape == (4096, 32, 32, 16)


def _to_stacked(module: str | None, w, embed, layers, mlp, heads, head_dim,
                vocab):
  """A MaxText leaf as plain ``(layers, rows, columns)`` matrices, by hand."""
  del mlp, vocab
  if module in ('query', 'key', 'value'):   # (embed, L, heads, head_dim)
    return w.transpose(1, 0, 2, 3).reshape(layers, embed, heads * head_dim)
  if module == 'out':                       # (heads, L, head_dim, embed)
    return w.transpose(1, 0, 2, 3).reshape(layers, heads * head_dim, embed)
  if module is not None:                    # (embed, L, mlp), (mlp, L, embed)
    return w.transpose(1, 0, 2)
  return w


def _from_stacked(module: str | None, u, embed, layers, mlp, heads, head_dim,
                  vocab):
  """Inverse of `_to_stacked`."""
  del mlp, vocab
  if module in ('query', 'key', 'value'):
    return u.reshape(layers, embed, heads, head_dim).transpose(1, 0, 2, 3)
  if module == 'out':
    return u.reshape(layers, heads, head_dim, embed).transpose(1, 0, 2, 3)
  if module is not None:
    return u.transpose(1, 0, 2)
  return u


def _by_module(fn, tree):
  return jax.tree.map_with_path(
      lambda path, x: fn(_kernel_module(_keys(jax.tree_util.keystr(path))),
                         x, **_SMALL),
      tree)


def _random_like(tree, seed, scale=1.0):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      scale * jax.random.normal(key, leaf.shape, leaf.dtype)
      for key, leaf in zip(keys, leaves, strict=True)])


@pytest.mark.parametrize('optimizer', ['galore', 'apollo'])
def test_maxtext_update_equals_the_stacked_matrices_update(maxtext,
                                                          optimizer):
  make = getattr(flora_jax, optimizer)
  settings = dict(rank=4, min_dim=16, update_proj_gap=2)  # refresh: steps 0, 2
  params = _random_like(maxtext['maxtext_params'](**_SMALL), 0, 0.1)
  stacked_params = _by_module(_to_stacked, params)
  tx = make(1e-2, dimension_numbers=maxtext['dimension_numbers'], **settings)
  stacked_tx = make(1e-2, **settings)   # the default rule: (L, m, n) leaves

  # Both project every kernel, each layer on its own, at the same shapes.
  report = flora_jax.memory_report(tx, params)
  stacked_report = flora_jax.memory_report(stacked_tx, stacked_params)
  matrices = _matrix_shapes(**_SMALL)
  for leaf, stacked in zip(report.leaves, stacked_report.leaves, strict=True):
    module = _kernel_module(_keys(leaf.path))
    assert leaf.path == stacked.path
    assert leaf.projected == stacked.projected == (module is not None)
    if module is not None:
      assert leaf.plan.matrix_shape == stacked.shape == matrices[module]
      assert leaf.plan.side == stacked.plan.side

  state, stacked_state = tx.init(params), stacked_tx.init(stacked_params)
  update, stacked_update = jax.jit(tx.update), jax.jit(stacked_tx.update)
  for step in range(3):
    grads = _random_like(params, 1 + step)
    updates, state = update(grads, state, params)
    stacked_updates, stacked_state = stacked_update(
        _by_module(_to_stacked, grads), stacked_state, stacked_params)
    back = _by_module(_from_stacked, stacked_updates)
    for (path, actual), expected in zip(jax.tree.leaves_with_path(updates),
                                        jax.tree.leaves(back), strict=True):
      assert actual.shape == expected.shape
      np.testing.assert_allclose(
          actual, expected, rtol=1e-5, atol=1e-9,
          err_msg=f'step {step}: {jax.tree_util.keystr(path)}')
    params = optax.apply_updates(params, updates)
    stacked_params = optax.apply_updates(stacked_params, stacked_updates)


# ----------------------------------------------------------------- Tunix


@pytest.fixture(scope='module')
def nnx_loop():
  return _run('recipe-tunix', (0, 2))   # without Tunix: the model, the loop


def test_nnx_optimizer_loop_lowers_the_loss(nnx_loop):
  losses = nnx_loop['losses']
  assert len(losses) == 20
  assert losses[-1] < 0.5 * losses[0]
  assert losses[0] == pytest.approx(0.82, abs=0.01)   # the page's numbers
  assert losses[-1] == pytest.approx(0.26, abs=0.01)


def test_nnx_optimizer_holds_the_compressed_state(nnx_loop):
  from flax import nnx

  params = nnx.state(nnx_loop['model'], nnx.Param)
  report = flora_jax.memory_report(nnx_loop['tx'], params)
  assert [leaf.projected for leaf in report.leaves] == [
      False, True, False, True]   # hidden bias, kernel; out bias, kernel
  state_bytes = memory.state_bytes(nnx_loop['optimizer'].opt_state)
  assert state_bytes == report.state_bytes
  assert state_bytes < 0.3 * report.adamw_state_bytes   # page: 26.8%


def _tunix():
  return pytest.importorskip(
      'tunix.sft.peft_trainer',
      reason='google-tunix is not installed (not a test dependency)')


def test_tunix_trainer_trains_as_the_loop(nnx_loop):
  _tunix()
  from flax import nnx

  namespace = _run('recipe-tunix', (0, 1))
  trainer = namespace['trainer']
  assert trainer.train_steps == 20
  assert isinstance(trainer.optimizer, nnx.Optimizer)
  # Same model, transform, batches and order: the same weights.
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      nnx.state(namespace['model'], nnx.Param),
      nnx.state(nnx_loop['model'], nnx.Param))


def test_tunix_checkpoint_resumes_bit_for_bit(nnx_loop, tmp_path):
  peft_trainer = _tunix()
  from flax import nnx
  import orbax.checkpoint as ocp

  def train(max_steps, directory=None):
    model = nnx_loop['MLP'](rngs=nnx.Rngs(0))
    tx = flora_jax.galore(1e-2, rank=8, min_dim=16, update_proj_gap=4)
    config = peft_trainer.TrainingConfig(
        eval_every_n_steps=100, max_steps=max_steps,
        checkpoint_root_directory=directory,
        checkpointing_options=ocp.CheckpointManagerOptions(
            save_interval_steps=5))
    trainer = peft_trainer.PeftTrainer(model, tx, config)
    resumed_at = trainer.train_steps
    trainer.with_loss_fn(nnx_loop['loss_fn']).train(nnx_loop['batches'])
    trainer.close()
    return resumed_at, nnx.state(model, nnx.Param)

  assert train(10, str(tmp_path))[0] == 0
  resumed_at, resumed = train(20, str(tmp_path))
  assert resumed_at == 10
  _assert_trees_equal(resumed, train(20)[1])
