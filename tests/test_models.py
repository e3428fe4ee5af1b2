"""Model loading: registry grammar, each format's loader, hub downloads that fail fast."""

import gc
import http.server
import importlib.util
import io
import os
import subprocess
import sys
import tarfile
import threading
import weakref

import numpy as np
import pytest

from conftest import PROJECT
from pipeline.registry import ModelSpecError, parse_model_spec, parse_model_specs
from transforms import models
from transforms.embed import SDK_WORKER_MAIN, EmbeddingModelHandler
from transforms.models import ModelSpec, ModelUnavailableError, load_embedder, probe_model


def test_registry_names_and_handles():
  spec = parse_model_spec('mobilenet_v2_130_224')
  assert spec.handle.startswith('https://tfhub.dev/') and spec.input_size == (224, 224)
  spec = parse_model_spec('v1=/m/v1.tflite#MobilenetV1/Logits/AvgPool_1a/AvgPool')
  assert (spec.name, spec.handle, spec.tensor) == (
      'v1', '/m/v1.tflite', 'MobilenetV1/Logits/AvgPool_1a/AvgPool')
  assert parse_model_spec('mobilenet_v1_050_160=gs://b/m').input_size == (160, 160)
  assert [s.name for s in parse_model_specs(None)] == ['mobilenet_v3_small_100_224']


@pytest.mark.parametrize('text,fragment', [
    ('mobilenet_v9', 'unknown model'), ('../evil=/m', 'model name'),
    ('a=/x', None), ('b=', 'empty handle')])
def test_registry_rejects_bad_specs(text, fragment):
  if fragment is None:
    parse_model_spec(text)
    return
  with pytest.raises(ModelSpecError, match=fragment):
    parse_model_spec(text)


def test_duplicate_model_names_are_refused():
  with pytest.raises(ModelSpecError, match='twice'):
    parse_model_specs(['a=/x', 'a=/y'])


def test_probe_finds_format_size_and_dimension(test_models):
  expectations = {'v3_tf2': ('tf2_saved_model', (224, 224), 1024),
                  'v1_tf1': ('tf1_hub_module', (160, 160), 512),
                  'v2_tflite': ('tflite', (224, 224), 1664)}
  for name, (model_format, size, dim) in expectations.items():
    spec = probe_model(ModelSpec(name, test_models[name]))
    assert (spec.model_format, spec.input_size, spec.dim) == (model_format, size, dim)


def test_embeddings_are_healthy_and_batch_independent(test_models):
  rng = np.random.default_rng(0)
  for name in ('v3_tf2', 'v1_tf1', 'v2_tflite'):
    embedder = load_embedder(ModelSpec(name, test_models[name]))
    pixels = rng.integers(0, 256, (3,) + embedder.input_size + (3,), dtype=np.uint8)
    together = embedder(pixels)
    alone = np.concatenate([embedder(pixels[i:i + 1]) for i in range(3)])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-4)
    assert np.all(np.linalg.norm(together, axis=1) > 1e-3), name


def variable_reads(embedder):
  """Ops reading a variable in the embedder's traced call, its nested functions included."""
  graph_def = embedder._embed.get_concrete_function().graph.as_graph_def()
  nodes = list(graph_def.node) + [node for function in graph_def.library.function
                                  for node in function.node_def]
  return [node.name for node in nodes if node.op == 'ReadVariableOp']


def test_saved_models_run_frozen_and_answer_as_loaded(test_models):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  pixels = np.random.default_rng(1).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
  v3 = load_embedder(ModelSpec('v3_tf2', test_models['v3_tf2']))
  v1 = load_embedder(ModelSpec('v1_tf1', test_models['v1_tf1']))
  assert variable_reads(v3) == [] and variable_reads(v1) == []
  images = tf.constant(pixels, tf.float32) / 255.0
  # Folding batch normalization into the weights moves the float rounding a little.
  as_loaded = tf.saved_model.load(test_models['v3_tf2'])(images).numpy()
  np.testing.assert_allclose(v3(pixels), as_loaded, atol=1e-4 * np.abs(as_loaded).max())
  signature = tf.saved_model.load(test_models['v1_tf1'], tags=[]).signatures[
      'image_feature_vector']
  as_loaded = signature(images=images[:, :160, :160])['default'].numpy()
  np.testing.assert_allclose(v1(pixels[:, :160, :160]), as_loaded,
                             atol=1e-4 * np.abs(as_loaded).max())


def test_weights_left_as_loaded_when_asked(test_models):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  pixels = np.random.default_rng(2).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
  spec = ModelSpec('v3_tf2', test_models['v3_tf2'], freeze_weights=False)
  embedder = load_embedder(spec)
  assert variable_reads(embedder)
  as_loaded = tf.saved_model.load(test_models['v3_tf2'])(
      tf.constant(pixels, tf.float32) / 255.0).numpy()
  np.testing.assert_allclose(embedder(pixels), as_loaded, atol=1e-4 * np.abs(as_loaded).max())
  # The probe loads the model the way the workers will.
  assert probe_model(spec).freeze_weights is False


