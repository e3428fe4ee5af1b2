"""Loading embedding models of every supported format behind one call: uint8 pixels -> vectors."""

import atexit
import contextlib
import hashlib
import logging
import os
import re
import shlex
import shutil
import sys
import tarfile
import tempfile
import threading
import urllib.error
import urllib.request
import warnings
from typing import NamedTuple, Optional, Tuple

import numpy as np

from apache_beam.io.filesystems import FileSystems

FORMAT_TF2 = 'tf2_saved_model'
FORMAT_TF1_HUB = 'tf1_hub_module'
FORMAT_TFLITE = 'tflite'
TF1_HUB_SIGNATURE = 'image_feature_vector'
TF1_HUB_INPUT = 'images'
TF1_HUB_OUTPUT = 'default'
DEFAULT_INPUT_SIZE = (224, 224)
HUB_DOWNLOAD_TIMEOUT_S = 30
HUB_CACHE_ENV = 'TFHUB_CACHE_DIR'  # the variable tensorflow_hub users already set


class ModelUnavailableError(RuntimeError):
  """A model handle that cannot be downloaded, found or loaded; the message says what to do."""


class ModelSpec(NamedTuple):
  """What a worker needs to load one model; plain values, so it pickles anywhere."""
  name: str
  handle: str  # hub URL, local or remote SavedModel directory, or .tflite file
  tensor: Optional[str] = None  # TFLite only: take features from this tensor
  input_size: Optional[Tuple[int, int]] = None  # (height, width); None: from the model
  dim: Optional[int] = None  # filled in by probing the model at launch
  model_format: Optional[str] = None  # filled in by probing the model at launch
  # Filled in by probing: the first outputs for probe_picture(), which tell this model's
  # weights from another's of the same shape (see same_response).
  response: Optional[Tuple[float, ...]] = None
  # SavedModels: run with the variables made constants (faster, about twice the memory
  # per worker); False keeps the model as loaded (--no_freeze_weights).
  freeze_weights: bool = True
  # Filled in by probing: why the output looks like class scores rather than features,
  # and what to pass instead (see classifier_note); the launcher prints it.
  output_note: Optional[str] = None


def is_hub_url(handle):
  return handle.startswith(('http://', 'https://'))


def hub_cache_dir():
  return os.environ.get(HUB_CACHE_ENV) or os.path.join(
      os.path.expanduser('~'), '.cache', 'tfhub_modules')


def hub_download_url(handle):
  """TF Hub and Kaggle serve a handle's compressed SavedModel at this address."""
  return handle.rstrip('/') + '?tf-hub-format=compressed'


def hub_cache_target(handle):
  """The local directory a hub URL's SavedModel is (or will be) downloaded to."""
  return os.path.join(hub_cache_dir(), hashlib.sha1(handle.encode()).hexdigest())


def resolve_hub_handle(handle, timeout=HUB_DOWNLOAD_TIMEOUT_S):
  """A hub URL -> a local directory holding its SavedModel, downloading it once.

  Fails fast with ModelUnavailableError, whose message says how to use a local copy.
  """
  target = hub_cache_target(handle)
  if os.path.exists(os.path.join(target, 'saved_model.pb')):
    return target
  url = hub_download_url(handle)
  try:
    with urllib.request.urlopen(url, timeout=timeout) as response:
      os.makedirs(hub_cache_dir(), exist_ok=True)
      staging = tempfile.mkdtemp(dir=hub_cache_dir(), prefix='.download-')
      with tarfile.open(fileobj=response, mode='r|gz') as archive:
        archive.extractall(staging, filter='data')
  except (OSError, urllib.error.URLError, tarfile.TarError) as e:
    raise ModelUnavailableError(
        'cannot download model %s (%s). If this machine cannot reach the hub, download '
        '%s elsewhere, unpack it, and pass --model NAME=/path/to/unpacked_dir (a local '
        'or gs:// SavedModel directory) instead.' % (handle, e, url)) from e
  os.replace(staging, target)  # atomic: a half-finished download never looks cached
  return target


# What TensorFlow's CUDA build prints to the process's stderr on every start on a machine
# without a GPU, whatever TF_CPP_MIN_LOG_LEVEL says: it is logged before absl's logging
# is initialized (tensorflow/tensorflow#100442). Every local worker process would print
# these ten lines again, including a "CUDA error" that is no error on a CPU machine.
TENSORFLOW_STARTUP_NOISE = re.compile(
    r'All log messages before absl::InitializeLog\(\) is called|'
    r'port\.cc:\d+\] oneDNN custom operations are on|'
    r'cudart_stub\.cc:\d+\] Could not find cuda drivers|'
    r'cuda_platform\.cc:\d+\] failed call to cuInit|'
    r'cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized|'
    r'^To enable the following instructions: .* rebuild TensorFlow')
