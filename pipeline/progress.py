"""The launcher's live progress line: workers' progress files -> one line every few seconds."""

import collections
import contextlib
import shutil
import sys
import tempfile
import threading
import time

from pipeline.runners import short_runner_name
from transforms import metrics as run_metrics
from transforms.read import format_of, iter_matches

TERMINAL_REFRESH_SECONDS = 2
# Images per second are measured over this much recent time, so the estimate follows the
# current speed rather than the slow start (model loading, reading).
RATE_WINDOW_SECONDS = 60
# Runners whose workers do not share the launcher's disk: no progress files there; their
# job page shows the same figures as Beam counters.
REMOTE_RUNNERS = ('dataflow', 'testdataflow')  # as runners.short_runner_name gives them


def count_input_files(patterns, input_format, excluded=None):
  """(number of distinct matched files outside the folder excluded, whether each of
  them is one image)."""
  paths = {metadata.path for pattern in patterns
           for metadata in iter_matches(pattern, excluded=excluded)}
  return len(paths), all(format_of(p, input_format) == 'files' for p in paths)


def format_duration(seconds):
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return '%d:%02d:%02d' % (hours, rest // 60, rest % 60) if hours else '%d:%02d' % divmod(
      rest, 60)


def progress_figures(totals, model_names, input_files, files_are_images):
  """Summed progress counters -> the figures of the line (counts, no timing).

  The image total is known from the start for image files (one per matched file), and
  for shards once every matched file has been read.
  """
  read_failed = totals.get(run_metrics.READ_FAILED, 0)
  decode_failed = totals.get(run_metrics.DECODE_FAILED, 0)
  read = totals.get(run_metrics.IMAGES_READ, 0) + read_failed
  files_read = totals.get(run_metrics.INPUT_FILES_READ, 0)
  embedded = {name: totals.get(run_metrics.embedded_metric(name), 0) for name in model_names}
  embed_failed = {name: totals.get(run_metrics.embed_failed_metric(name), 0)
                  for name in model_names}
  # An image is done for a model once it is embedded or has failed; for the whole run
  # once it is done for every model.
  done = min(embedded[name] + embed_failed[name] for name in model_names) + (
      read_failed + decode_failed)
  if input_files is not None and files_are_images:
    total = input_files
  elif input_files is not None and files_read >= input_files:
    total = read
  else:
    total = None
  return {'read': read, 'files_read': files_read, 'input_files': input_files,
          'files_are_images': files_are_images, 'embedded': embedded,
          'failed': read_failed + decode_failed + sum(embed_failed.values()),
          'done': done, 'total': total}


def format_progress(figures, elapsed, rate, ending=None):
  """The progress line: counts, images per second and the estimated time left; the last
  line ends with how the run ended ('done', 'stopped')."""
  if figures['files_are_images'] and figures['total'] is not None:
    read = 'read %s/%s' % (format(figures['read'], ','), format(figures['total'], ','))
  elif figures['input_files'] is not None:
    read = 'read %s (%s/%s files)' % (format(figures['read'], ','),
                                      format(figures['files_read'], ','),
                                      format(figures['input_files'], ','))
  else:
    read = 'read %s' % format(figures['read'], ',')
  embedded = figures['embedded']
  if len(embedded) == 1:
    embedded_text = 'embedded %s' % format(next(iter(embedded.values())), ',')
  else:
    embedded_text = 'embedded ' + ', '.join('%s %s' % (name, format(count, ','))
                                           for name, count in embedded.items())
  parts = [format_duration(elapsed), read, embedded_text,
           'failed %s' % format(figures['failed'], ','), '%.1f images/s' % rate]
  total = figures['total']
  if ending:
    parts.append(ending)
  elif total is not None and figures['done'] >= total:
    parts.append('finishing (index, manifest)')
  elif total is not None and rate > 0:
    parts.append('about %s left' % format_duration((total - figures['done']) / rate))
  return ' | '.join(parts)


class ProgressReporter:
  """Polls the progress files of a local run in a background thread and writes the line:
  redrawn in place every 2 s on a terminal, else one line every `interval` seconds."""

  def __init__(self, progress_dir, model_names, patterns, input_format, interval,
               stream=None, clock=time.monotonic, excluded=None):
    self._progress_dir = progress_dir
    self._model_names = list(model_names)
    self._patterns = list(patterns)
    self._input_format = input_format
    self._excluded = excluded  # the output folder: never input
    self._stream = stream or sys.stderr
    self._terminal = self._stream.isatty()
    self._interval = TERMINAL_REFRESH_SECONDS if self._terminal else interval
    self._clock = clock
    self._started = clock()
    self._history = collections.deque()
    self._input_files = None
    self._files_are_images = False
    self._stop = threading.Event()
    self._thread = None

  def _count_inputs(self):
    try:
      self._input_files, self._files_are_images = count_input_files(
          self._patterns, self._input_format, self._excluded)
    except Exception:  # pylint: disable=broad-except
      pass  # no total, no estimate; the counts still show

  def line(self, ending=None):
    """Reads the progress files once and returns the current line."""
    figures = progress_figures(run_metrics.read_progress(self._progress_dir),
                               self._model_names, self._input_files, self._files_are_images)
    now = self._clock()
    self._history.append((now, figures['done']))
    while now - self._history[0][0] > RATE_WINDOW_SECONDS:
      self._history.popleft()
    if ending:
      # The run's own rate: the last minute of a finished run is its index and manifest.
      then, done_then = self._started, 0
    else:
      then, done_then = self._history[0]
    rate = (figures['done'] - done_then) / (now - then) if now > then else 0.0
    return format_progress(figures, now - self._started, rate, ending)

  def _write(self, text, final=False):
    if self._terminal:
      self._stream.write('\r' + text + '\x1b[K' + ('\n' if final else ''))
    else:
      self._stream.write(text + '\n')
    self._stream.flush()

  def _run(self):
    self._count_inputs()
    while not self._stop.wait(self._interval):
      self._write(self.line())

  def start(self):
    self._thread = threading.Thread(target=self._run, name='progress-line', daemon=True)
    self._thread.start()
    return self

  def stop(self, ending='done'):
    """Ends the thread and writes the last line."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    self._write(self.line(ending), final=True)


@contextlib.contextmanager
def live_progress(config, runner, interval):
  """Around a run: yields the RunMetrics the graph counts into, with a progress folder
  and a progress line when the workers share this machine's disk and interval > 0."""
  if not interval or short_runner_name(runner) in REMOTE_RUNNERS:
    yield run_metrics.RunMetrics()
    return
  progress_dir = tempfile.mkdtemp(prefix='embedding-progress-')
  reporter = ProgressReporter(progress_dir, [spec.name for spec in config.models],
                              config.patterns, config.input_format, interval,
                              excluded=config.out_dir).start()
  ending = 'stopped'  # interrupted, or failed: its error follows
  try:
    yield run_metrics.RunMetrics(progress_dir)
    ending = 'done'
  finally:
    reporter.stop(ending)
    shutil.rmtree(progress_dir, ignore_errors=True)
