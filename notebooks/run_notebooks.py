"""Executes the notebooks of this folder top to bottom, for CI.

  python notebooks/run_notebooks.py                    # all, quick mode
  python notebooks/run_notebooks.py --full             # as a reader runs them
  python notebooks/run_notebooks.py notebooks/01_quickstart.ipynb --out /tmp/nb

Each notebook runs in a fresh ``python3`` kernel of this interpreter (it needs
``nbclient``, ``nbformat`` and ``ipykernel``), from the notebooks' folder,
with ``FLORA_NOTEBOOK_QUICK=1`` unless ``--full``. A `DeprecationWarning`
raised by the notebook's own code (a deprecated flora_jax spelling, say) is
an error: an extra first cell, not saved, sets that warnings filter. The exit
status is non-zero if any cell raises or times out; the wall time of each
notebook is printed. The notebooks on disk are not modified (``--out`` saves
executed copies, without the extra cell).

The ``.ipynb`` files are generated from the jupytext sources ``*.py`` of
this folder; ``check_sync.py`` checks that they match.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import nbclient
from nbclient.exceptions import CellExecutionError, CellTimeoutError
import nbformat

HERE = pathlib.Path(__file__).resolve().parent

# Run before the notebook's first cell: deprecated calls in the cells (whose
# module is __main__ in the kernel) raise instead of printing a warning.
DEPRECATIONS_ARE_ERRORS = """\
import warnings
warnings.filterwarnings('error', category=DeprecationWarning, module='__main__')
"""


def run(path: pathlib.Path, timeout: int, out: pathlib.Path | None) -> None:
  nb = nbformat.read(path, as_version=4)
  nb.cells.insert(0, nbformat.v4.new_code_cell(DEPRECATIONS_ARE_ERRORS))
  client = nbclient.NotebookClient(
      nb,
      timeout=timeout,  # seconds per cell
      kernel_name='python3',
      resources={'metadata': {'path': str(path.parent)}},
      # Plots render without a display; keep the kernel's env otherwise.
      record_timing=True,
  )
  try:
    client.execute()
  finally:
    del nb.cells[0]
    if out is not None:
      out.mkdir(parents=True, exist_ok=True)
      nbformat.write(nb, out / path.name)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('notebooks', nargs='*', type=pathlib.Path,
                      help='default: notebooks/*.ipynb, sorted')
  parser.add_argument('--timeout', type=int, default=600,
                      help='seconds allowed per cell')
  parser.add_argument('--full', action='store_true',
                      help='do not set FLORA_NOTEBOOK_QUICK=1')
  parser.add_argument('--out', type=pathlib.Path,
                      help='save the executed notebooks in this folder')
  args = parser.parse_args()

  paths = args.notebooks or sorted(HERE.glob('*.ipynb'))
  if not paths:
    print('no notebooks found', file=sys.stderr)
    return 1
  # The kernel inherits this process's environment.
  if args.full:
    os.environ.pop('FLORA_NOTEBOOK_QUICK', None)
  else:
    os.environ['FLORA_NOTEBOOK_QUICK'] = '1'
  os.environ.setdefault('MPLBACKEND', 'module://matplotlib_inline.backend_inline')

  failures = []
  total = time.perf_counter()
  for path in paths:
    start = time.perf_counter()
    try:
      run(path.resolve(), args.timeout, args.out)
      status = 'ok'
    except (CellExecutionError, CellTimeoutError) as error:
      status = 'FAILED'
      failures.append(path.name)
      print(error, file=sys.stderr)
    except Exception as error:  # kernel died, unreadable notebook, ...
      status = 'FAILED'
      failures.append(path.name)
      print(f'{path.name}: {type(error).__name__}: {error}', file=sys.stderr)
    print(f'{path.name:<34} {status:<6} {time.perf_counter() - start:6.1f} s',
          flush=True)
  print(f'{len(paths) - len(failures)}/{len(paths)} notebooks ran in'
        f' {time.perf_counter() - total:.1f} s'
        + (f'; failed: {", ".join(failures)}' if failures else '.'))
  return 1 if failures else 0


if __name__ == '__main__':
  sys.exit(main())
