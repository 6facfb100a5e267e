"""Checks that every notebook's .ipynb matches its jupytext .py source.

  python notebooks/check_sync.py                    # every notebook here
  python notebooks/check_sync.py notebooks/01_quickstart.py

The sources are the percent-format ``notebooks/*.py`` files whose jupytext
header pairs them with an ``.ipynb`` (``formats: ipynb,py:percent``). For
each, the ``.ipynb`` must have exactly the cells the source produces (the
same types and sources, in the same order; outputs, ids and metadata are not
compared), must be valid nbformat, and must be committed without outputs or
execution counts. An ``.ipynb`` without a source is an error too.

Exits 0 when all are in sync; otherwise names each notebook that is not,
shows the first differing cell, and exits 1. Regenerate with

  jupytext --to ipynb --update notebooks/[0-9]*.py

(``--update`` keeps the cell ids of the existing notebooks, so an unchanged
cell gives no diff). Needs ``jupytext`` and ``nbformat``.
"""

from __future__ import annotations

import argparse
import difflib
import os
import pathlib
import sys

import jupytext
import nbformat

HERE = pathlib.Path(__file__).resolve().parent
REGENERATE = 'jupytext --to ipynb --update {source}'
CLEAR = 'jupytext --to ipynb {source}'  # rewritten afresh: no outputs


def is_notebook_source(path: pathlib.Path) -> bool:
  """Whether ``path`` is a jupytext text notebook paired with an .ipynb."""
  if path.suffix != '.py':
    return False
  text = path.read_text(encoding='utf-8')
  if not text.startswith('# ---\n# jupyter:'):
    return False
  formats = jupytext.reads(text, fmt='py:percent').metadata.get(
      'jupytext', {}).get('formats', '')
  return 'ipynb' in formats.split(',')


def cells(nb) -> list[tuple[str, str]]:
  return [(cell.cell_type, cell.source) for cell in nb.cells]


def describe(cell: tuple[str, str] | None) -> str:
  if cell is None:
    return '(no cell)'
  kind, source = cell
  first = source.splitlines()[0] if source else ''
  return f'{kind} cell starting {first[:60]!r}'


def first_difference(expected, actual) -> str:
  """A readable account of where two cell lists first differ."""
  for index in range(max(len(expected), len(actual))):
    want = expected[index] if index < len(expected) else None
    have = actual[index] if index < len(actual) else None
    if want == have:
      continue
    lines = [f'  cell {index}: the source has {describe(want)},'
             f' the .ipynb has {describe(have)}']
    if want is not None and have is not None and want[0] == have[0]:
      diff = difflib.unified_diff(
          have[1].splitlines(), want[1].splitlines(),
          fromfile='.ipynb', tofile='.py source', lineterm='', n=1)
      lines += ['    ' + line for line in list(diff)[:40]]
    return '\n'.join(lines)
  return ''


def check(source: pathlib.Path) -> list[str]:
  """The problems of one notebook (an empty list when it is in sync)."""
  target = source.with_suffix('.ipynb')
  name = target.name
  shown = os.path.relpath(source)  # in the commands printed
  if not target.exists():
    return [f'{name}: missing; generate it with {CLEAR.format(source=shown)}']
  expected = cells(jupytext.read(source, fmt='py:percent'))
  notebook = nbformat.read(target, as_version=nbformat.NO_CONVERT)
  problems = []
  try:
    nbformat.validate(notebook)
  except nbformat.ValidationError as error:
    problems.append(f'{name}: not a valid notebook: {error.message}')
  actual = cells(notebook)
  if actual != expected:
    problems.append(
        f'{name}: out of sync with {source.name} ({len(actual)} cells, the'
        f' source makes {len(expected)}); regenerate it with'
        f' {REGENERATE.format(source=shown)}\n'
        + first_difference(expected, actual))
  dirty = [index for index, cell in enumerate(notebook.cells)
           if cell.cell_type == 'code'
           and (cell.get('outputs') or cell.get('execution_count') is not None)]
  if dirty:
    problems.append(
        f'{name}: outputs or execution counts in cells {dirty}; the'
        f' notebooks are committed without them: {CLEAR.format(source=shown)}')
  return problems


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('sources', nargs='*', type=pathlib.Path,
                      help='default: every paired notebooks/*.py')
  args = parser.parse_args()

  if args.sources:
    sources = args.sources
    problems = [f'{path}: not a jupytext source paired with an .ipynb'
                for path in sources if not is_notebook_source(path)]
  else:
    sources = [path for path in sorted(HERE.glob('*.py'))
               if is_notebook_source(path)]
    problems = [f'{path.name}: no source {path.with_suffix(".py").name}'
                ' (the .ipynb files are generated from jupytext .py sources)'
                for path in sorted(HERE.glob('*.ipynb'))
                if path.with_suffix('.py') not in sources]
    if not sources:
      problems.append(f'no notebook sources found in {HERE}')
  for source in sources:
    if is_notebook_source(source):
      problems += check(source)

  for problem in problems:
    print(problem, file=sys.stderr)
  if problems:
    print('FAILED: notebooks out of sync with their sources (see above).',
          file=sys.stderr)
    return 1
  print(f'{len(sources)} notebooks in sync with their sources:'
        f' {", ".join(path.with_suffix(".ipynb").name for path in sources)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
