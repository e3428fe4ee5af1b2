"""Embed stage: DecodedImages -> Embeddings through Beam's RunInference, one model per worker."""

import gc
import logging
import sys

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, RunInference

from schemas.records import FAILURES_TAG, STAGE_EMBED, DecodedImage, Embedding, FailureRecord
from transforms.failures import route_failures
from transforms.models import ModelSpec, finite_rows, import_tensorflow, load_embedder

# Small batches keep a MobileNet's activations in cache: on a 2-core machine, one
# single-threaded worker per core runs all three seed models fastest at 8 (v2_130_224
# 16% faster than at 16, the others 1-8%; 10-25% faster than at 64, per
# benchmarks/model_ceiling.py), and the workers hold far less memory. End to end, 8
# against 16 measured v2 6% faster and v1, v3 the same within the noise.
DEFAULT_BATCH_SIZE = 8


def configure_tensorflow_threads(intra_op_threads):
  """Sizes TensorFlow's thread pools to this worker's share of the cores.

  Only possible before TensorFlow first runs in this process; after that (for example
  in-process after the launcher probed the models) the existing pools are kept.
  """
  if not intra_op_threads:
    return
  tf = import_tensorflow()
  try:
    tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
    tf.config.threading.set_inter_op_parallelism_threads(intra_op_threads)
  except RuntimeError:
    logging.info('TensorFlow already initialized; keeping its thread pools')


# The module a Beam SDK worker process runs as its main program, locally and on Dataflow.
SDK_WORKER_MAIN = 'apache_beam.runners.worker.sdk_worker_main'


def in_sdk_worker_process():
  """Whether this process is a Beam SDK worker (not a launcher running the job itself)."""
  spec = getattr(sys.modules.get('__main__'), '__spec__', None)
  return getattr(spec, 'name', None) == SDK_WORKER_MAIN


def settle_worker_heap():
  """In an SDK worker process, once a model is loaded: collects the loading's garbage,
  then moves every remaining object to the garbage collector's permanent generation.

  Such a worker holds about 480,000 objects (TensorFlow, Beam, the model), which every
  full collection scans: one 0.25 s pause per worker in a run of 10,000 images, more in
  longer ones, and at exit, where the local runner stops its workers one after the other
  (0.9 s each; 0.2 s frozen). Objects made per image are still collected. Not done in a
  launcher process, whose objects outlive the run (tests run many jobs in one process).
  Returns whether the heap was frozen.
  """
  if not in_sdk_worker_process():
    return False
  gc.collect()
  gc.freeze()
  return True


NON_FINITE_ERROR = 'NonFiniteEmbedding'


def embed_batch(images, embedder, model_name):
  """A list of DecodedImage -> a list of Embedding, through one model call; a
  FailureRecord (stage embed) for an image the model gave NaN or infinite values: such a
  vector has no direction to compare, and one among the training vectors of a FAISS
  index spoils every cluster it joins.

  The pixels are dropped from the outputs: downstream stages need only the metadata.
  """
  size = tuple(embedder.input_size)
  vectors = embedder(np.stack([image.pixels[size] for image in images]))
  finite = finite_rows(vectors)
  return [Embedding(image=image._replace(pixels=None), model=model_name, vector=vector)
          if ok else FailureRecord(
              key=image.key, uri=image.uri, stage=STAGE_EMBED, error=NON_FINITE_ERROR,
              message='the model gave %d non-finite values (NaN or infinity) of %d for this '
              'image' % (np.count_nonzero(~np.isfinite(vector)), len(vector)),
              model=model_name)
          for image, vector, ok in zip(images, vectors, finite)]


class EmbeddingModelHandler(ModelHandler[DecodedImage, Embedding, object]):
  """Beam ModelHandler for every format transforms.models loads."""

  def __init__(self, spec: ModelSpec, batch_size=DEFAULT_BATCH_SIZE, intra_op_threads=None):
    super().__init__()
    self._spec = spec
    self._batch_size = batch_size
    self._intra_op_threads = intra_op_threads

  def load_model(self):
    configure_tensorflow_threads(self._intra_op_threads)
    embedder = load_embedder(self._spec, num_threads=self._intra_op_threads)
    settle_worker_heap()
    return embedder

  def run_inference(self, batch, model, inference_args=None):
    return embed_batch(batch, model, self._spec.name)

  def get_num_bytes(self, batch):
    # The default pickles the whole batch just to measure it.
    return sum(pixels.nbytes for image in batch for pixels in image.pixels.values())

  def get_metrics_namespace(self):
    return 'embed_' + self._spec.name

  def batch_elements_kwargs(self):
    return {'min_batch_size': self._batch_size, 'max_batch_size': self._batch_size}


def failures_of_batch(failed, model_name):
  """RunInference's dead letter (batch, exception info) -> one FailureRecord per image."""
  batch, error = failed
  if isinstance(error, tuple):  # (type, repr, traceback) from Beam's exception handling
    error_name = getattr(error[0], '__name__', str(error[0]))
    message = str(error[1])
  else:
    error_name, message = type(error).__name__, str(error)
  return [FailureRecord(key=image.key, uri=image.uri, stage=STAGE_EMBED, error=error_name,
                        message=message[:2000], model=model_name) for image in batch]


class EmbedImages(beam.PTransform):
  """DecodedImages -> Embeddings of one model, with tagged output 'failures'."""

  def __init__(self, spec: ModelSpec, batch_size=DEFAULT_BATCH_SIZE, intra_op_threads=None):
    super().__init__()
    self._spec = spec
    self._handler = EmbeddingModelHandler(spec, batch_size, intra_op_threads)

  def expand(self, decoded):
    name = self._spec.name
    results, dead_letters = (
        decoded | 'RunInference' >> RunInference(self._handler).with_exception_handling())
    embedded = results | 'NonFinite' >> beam.FlatMap(
        lambda result: route_failures([result])).with_outputs(FAILURES_TAG, main='embeddings')
    failures = ((dead_letters.failed_inferences
                 | 'FailureRecords' >> beam.FlatMap(failures_of_batch, name),
                 embedded[FAILURES_TAG])
                | 'Failures' >> beam.Flatten())
    return {'embeddings': embedded.embeddings, 'failures': failures}