class _Cycle:
  def __init__(self):
    self.itself = self


def test_worker_heap_settles_after_loading_in_sdk_workers_only(test_models, monkeypatch):
  handler = EmbeddingModelHandler(ModelSpec('v3_tf2', test_models['v3_tf2']))
  frozen_before = gc.get_freeze_count()
  handler.load_model()  # in a launcher (here: pytest) the heap is left alone
  assert gc.get_freeze_count() == frozen_before
  # What `python -m apache_beam.runners.worker.sdk_worker_main` sets in a worker process.
  monkeypatch.setattr(sys.modules['__main__'], '__spec__',
                      importlib.util.find_spec(SDK_WORKER_MAIN), raising=False)
  gc.disable()  # only the worker's own collection may free this cycle
  garbage = _Cycle()
  gone = weakref.ref(garbage)
  del garbage
  try:
    embedder = handler.load_model()
    # Garbage was collected first, not frozen with the rest.
    assert gone() is None
    assert gc.get_freeze_count() > frozen_before + 10_000
    pixels = np.random.default_rng(3).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    assert embedder(pixels).shape[0] == 2
  finally:
    gc.unfreeze()
    gc.enable()


def test_a_model_that_cannot_be_frozen_runs_with_its_variables(tmp_path):
  import model_factory  # pylint: disable=import-outside-toplevel
  handle = model_factory.save_counting_projection(8, 32, str(tmp_path / 'counting'))
  embedder = load_embedder(ModelSpec('counting', handle))
  pixels = np.full((2, 32, 32, 3), 255, np.uint8)
  assert variable_reads(embedder)
  first = embedder(pixels)
  np.testing.assert_allclose(embedder(pixels), first)
  assert first.shape == (2, 8) and np.abs(first).max() > 0


def test_quantized_tflite_intermediate_tensor(coral_v1):
  from conftest import CORAL_V1_FEATURES  # pylint: disable=import-outside-toplevel
  embedder = load_embedder(ModelSpec('v1', coral_v1, tensor=CORAL_V1_FEATURES))
  assert embedder.input_size == (160, 160)
  pixels = np.random.default_rng(1).integers(0, 256, (2, 160, 160, 3), dtype=np.uint8)
  vectors = embedder(pixels)
  assert vectors.shape == (2, 512) and vectors.dtype == np.float32
  assert (vectors >= 0).all()  # AvgPool after ReLU6, dequantized
  with pytest.raises(ModelUnavailableError, match='no tensor named'):
    load_embedder(ModelSpec('v1', coral_v1, tensor='no/such/tensor'))


def suggested_tensor(note):
  """The tensor a classifier note tells the user to pass (--model 'NAME=FILE#TENSOR')."""
  return note.rsplit('#', 1)[1].rstrip("'")


def test_a_tflite_classifier_gets_a_note_naming_its_features(tmp_path):
  import model_factory  # pylint: disable=import-outside-toplevel
  handle = model_factory.save_tflite_classifier(str(tmp_path / 'classifier.tflite'),
                                                channels=12, classes=10)
  probed = probe_model(ModelSpec('c', handle))
  assert probed.dim == 10
  assert "its output (10 values, from SOFTMAX) is a classifier's class probabilities" in (
      probed.output_note)
  assert "--model 'c=%s#" % handle in probed.output_note
  # The suggestion works as given: the pooled features, with nothing more to say.
  features = probe_model(ModelSpec('c', handle, tensor=suggested_tensor(probed.output_note)))
  assert features.dim == 12 and features.output_note is None


def test_the_real_coral_classifier_note_names_its_pooled_features(coral_v1):
  from conftest import CORAL_V1_FEATURES  # pylint: disable=import-outside-toplevel
  probed = probe_model(ModelSpec('v1', coral_v1))
  assert probed.dim == 1001 and suggested_tensor(probed.output_note) == CORAL_V1_FEATURES
  assert probe_model(ModelSpec('v1', coral_v1, tensor=CORAL_V1_FEATURES)).output_note is None


def test_imagenet_sized_outputs_get_a_note_and_feature_models_none(tmp_path, test_models):
  import model_factory  # pylint: disable=import-outside-toplevel
  scores = probe_model(ModelSpec('s', model_factory.save_projection(
      1001, 32, str(tmp_path / 'scores'))))
  assert "its output has 1001 values, as an ImageNet classifier's" in scores.output_note
  assert 'feature_vector' in scores.output_note
  for name in ('v3_tf2', 'v1_tf1', 'v2_tflite'):  # the seed models' features
    assert probe_model(ModelSpec(name, test_models[name])).output_note is None