# What the LiteRT interpreter prints (at INFO, whatever TF_CPP_MIN_LOG_LEVEL says) each
# time it applies its default CPU delegate: once per worker process, interleaved.
LITERT_DELEGATE_NOISE = re.compile(r'Created TensorFlow Lite XNNPACK delegate for CPU')
_TF_IMPORT_LOCK = threading.Lock()


@contextlib.contextmanager
def stderr_without(noise):
  """Runs the body with file descriptor 2 (where C++ libraries write) captured, then
  writes back every captured line that `noise` does not match: nothing is lost, only
  delayed. Without a real stderr (no file descriptor 2) or a temporary file to capture
  it in, the body runs as is: the filter must never stop what it wraps."""
  captured = saved = None
  try:
    sys.stderr.flush()
    saved = os.dup(2)
    captured = tempfile.TemporaryFile()
  except (AttributeError, OSError, ValueError):
    if saved is not None:
      os.close(saved)
  if captured is None:
    yield
    return
  with captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode('utf-8', 'replace').splitlines(keepends=True)
      kept = ''.join(line for line in lines if not noise.search(line))
      if kept:
        sys.stderr.write(kept)
        sys.stderr.flush()


def import_tensorflow():
  """The tensorflow module, imported (and its devices listed, which prints the last of
  its start-up lines) without TENSORFLOW_STARTUP_NOISE. Listing devices leaves the
  thread pools unset, so configure_tensorflow_threads still works after it."""
  with _TF_IMPORT_LOCK:
    if 'tensorflow' in sys.modules:
      return sys.modules['tensorflow']
    with stderr_without(TENSORFLOW_STARTUP_NOISE):
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      tf.config.list_physical_devices()
    return tf


_LOCAL_COPIES = {}  # remote SavedModel directory -> its copy on this machine
_LOCAL_COPIES_LOCK = threading.Lock()


def scheme_of(path):
  return path.split('://', 1)[0] if '://' in path else ''


def tensorflow_reads(path):
  """Whether TensorFlow's own file functions reach this path (local and gs:// do; other
  schemes may be known to Beam only)."""
  return scheme_of(path) in import_tensorflow().io.gfile.get_registered_schemes()


def copy_tree_to_local(directory):
  """Copies every file under a directory on any Beam filesystem into a new local temporary
  directory (removed when the process exits); returns the local directory."""
  prefix = directory.rstrip('/') + '/'
  paths = [m.path for m in FileSystems.match([prefix + '**'])[0].metadata_list]
  if not paths:
    raise ModelUnavailableError('no SavedModel at %s (the directory is empty or missing)'
                                % directory)
  local = tempfile.mkdtemp(prefix='model-')
  atexit.register(shutil.rmtree, local, True)
  for path in paths:
    target = os.path.join(local, *path[len(prefix):].split('/'))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, 'wb') as f:
      f.write(_read_bytes(path))
  return local


def saved_model_directory(handle):
  """A directory TensorFlow can load: hub URLs are downloaded, paths on filesystems that
  only Beam knows (TensorFlow reads local and gs:// itself) are copied here, once per
  process."""
  if is_hub_url(handle):
    return resolve_hub_handle(handle)
  if tensorflow_reads(handle):
    return handle
  with _LOCAL_COPIES_LOCK:
    if handle not in _LOCAL_COPIES:
      _LOCAL_COPIES[handle] = copy_tree_to_local(handle)
    return _LOCAL_COPIES[handle]


def saved_model_format(directory):
  """TF1 Hub modules hold a MetaGraph with an empty tag set; TF2 SavedModels do not."""
  tf = import_tensorflow()
  from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=import-outside-toplevel
  path = directory.rstrip('/') + '/saved_model.pb'
  if not tf.io.gfile.exists(path):
    raise ModelUnavailableError(
        'no SavedModel at %s (expected %s, or a .tflite file)' % (directory, path))
  proto = saved_model_pb2.SavedModel.FromString(tf.io.gfile.GFile(path, 'rb').read())
  for meta_graph in proto.meta_graphs:
    if not meta_graph.meta_info_def.tags and TF1_HUB_SIGNATURE in meta_graph.signature_def:
      return FORMAT_TF1_HUB
  return FORMAT_TF2


