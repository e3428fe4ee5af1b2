"""Shared fixtures: test models built once per session, generated photos, ../shared data."""

import atexit
import fcntl
import hashlib
import os
import pathlib
import shutil
import sys
import tempfile

import pytest

PROJECT = pathlib.Path(__file__).resolve().parent.parent
SHARED = PROJECT.parent / 'shared'
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PROJECT / 'tests'))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Remembered model probes go to a folder of this session (subprocesses inherit it), never
# the user's cache: every session probes each test model once, for real.
os.environ['BEAM_IMAGE_EMBEDDINGS_CACHE'] = tempfile.mkdtemp(prefix='probe-cache-')
atexit.register(shutil.rmtree, os.environ['BEAM_IMAGE_EMBEDDINGS_CACHE'], True)

CORAL_V1 = SHARED / 'models' / 'coral' / 'mobilenet_v1_0.5_160_quant.tflite'
CORAL_V1_FEATURES = 'MobilenetV1/Logits/AvgPool_1a/AvgPool'
CORAL_IMAGES = SHARED / 'images' / 'coral'
# Beam flags for tests whose subject is not the runner: one process is about twice as fast
# as the default (a worker process per core, each loading TensorFlow and the models), which
# test_pipeline_e2e and test_packaging run and compare with this mode.
IN_PROCESS = ('--direct_running_mode', 'in_memory')


def shared_path(path):
  """A path under ../shared, or a skip saying it is missing."""
  if not path.exists():
    pytest.skip('%s is missing (../shared is not beside this checkout)' % path)
  return path


@pytest.fixture(scope='session')
def test_models():
  """{'v3_tf2', 'v1_tf1', 'v2_tflite'} -> handles of the random-weight test models.

  Built once and kept under .cache/ in the project, keyed by the factory's source, so a
  change to the factory rebuilds them.
  """
  import model_factory  # pylint: disable=import-outside-toplevel
  source = pathlib.Path(model_factory.__file__).read_bytes()
  directory = PROJECT / '.cache' / 'test-models' / hashlib.sha256(source).hexdigest()[:16]
  done = directory / 'complete'
  directory.parent.mkdir(parents=True, exist_ok=True)
  with open(str(directory) + '.lock', 'w') as lock:
    # ./test.sh runs two pytest-xdist workers: one builds, the other waits and reuses.
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      shutil.rmtree(directory, ignore_errors=True)
      model_factory.build_all(str(directory))
      done.write_text('ok')
  return {'v3_tf2': str(directory / 'v3_tf2'), 'v1_tf1': str(directory / 'v1_tf1'),
          'v2_tflite': str(directory / 'v2.tflite')}


@pytest.fixture(scope='module')
def photo_tree(tmp_path_factory):
  """photos/<class>/NNN.jpg|png generated photos plus one corrupt JPEG, per test module."""
  import imagegen  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp('photo_tree') / 'photos'
  paths = imagegen.write_photo_tree(root)
  corrupt = root / 'cats' / 'corrupt.jpg'
  corrupt.write_bytes(imagegen.encode(imagegen.photo(99))[:300])
  return root, paths, corrupt


@pytest.fixture(scope='session')
def coral_v1():
  return str(shared_path(CORAL_V1))


@pytest.fixture(scope='session')
def coral_images():
  return shared_path(CORAL_IMAGES)
