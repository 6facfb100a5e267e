"""Sphinx configuration of the flora_jax documentation.

Build it (CI runs exactly this, warnings as errors)::

  pip install -e ".[docs]"
  sphinx-build -W --keep-going -b html docs docs/_build/html

Nothing is downloaded at build time: no intersphinx, and the notebooks are
not executed.
"""

import pathlib
import sys

# The library from this checkout, even when it is not installed.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import flora_jax  # noqa: E402

project = 'flora_jax'
author = 'The flora_jax authors'
copyright = 'The flora_jax authors'
release = flora_jax.__version__
version = '.'.join(release.split('.')[:2])

extensions = [
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
    'sphinx.ext.mathjax',
    'sphinx.ext.viewcode',
    'myst_nb',
]

# Pages are MyST markdown; the README and the notebooks are not pages.
source_suffix = {'.rst': 'restructuredtext', '.md': 'myst-nb'}
root_doc = 'index'
exclude_patterns = ['_build', 'Thumbs.db', '.DS_Store']

# Docstrings write `name` for a cross-reference to a Python object.
default_role = 'py:obj'

# Docstrings are in Google style.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# An ``Attributes:`` section says what each field means; its type is in the
# signature. (Types read from annotations would show private module paths.)
napoleon_attr_annotations = False

autodoc_default_options = {
    'member-order': 'bysource',
}
autodoc_typehints = 'signature'
autodoc_typehints_format = 'short'
# Defaults as written in the source (``no_decay=is_bias_or_norm``), not as
# reprs with memory addresses.
autodoc_preserve_defaults = True
# Long unions shown by their names, as the code writes them.
autodoc_type_aliases = {
    'optax.ScalarOrSchedule': 'optax.ScalarOrSchedule',
}
# Show the public module a name is documented under, never flora_jax._src.
add_module_names = True

# MyST: $...$ maths, definition lists, and heading anchors for links to a
# section of another page (``memory.md#compiled-train-step``). Nothing is
# executed.
myst_enable_extensions = ['dollarmath', 'colon_fence', 'deflist']
myst_heading_anchors = 3
nb_execution_mode = 'off'

html_theme = 'furo'
html_title = f'flora_jax {release}'
html_static_path = []