def _fixed_size(shape):
  """(height, width) of an NHWC shape when both are fixed, else None."""
  dims = list(shape)
  if len(dims) == 4 and dims[1] and dims[2] and dims[1] > 0 and dims[2] > 0:
    return int(dims[1]), int(dims[2])
  return None


def frozen_call(call, height, width):
  """`call` on float32 [N, height, width, 3] with the model's variables made constants.

  Constant weights let TensorFlow's graph optimizer fold batch normalization into the
  convolutions, which it cannot do through variables: the seed architectures ran 26-37%
  faster per core here (see README, Performance). Freezing is only a speed-up, so a
  model it fails on (a call that updates its own variables, a graph over protobuf's
  2 GB) keeps its plain call.
  """
  tf = import_tensorflow()
  from tensorflow.python.framework.convert_to_constants import (  # pylint: disable=import-outside-toplevel
      convert_variables_to_constants_v2)
  traced = tf.function(call).get_concrete_function(
      tf.TensorSpec([None, height, width, 3], tf.float32))
  try:
    frozen = convert_variables_to_constants_v2(traced)
  except Exception as e:  # pylint: disable=broad-except
    logging.info('model kept with its variables (freezing failed: %s: %s)',
                 type(e).__name__, e)
    return call
  structure = traced.structured_outputs  # not `traced`: it would keep the variables alive
  return lambda images: tf.nest.pack_sequence_as(structure, frozen(images))


class TensorFlowEmbedder:
  """A SavedModel (TF2 callable or TF1 Hub signature) behind a traced uint8 -> float32 call."""

  def __init__(self, directory, model_format, input_size, freeze_weights=True):
    tf = import_tensorflow()
    self.model_format = model_format
    if model_format == FORMAT_TF1_HUB:
      loaded = tf.saved_model.load(directory, tags=[])
      signature = loaded.signatures[TF1_HUB_SIGNATURE]
      declared = signature.structured_input_signature[1][TF1_HUB_INPUT].shape
      call = lambda images: signature(**{TF1_HUB_INPUT: images})[TF1_HUB_OUTPUT]
    else:
      loaded = tf.saved_model.load(directory)
      if callable(loaded):
        declared = _declared_call_shape(loaded)
        call = loaded
      else:
        signature = loaded.signatures['serving_default']
        inputs = signature.structured_input_signature[1]
        input_name = next(iter(inputs))
        declared = inputs[input_name].shape
        call = lambda images: next(iter(signature(**{input_name: images}).values()))
    self.input_size = tuple(input_size or _fixed_size(declared) or DEFAULT_INPUT_SIZE)
    height, width = self.input_size
    model_call = frozen_call(call, height, width) if freeze_weights else call
    # A call left unfrozen needs the loaded object alive (its functions hold only weak
    # references to its variables); a frozen one holds its own weights.
    self._loaded = loaded if model_call is call else None

    # One trace for every batch size: the batch dimension is left free.
    @tf.function(input_signature=[tf.TensorSpec([None, height, width, 3], tf.uint8)])
    def embed(pixels):
      features = model_call(tf.cast(pixels, tf.float32) / 255.0)
      return tf.reshape(features, [tf.shape(features)[0], -1])

    self._embed = embed

  def __call__(self, pixels):
    return self._embed(pixels).numpy().astype(np.float32, copy=False)


def _declared_call_shape(loaded):
  functions = getattr(loaded.__call__, 'concrete_functions', None) or []
  for function in functions:
    args = function.structured_input_signature[0]
    if args and hasattr(args[0], 'shape'):
      return args[0].shape
  return None


# Ops whose output is class probabilities, and the pooling that a classifier head reads
# (MobileNets: AVERAGE_POOL_2D in TF-Slim conversions, MEAN from Keras' global pooling).
CLASSIFIER_OPS = ('SOFTMAX', 'LOGISTIC')
POOLING_OPS = ('AVERAGE_POOL_2D', 'MEAN')
HEAD_OPS_SEARCHED = 8  # a classifier head is a few ops: conv or dense, reshape, softmax
IMAGENET_CLASS_COUNTS = (1000, 1001)  # ImageNet classifiers, without and with background


