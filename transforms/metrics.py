"""Run metrics: Beam counters and distributions with documented names, mirrored to local
progress files that the launcher's progress line reads while the job runs."""

import json
import os
import socket
import threading
import time

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from schemas import outputs

# Every metric of the job lives in this namespace; the names below are documented in
# README.md ("Progress, summary and run report") and show on the Dataflow job page.
NAMESPACE = 'image_embeddings'
INPUT_FILES_READ = 'input_files_read'  # matched input files (images or shards) fully read
IMAGES_READ = 'images_read'
READ_FAILED = 'read_failed'
DECODE_FAILED = 'decode_failed'
IMAGE_BYTES = 'image_bytes'  # distribution: encoded size of every image read
FAILURES_BY_REASON_PREFIX = 'failures/'  # failures/<stage>/<error type>


def embedded_metric(model_name):
  return 'embedded/' + model_name


def embed_failed_metric(model_name):
  return 'embed_failed/' + model_name


def embedding_norm_metric(model_name):
  """Distribution of L2 norms x 1000 (Beam distributions hold integers)."""
  return 'embedding_norm_x1000/' + model_name


# A worker process writes its running totals at most this often.
FLUSH_SECONDS = 1.0
PROGRESS_SUFFIX = '.progress.json'


class _ProcessTally:
  """One worker process's running totals for one run, written to its own file so that
  several processes never write the same file."""

  def __init__(self, progress_dir):
    self._progress_dir = progress_dir
    self._path = outputs.output_path(progress_dir, '%s-%d%s' % (
        socket.gethostname(), os.getpid(), PROGRESS_SUFFIX))
    self._lock = threading.Lock()
    self._counts = {}
    self._dirty = False

  def add(self, name, n):
    with self._lock:
      self._counts[name] = self._counts.get(name, 0) + n
      self._dirty = True

  def flush(self):
    """Writes the totals if they changed; False once the launcher removed the folder
    (the run is over)."""
    with self._lock:
      if not self._dirty:
        return True
      data = json.dumps(self._counts).encode('utf-8')
      self._dirty = False
    if not FileSystems.exists(self._progress_dir):
      return False  # and not recreated: a local create makes missing folders
    try:
      outputs.write_bytes_atomically(self._path, data, mime_type='application/json')
    except Exception:  # pylint: disable=broad-except
      return False
    return True


_tallies = {}
_tallies_lock = threading.Lock()
_flusher = []  # the process's one flushing thread, once started


def _flush_forever():
  while True:
    time.sleep(FLUSH_SECONDS)
    with _tallies_lock:
      tallies = list(_tallies.items())
    for progress_dir, tally in tallies:
      if not tally.flush():
        with _tallies_lock:
          _tallies.pop(progress_dir, None)


def _tally(progress_dir):
  with _tallies_lock:
    if not _flusher:
      # One daemon thread per process writes every dirty tally, so the counting itself
      # never waits on a file and the last counts of a bundle are written too.
      _flusher.append(threading.Thread(target=_flush_forever, name='progress-files',
                                       daemon=True))
      _flusher[0].start()
    if progress_dir not in _tallies:
      _tallies[progress_dir] = _ProcessTally(progress_dir)
    return _tallies[progress_dir]


class RunMetrics:
  """Counts into Beam metrics and, when given a local folder, into progress files.

  Plain values only, so it pickles to any worker; progress_dir is None on runners whose
  workers do not share the launcher's disk (Dataflow), where the job page shows the
  counters instead.
  """

  def __init__(self, progress_dir=None):
    self.progress_dir = progress_dir

  def inc(self, name, n=1):
    Metrics.counter(NAMESPACE, name).inc(n)
    if self.progress_dir:
      _tally(self.progress_dir).add(name, n)

  def update_distribution(self, name, value):
    Metrics.distribution(NAMESPACE, name).update(int(value))

  def flush(self):
    """Writes this process's progress file now (at the end of a bundle)."""
    if self.progress_dir:
      _tally(self.progress_dir).flush()


def read_progress(progress_dir):
  """Sum of every worker process's progress file: {metric name: count}."""
  totals = {}
  for path in outputs.matching_paths(outputs.output_path(progress_dir, '*' + PROGRESS_SUFFIX)):
    try:
      counts = outputs.read_json(path)
    except (OSError, ValueError):
      continue  # replaced while being read; the next poll sees it
    for name, count in counts.items():
      totals[name] = totals.get(name, 0) + count
  return totals


class _CountDoFn(beam.DoFn):

  def __init__(self, metrics, count_of):
    self._metrics = metrics
    self._count_of = count_of

  def process(self, element):
    for name, value in self._count_of(element):
      if value is None:
        self._metrics.inc(name)
      else:
        self._metrics.update_distribution(name, value)

  def finish_bundle(self):
    self._metrics.flush()


def count_images_read(record):
  yield IMAGES_READ, None
  if record.data is not None:  # a resume's file found unchanged is not read
    yield IMAGE_BYTES, len(record.data)


def failure_counts(metric):
  """Counts for FailureRecords: the stage's total and one counter per reason."""
  def count_of(record):
    yield metric, None
    yield '%s%s/%s' % (FAILURES_BY_REASON_PREFIX, record.stage, record.error), None
  return count_of


def embedding_counts(model_name):
  def count_of(embedding):
    yield embedded_metric(model_name), None
    yield embedding_norm_metric(model_name), 1000 * float(np.linalg.norm(embedding.vector))
  return count_of


class CountInto(beam.PTransform):
  """A leaf branch that counts a PCollection's elements into metrics; count_of yields
  (metric name, None) for a counter and (metric name, value) for a distribution."""

  def __init__(self, metrics, count_of):
    super().__init__()
    self._metrics = metrics
    self._count_of = count_of

  def expand(self, pcoll):
    return pcoll | 'Count' >> beam.ParDo(_CountDoFn(self._metrics, self._count_of))