def test_tensor_suffix_only_for_tflite(test_models):
  with pytest.raises(ModelUnavailableError, match='only be named for a .tflite'):
    load_embedder(ModelSpec('x', test_models['v3_tf2'], tensor='a'))


class _HubHandler(http.server.BaseHTTPRequestHandler):
  archive = b''
  requests = []

  def do_GET(self):  # pylint: disable=invalid-name
    type(self).requests.append(self.path)
    if self.path.endswith('?tf-hub-format=compressed') and '/good/' in self.path:
      self.send_response(200)
      self.send_header('Content-Length', str(len(self.archive)))
      self.end_headers()
      self.wfile.write(self.archive)
    else:
      self.send_error(404)

  def log_message(self, *args):
    pass


@pytest.fixture
def local_hub(test_models, tmp_path, monkeypatch):
  """A hub on loopback serving the TF2 test model as TF Hub does: a .tar.gz."""
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode='w:gz') as archive:
    archive.add(test_models['v3_tf2'], arcname='.')
  _HubHandler.archive = buffer.getvalue()
  _HubHandler.requests = []
  server = http.server.HTTPServer(('127.0.0.1', 0), _HubHandler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  monkeypatch.setenv(models.HUB_CACHE_ENV, str(tmp_path / 'hub-cache'))
  yield 'http://127.0.0.1:%d' % server.server_port
  server.shutdown()


def test_hub_handle_downloads_once_and_loads(local_hub):
  handle = local_hub + '/good/model/1'
  spec = probe_model(ModelSpec('hubbed', handle))
  assert spec.dim == 1024
  probe_model(ModelSpec('hubbed', handle))
  assert _HubHandler.requests == ['/good/model/1?tf-hub-format=compressed']
  assert os.listdir(models.hub_cache_dir()) == [os.path.basename(
      models.resolve_hub_handle(handle))]


def test_hub_failure_is_fast_and_says_how_to_use_a_local_copy(local_hub):
  with pytest.raises(ModelUnavailableError) as error:
    probe_model(ModelSpec('missing', local_hub + '/missing/model/1'))
  message = str(error.value)
  assert 'cannot download model' in message
  assert '--model NAME=/path/to/unpacked_dir' in message


def run_python(code):
  return subprocess.run([sys.executable, '-c', code], cwd=PROJECT, capture_output=True,
                        text=True, check=True)


def test_stderr_filter_drops_noise_and_keeps_everything_else():
  # Written to file descriptor 2 directly, as TensorFlow's C++ logging does.
  result = run_python(
      'import os, re\n'
      'from transforms.models import stderr_without\n'
      'with stderr_without(re.compile("noise")):\n'
      '  os.write(2, b"noise 1\\nkept: a real error\\nnoise 2\\n")\n'
      '  os.write(2, b"kept too, without a newline")\n'
      'os.write(2, b"\\nafter\\n")\n')
  assert result.stderr == 'kept: a real error\nkept too, without a newline\nafter\n'


def test_stderr_filter_without_a_temporary_folder_lets_everything_through():
  result = run_python(
      'import os, re, tempfile\n'
      'tempfile.tempdir = "/nonexistent/folder"\n'
      'from transforms.models import stderr_without\n'
      'with stderr_without(re.compile("noise")):\n'
      '  os.write(2, b"noise, shown: nothing to capture it in\\n")\n'
      'print("body ran")\n')
  assert result.stdout == 'body ran\n'
  assert result.stderr == 'noise, shown: nothing to capture it in\n'


def test_tflite_model_loads_without_the_interpreters_delegate_notice(test_models):
  # LiteRT prints its XNNPACK notice at INFO in every worker process, whatever the log level.
  result = run_python(
      'import sys\n'
      'import numpy as np\n'
      'from transforms.models import ModelSpec, load_embedder\n'
      'embedder = load_embedder(ModelSpec("v2", %r), num_threads=1)\n'
      'print(embedder(np.zeros((2, 224, 224, 3), np.uint8)).shape)\n'
      'print("still here", file=sys.stderr)\n' % test_models['v2_tflite'])
  assert result.stdout.strip() == '(2, 1664)'
  assert result.stderr == 'still here\n'


def test_tensorflow_starts_without_its_cpu_machine_noise():
  result = run_python(
      'import os, sys\n'
      'os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"\n'
      'from transforms.models import import_tensorflow\n'
      'tf = import_tensorflow()\n'
      'print(float(tf.reduce_sum(tf.ones([3]))))\n'
      'print("still here", file=sys.stderr)\n')
  assert result.stdout.strip() == '3.0'
  assert result.stderr == 'still here\n'