class TFLiteEmbedder:
  """A .tflite model on the LiteRT interpreter, with its own input quantization and a
  dequantized float32 output (the model output, or the named intermediate tensor)."""

  model_format = FORMAT_TFLITE

  def __init__(self, model_bytes, tensor=None, num_threads=None):
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=import-outside-toplevel
    self._model_bytes = model_bytes
    with warnings.catch_warnings(), stderr_without(LITERT_DELEGATE_NOISE):
      # Keeping intermediate tensors readable is the point when a tensor is named.
      warnings.simplefilter('ignore', UserWarning)
      self._interpreter = Interpreter(
          model_content=model_bytes, num_threads=num_threads,
          experimental_preserve_all_tensors=tensor is not None)
    self._lock = threading.Lock()  # one interpreter, and Beam may call from several threads
    self._input = self._interpreter.get_input_details()[0]
    if tensor is None:
      self._output = self._interpreter.get_output_details()[0]
    else:
      matches = [t for t in self._interpreter.get_tensor_details() if t['name'] == tensor]
      if not matches:
        raise ModelUnavailableError('the TFLite model has no tensor named %r' % tensor)
      self._output = matches[0]
    self._tensor_named = tensor is not None
    self._dynamic_batch = self._input['shape_signature'][0] == -1
    self._batch = int(self._input['shape'][0])
    self.input_size = (int(self._input['shape'][1]), int(self._input['shape'][2]))
    with stderr_without(LITERT_DELEGATE_NOISE):
      self._interpreter.allocate_tensors()

  def classifier_head(self):
    """(op, pooled tensor name or None) when the output taken is a classifier's class
    probabilities, from a CLASSIFIER_OPS op; the pooled tensor is the one its head reads,
    the image features. None for any other output."""
    if self._tensor_named:
      return None
    from ai_edge_litert.interpreter import Interpreter, OpResolverType  # pylint: disable=import-outside-toplevel
    try:
      # The model's own ops: the running interpreter's delegate fuses them into one.
      graph = Interpreter(model_content=self._model_bytes, experimental_op_resolver_type=(
          OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES))
      # Private, but the interpreter's only listing of ops: without it, no note.
      ops = graph._get_ops_details()  # pylint: disable=protected-access
    except Exception:  # pylint: disable=broad-except
      return None
    producers = {int(output): op for op in ops for output in op['outputs']}
    names = {t['index']: t['name'] for t in graph.get_tensor_details()}
    last = producers.get(int(self._output['index']))
    if last is None or last['op_name'] not in CLASSIFIER_OPS:
      return None
    op = last
    for _ in range(HEAD_OPS_SEARCHED):
      op = producers.get(int(op['inputs'][0])) if len(op['inputs']) else None
      if op is None:
        break
      if op['op_name'] in POOLING_OPS:
        return last['op_name'], names.get(int(op['outputs'][0]))
    return last['op_name'], None

  def _quantize(self, pixels):
    """uint8 pixels -> the input tensor's type. A quantized input is taken to span the
    pixel range (as the Coral/TF-Slim MobileNets do), a float input gets [0, 1]."""
    dtype = self._input['dtype']
    if dtype == np.uint8:
      return pixels
    if dtype == np.int8:
      return (pixels.astype(np.int16) - 128).astype(np.int8)
    return pixels.astype(dtype) / dtype(255.0)

  def _dequantize(self, values):
    scale, zero_point = self._output['quantization']
    if scale:
      return (values.astype(np.float32) - zero_point) * np.float32(scale)
    return values.astype(np.float32)

  def _run(self, batch):
    interpreter = self._interpreter
    if self._dynamic_batch and batch.shape[0] != self._batch:
      interpreter.resize_tensor_input(self._input['index'], batch.shape)
      interpreter.allocate_tensors()
      self._batch = batch.shape[0]
    interpreter.set_tensor(self._input['index'], batch)
    interpreter.invoke()
    values = interpreter.get_tensor(self._output['index'])
    return self._dequantize(values).reshape(batch.shape[0], -1)

  def __call__(self, pixels):
    batch = self._quantize(np.asarray(pixels))
    with self._lock:
      if self._dynamic_batch:
        return self._run(batch)
      # Fixed batch-1 models (most quantized ones) run one image at a time.
      return np.concatenate([self._run(batch[i:i + 1]) for i in range(len(batch))])


def _read_bytes(path):
  with FileSystems.open(path) as f:
    return f.read()


