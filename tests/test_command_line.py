"""Command-line mistakes stop run_pipeline.py before any work, with one line and status 2."""

import subprocess
import sys

import pytest

from conftest import PROJECT


def run_cli(*argv, cwd=PROJECT):
  return subprocess.run([sys.executable, str(PROJECT / 'run_pipeline.py'), *argv],
                        cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def error_line(result):
  lines = [l for l in result.stderr.strip().splitlines() if l.startswith('run_pipeline.py:')]
  assert len(lines) == 1, result.stderr
  return lines[0]


@pytest.fixture
def one_photo(tmp_path):
  import imagegen  # pylint: disable=import-outside-toplevel
  (tmp_path / 'a.jpg').write_bytes(imagegen.encode(imagegen.photo(1)))
  return tmp_path


def test_unknown_model_name(one_photo):
  result = run_cli('--input', str(one_photo / '*.jpg'), '--output', str(one_photo / 'out'),
                   '--model', 'mobilenet_v9')
  assert result.returncode == 2
  assert "unknown model 'mobilenet_v9'" in error_line(result)
  assert 'Traceback' not in result.stderr
  assert not (one_photo / 'out').exists()


def test_hub_download_failure_says_how_to_use_a_local_copy(one_photo):
  # The seed model's default handle is a tfhub.dev URL, unreachable from here.
  result = run_cli('--input', str(one_photo / '*.jpg'), '--output', str(one_photo / 'out'),
                   '--model', 'mobilenet_v3_small_100_224')
  assert result.returncode == 2
  line = error_line(result)
  assert 'cannot download model https://tfhub.dev/' in line
  assert '--model NAME=/path/to/unpacked_dir' in line
  assert not (one_photo / 'out').exists()


def test_pattern_matching_nothing(one_photo):
  result = run_cli('--input', str(one_photo / '*.png'), '--output', str(one_photo / 'out'))
  assert result.returncode == 2
  assert 'matches no files' in error_line(result)


def test_missing_local_model(one_photo):
  result = run_cli('--input', str(one_photo / '*.jpg'), '--output', str(one_photo / 'out'),
                   '--model', 'x=%s' % (one_photo / 'nothing-here'))
  assert result.returncode == 2
  assert 'no SavedModel at' in error_line(result)