def load_embedder(spec: ModelSpec, num_threads=None):
  """ModelSpec -> a callable uint8 [N, H, W, 3] -> float32 [N, D], with .input_size and
  .model_format. Raises ModelUnavailableError with a readable message."""
  handle = spec.handle
  try:
    if handle.lower().endswith('.tflite'):
      if not FileSystems.exists(handle):
        raise ModelUnavailableError('no TFLite model at %s' % handle)
      return TFLiteEmbedder(_read_bytes(handle), spec.tensor, num_threads)
    if spec.tensor:
      raise ModelUnavailableError(
          '#%s: a feature tensor can only be named for a .tflite model' % spec.tensor)
    directory = saved_model_directory(handle)
    model_format = saved_model_format(directory)
    return TensorFlowEmbedder(directory, model_format, spec.input_size, spec.freeze_weights)
  except ModelUnavailableError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ModelUnavailableError('cannot load model %s from %s: %s: %s'
                                % (spec.name, handle, type(e).__name__, e)) from e


RESPONSE_VALUES = 64  # enough to tell two models apart, small enough for every part file


def probe_picture(height, width):
  """A fixed picture (diagonal colour bands of every pixel value) that any model
  answers with numbers that depend on all of its weights."""
  rows, columns = np.mgrid[0:height, 0:width]
  channels = [(3 * columns + rows) % 256, (columns + 5 * rows) % 256,
              (7 * columns + 2 * rows) % 256]
  return np.stack(channels, axis=-1).astype(np.uint8)[np.newaxis]


def model_response(embedder):
  """(output dimension, the first RESPONSE_VALUES outputs for probe_picture())."""
  vector = embedder(probe_picture(*embedder.input_size))[0]
  return len(vector), tuple(float(value) for value in vector[:RESPONSE_VALUES])


def finite_rows(vectors):
  """Per row of a model's (n, dim) output, whether every value is finite: a vector with
  NaN or infinity has no direction to compare, so the job makes its image a failure and
  a query refuses it."""
  return np.isfinite(vectors).all(axis=1)


def same_response(response, other):
  """Whether two responses come from the same model: equal up to the float differences
  of another CPU or library version, not of other weights."""
  response, other = np.asarray(response, np.float64), np.asarray(other, np.float64)
  if response.shape != other.shape:
    return False
  scale = max(float(np.nanmax(np.abs(other), initial=0.0)), 1e-6)
  return bool(np.allclose(response, other, rtol=1e-2, atol=1e-3 * scale, equal_nan=True))


def classifier_note(spec: ModelSpec, embedder, dim):
  """Why this model's output looks like class scores rather than image features, and
  what to pass instead (one line); None when it does not. A classifier's probabilities
  do find similar images, but far worse than the features its head reads."""
  head = embedder.classifier_head() if embedder.model_format == FORMAT_TFLITE else None
  if head:
    op, pooled = head
    found = ('model %s: its output (%d values, from %s) is a classifier\'s class '
             'probabilities, not image features' % (spec.name, dim, op))
    if pooled:
      return '%s; for the features its classifier reads, pass --model %s' % (
          found, shlex.quote('%s=%s#%s' % (spec.name, spec.handle, pooled)))
    return '%s; name a feature tensor with --model NAME=FILE.tflite#TENSOR' % found
  if dim in IMAGENET_CLASS_COUNTS and not spec.tensor:
    return ('model %s: its output has %d values, as an ImageNet classifier\'s class '
            'scores have; if it is a classification model, pass its feature_vector '
            'version (a .tflite file: a feature tensor with #TENSOR)' % (spec.name, dim))
  return None


def probe_model(spec: ModelSpec):
  """Loads the model once and returns the spec completed with its input size, output
  dimension, format, response and output note: the launcher does this before any work,
  so a bad handle stops the job at once and the output schema knows its dimension."""
  embedder = load_embedder(spec)
  dim, response = model_response(embedder)
  return spec._replace(input_size=tuple(embedder.input_size), dim=dim,
                       model_format=embedder.model_format, response=response,
                       output_note=classifier_note(spec, embedder, dim))


def probe_models(specs, in_subprocess=False):
  """probe_model for every spec; in a fresh child process when asked, so that the caller
  never imports TensorFlow or keeps a model in memory (the launcher of a multi-process
  or remote run only waits for its workers)."""
  if not in_subprocess:
    return [probe_model(spec) for spec in specs]
  import multiprocessing  # pylint: disable=import-outside-toplevel
  with multiprocessing.get_context('spawn').Pool(1) as pool:
    return pool.map(probe_model, specs)
