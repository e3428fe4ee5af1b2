"""An existing output directory: refuse it, overwrite it, or resume the run it holds."""

import glob
import os
import shlex
import socket
import uuid
from typing import NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from pipeline.runners import process_stat_field
from schemas import outputs
from schemas.records import content_sha256
from transforms.metrics import INPUT_FILES_READ
from transforms.models import import_tensorflow, same_response, scheme_of, tensorflow_reads
from transforms.read import SourceMatcher, format_of, literal_folder, unread_file_record


class OutputDirError(ValueError):
  """The output directory cannot be used as asked (reported as one line, exit 2)."""


class ResumeState(NamedTuple):
  """What a --resume run keeps from the earlier attempts, fixed at launch."""
  run_tag: str  # names this attempt's part files, so they never collide with earlier ones
  # (model name, path) of every completed embedding part, listed before this run writes
  completed_parts: Tuple[Tuple[str, str], ...] = ()
  # The folder the completed parts' keys are relative to (None: no part records one)
  keys_root: Optional[str] = None


def _glob_paths(pattern):
  """Files and directories matching a glob, on any filesystem. TensorFlow lists both
  (Beam's match lists files only); on a filesystem only Beam knows, a directory is what
  object stores make of it: the common prefix of the files under it."""
  if not scheme_of(pattern):
    # Local: the standard library lists directories too, and keeps TensorFlow (about
    # 700 MB) out of the launcher.
    return sorted(glob.glob(pattern))
  if tensorflow_reads(pattern):
    tf = import_tensorflow()
    return sorted(tf.io.gfile.glob(pattern))
  depth = pattern.rstrip('/').count('/')
  found = set(outputs.matching_paths(pattern))
  found.update('/'.join(path.split('/')[:depth + 1])
               for path in outputs.matching_paths(pattern.rstrip('/') + '/**'))
  return sorted(found)


def unfinished_leftovers(out_dir):
  """Temporary files and directories that an interrupted run leaves behind: Beam's
  sink directories (beam-temp-*), half-written index, JSON or rewritten part files, and
  an index build's trained and filled parts (each up to a whole index in size)."""
  patterns = [outputs.output_path(out_dir, '*', outputs.INDEX_BUILD_PREFIX + '*'),
              outputs.output_path(out_dir, '*', outputs.EMBEDDINGS_DIR, 'beam-temp-*'),
              outputs.output_path(out_dir, '*', outputs.EMBEDDINGS_DIR,
                                  '*' + outputs.TEMPORARY_SUFFIX),
              outputs.output_path(out_dir, outputs.FAILURES_DIR, 'beam-temp-*'),
              outputs.output_path(out_dir, '*', '*' + outputs.TEMPORARY_SUFFIX),
              outputs.output_path(out_dir, '*' + outputs.TEMPORARY_SUFFIX)]
  return [path for pattern in patterns for path in _glob_paths(pattern)]


def run_outputs(out_dir):
  """The files and directories a run writes into out_dir, manifest first (deleting it
  first means a half-deleted directory never looks complete)."""
  found = outdated_views(out_dir)
  found += _glob_paths(outputs.output_path(out_dir, outputs.FAILURES_DIR))
  model_dirs = set()
  for name in (outputs.EMBEDDINGS_DIR, outputs.INDEX_FILE, outputs.INDEX_IDS_FILE,
               outputs.INDEX_INFO_FILE):
    model_dirs.update(path.rsplit('/', 1)[0]
                      for path in _glob_paths(outputs.output_path(out_dir, '*', name)))
  return found + sorted(model_dirs) + unfinished_leftovers(out_dir)


def _tf_isdir(path):
  tf = import_tensorflow()
  return tf.io.gfile.isdir(path)


def delete_paths(paths):
  """Deletes files and (recursively) directories on any Beam filesystem."""
  for path in paths:
    if not scheme_of(path):
      # Beam's local filesystem deletes directories recursively.
      if FileSystems.exists(path):
        FileSystems.delete([path])
    elif not tensorflow_reads(path):
      # A directory is a prefix there: its files go, and with them the directory.
      doomed = outputs.matching_paths(path.rstrip('/') + '/**')
      doomed += [path] if FileSystems.exists(path) else []
      if doomed:
        FileSystems.delete(doomed)
    elif _tf_isdir(path):
      tf = import_tensorflow()
      tf.io.gfile.rmtree(path)
    elif FileSystems.exists(path):
      FileSystems.delete([path])


def completed_parts(out_dir, model_specs):
  """((model name, path) of every completed embedding part of the given models, the
  set of folders their keys are relative to). A part exists under its final name only
  once it is complete (the sink renames it there). Raises OutputDirError when a part was
  written by another model than the one of that name now (another dimension, or other
  weights: mixed vectors are meaningless)."""
  parts, keys_roots = [], set()
  for spec in model_specs:
    for path in outputs.matching_paths(outputs.embeddings_glob(out_dir, spec.name)):
      dim, made_by = outputs.parquet_embeddings_info(path)
      if dim != spec.dim:
        raise OutputDirError(
            'cannot resume: %s holds %d-dimensional embeddings, but model %s gives %d; '
            'use --overwrite or another --output' % (path, dim, spec.name, spec.dim))
      if (made_by and made_by.get('response') and spec.response
          and not same_response(spec.response, made_by['response'])):
        raise OutputDirError(
            'cannot resume: %s was written by another model than %s=%s (%s gave other '
            'vectors for the same picture); use the model of the earlier run, '
            '--overwrite, or another --output' % (path, spec.name, spec.handle,
                                                  made_by.get('handle')))
      parts.append((spec.name, path))
      if made_by and made_by.get('keys_root') is not None:
        keys_roots.add(made_by['keys_root'])
  return tuple(parts), keys_roots


def _process_start(pid):
  """When a process of this machine started (clock ticks since boot), or None when it
  does not exist or there is no /proc. With the pid it names one process: pids are
  reused, start times of the same pid are not."""
  return process_stat_field(pid, 22)


def _writer_alive(writer):
  """Whether the process a running-file names still runs. On another machine that
  cannot be told, and it is taken to run."""
  if writer.get('host') != socket.gethostname():
    return True
  pid = int(writer.get('pid') or 0)
  if pid <= 0:
    return False  # os.kill(0, ...) would ask about this process's whole group
  if _process_start(os.getpid()) is None:  # no /proc here: ask the kernel
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return False
    except OSError:
      return True  # it exists, under another user
    return True
  return _process_start(pid) == writer.get('process_start')


def check_not_being_written(out_dir, flag='--output'):
  """Refuses (OutputDirError) an out_dir that another run or index rebuild is writing
  (flag: the flag that named it). A running-file left by a run that was killed on this
  machine is ignored."""
  path = outputs.output_path(out_dir, outputs.RUNNING_FILE)
  if not FileSystems.exists(path):
    return
  try:
    writer = outputs.read_json(path)
  except Exception:  # pylint: disable=broad-except
    return  # unreadable: the half-written file of a run killed as it started
  if not _writer_alive(writer):
    return
  if writer.get('host') == socket.gethostname():
    raise OutputDirError('%s %s is being written by another run (process %s, started '
                         '%s); wait for it to end, or stop it' % (
                             flag, out_dir, writer.get('pid'), writer.get('started_at')))
  raise OutputDirError('%s %s may be being written by a run on %s (process %s, '
                       'started %s); if that run has stopped, delete %s and try again' % (
                           flag, out_dir, writer.get('host'), writer.get('pid'),
                           writer.get('started_at'), path))


def mark_being_written(out_dir):
  """Writes out_dir's running-file, naming this process."""
  outputs.write_json(outputs.output_path(out_dir, outputs.RUNNING_FILE), {
      'host': socket.gethostname(), 'pid': os.getpid(),
      'process_start': _process_start(os.getpid()),
      'started_at': outputs.utc_now()})


def unmark_being_written(out_dir):
  """Deletes out_dir's running-file if this process wrote it."""
  path = outputs.output_path(out_dir, outputs.RUNNING_FILE)
  try:
    if FileSystems.exists(path) and outputs.read_json(path).get('pid') == os.getpid():
      FileSystems.delete([path])
  except Exception:  # pylint: disable=broad-except
    pass  # a stale running-file is ignored by the next run on this machine


def check_output_dir(out_dir, resume=False, overwrite=False):
  """Refuses (OutputDirError) an out_dir holding a run, unless told what to do with it,
  and one that another run is writing. Nothing is changed here: see
  prepare_output_dir."""
  if resume and overwrite:
    raise OutputDirError('--resume and --overwrite exclude each other')
  check_not_being_written(out_dir)
  if resume or overwrite:
    return
  if FileSystems.exists(outputs.output_path(out_dir, outputs.MANIFEST_FILE)):
    raise OutputDirError(
        '--output %s holds a completed run; pass --resume to embed only new and changed inputs '
        '(and retry its failures) or --overwrite to replace it' % out_dir)
  if run_outputs(out_dir):
    raise OutputDirError(
        '--output %s holds the outputs of an unfinished run; pass --resume to finish '
        'it or --overwrite to start again' % out_dir)


def check_every_model_resumed(out_dir, model_names):
  """Refuses (OutputDirError) a resume that leaves out a model whose parts out_dir
  holds: the new manifest would no longer list it, and its rows would stop following
  the inputs (changed and deleted files)."""
  left_out = {}
  for path in outputs.matching_paths(outputs.embeddings_glob(out_dir, '*')):
    name = path.split('/')[-3]  # OUT/<model>/embeddings/part-*.parquet
    if name not in model_names and name not in left_out:
      _, made_by = outputs.parquet_embeddings_info(path)
      made_by = made_by or {}
      left_out[name] = made_by.get('handle') and made_by['handle'] + (
          '#' + made_by['tensor'] if made_by.get('tensor') else '')
  if left_out:
    raise OutputDirError(
        'cannot resume: %s also holds the embeddings of %s; resume with every model of '
        'the run (add %s), or delete %s to drop %s' % (
            out_dir, ', '.join(sorted(left_out)),
            ' '.join('--model ' + shlex.quote('%s=%s' % (name, handle) if handle else name)
                     for name, handle in sorted(left_out.items())),
            ' and '.join(outputs.model_dir(out_dir, name) for name in sorted(left_out)),
            'them' if len(left_out) > 1 else 'it'))


def resume_state(out_dir, model_specs):
  """A new ResumeState: this attempt's tag and the completed parts found at launch."""
  parts, keys_roots = completed_parts(out_dir, model_specs)
  # Parts of attempts made before parts recorded their folder record none.
  return ResumeState(run_tag='r' + uuid.uuid4().hex[:12], completed_parts=parts,
                     keys_root=keys_roots.pop() if len(keys_roots) == 1 else None)


def resumed_keys_root(state, root, patterns, given=None):
  """The folder a resumed run's keys are relative to. Narrower inputs than the earlier
  attempts' keep the earlier folder, so that an image keeps its key (2019/a.jpg, not
  a.jpg). Wider ones (an --input beside the first folder) raise OutputDirError: the
  images already embedded would be embedded again under a second key. Inputs moved
  elsewhere (the same tree on another disk or in a bucket) are keyed below their new
  folder, as any run's. given: the --input values as typed, for the message."""
  earlier = state.keys_root if state else None
  if earlier is None or root == earlier or not (
      root.startswith(earlier) or earlier.startswith(root)):
    return root
  if root.startswith(earlier):
    return earlier
  # A wider common folder comes from an input outside the earlier one.
  outside = [typed for pattern, typed in zip(patterns, given or patterns)
             if not literal_folder(pattern).startswith(earlier)]
  raise OutputDirError(
      'cannot resume: the keys of the images already embedded are their paths below '
      '%s, and --input %s lies outside it (its images could not be keyed the same way, '
      'and each earlier image would be embedded again under a second key); resume with '
      'inputs below %s, or run all the inputs into a new --output'
      % (earlier, outside[0] if outside else root, earlier))


def prepare_output_dir(out_dir, resume_state, overwrite=False):
  """Just before the pipeline starts: --overwrite deletes the earlier run's outputs;
  --resume deletes the manifest and the report (the output is about to change) and the
  temporary leftovers of interrupted attempts, keeping every completed part."""
  if overwrite:
    delete_paths(run_outputs(out_dir))
  elif resume_state is not None:
    delete_paths(outdated_views(out_dir) + unfinished_leftovers(out_dir))
  mark_being_written(out_dir)


def outdated_views(out_dir):
  """The files that describe a finished run as a whole, deleted as soon as it changes:
  the manifest (the run is not finished until it is written again) and the report,
  which a run with --no_report would otherwise leave with the old figures."""
  return [path for path in (outputs.output_path(out_dir, outputs.MANIFEST_FILE),
                            outputs.output_path(out_dir, outputs.REPORT_FILE))
          if FileSystems.exists(path)]


def earlier_failure_files(out_dir, run_tag):
  """Failure parts of earlier attempts: a resumed run retries every failed input, so
  its own failure files replace them."""
  return [path for path in outputs.matching_paths(outputs.failures_glob(out_dir))
          if not outputs.part_has_tag(path, run_tag)]


# What a resumed run finds for an input and a model with a row of its key: the row was
# made from the same bytes (the input is counted as embedded, not embedded again), or
# from other ones (the file changed since: it is embedded again and the old row goes).
# A row whose input the run's patterns cover but which was not read as an image (the
# file was deleted, or can no longer be read) is removed; an up-to-date row whose input
# was read from another place (the inputs moved) is given its new uri.
RESUMED = 'resumed'
CHANGED = 'changed'
REMOVED = 'removed'
MOVED = 'moved'
FOUND_STATUSES = (RESUMED, CHANGED, REMOVED, MOVED)
# Rows of unchanged bytes whose file has a new size or time (touched, copied): given
# them, so that the next resume need not read the file; not counted in the manifest.
RETIMED = 'retimed'
FOUND_TAG = 'found'
READ_TAG = 'read'
KNOWN_TAG = 'known'  # image files found unchanged, not read


def found_fact(status, model_name):
  """The manifest fact counting the inputs found with a status for a model."""
  return '%s/%s' % (status, model_name)


class EarlierRow(NamedTuple):
  """What a resume needs of one row of a completed part."""
  model: str
  sha256: str
  uri: str
  file_size: Optional[int] = None  # None in parts written before these columns existed
  file_modified: Optional[float] = None


def _completed_rows(model_and_path):
  model, path = model_and_path
  table = outputs.read_present_columns(path, EarlierRow._fields[1:] + ('key',))

  def column(name):
    return (table.column(name).to_pylist() if name in table.column_names
            else [None] * table.num_rows)
  return [(key, EarlierRow(model, *values)) for key, *values in zip(
      column('key'), *(column(name) for name in EarlierRow._fields[1:]))]


class CompletedRows(beam.PTransform):
  """(model, path) of completed parts -> (key, EarlierRow) for every row they hold."""

  def __init__(self, parts):
    super().__init__()
    self._parts = list(parts)

  def expand(self, pbegin):
    return (pbegin
            | 'Parts' >> beam.Create(self._parts)
            | 'Rows' >> beam.FlatMap(_completed_rows))


def found_rows(key, done):
  """EarlierRows of `key`, from the AsMultiMap side input (a lookup per key on runners
  that cannot hold all keys in memory; [] for unknown keys)."""
  return done[key]


def unchanged_sha256(unread, model_names, rows):
  """The stored digest of an input file (its transforms.read.unread_file_record) that
  every model embedded from a file of this very path, size and modification time, or
  None. Such a file is not read again: as rsync and make do, a resume trusts size and
  time (a file rewritten at the same size with its old time put back goes unnoticed)."""
  if unread.file_size is None or not unread.file_modified:
    return None  # a filesystem that reports no time: read it
  by_model = {row.model: row for row in rows}
  if not set(model_names) <= set(by_model):
    return None
  same = {(row.sha256, row.uri, row.file_size, row.file_modified)
          for row in (by_model[name] for name in model_names)}
  if len(same) != 1:
    return None
  sha256, uri, size, modified = same.pop()
  return sha256 if (uri, size, modified) == (unread.uri, unread.file_size,
                                             unread.file_modified) else None


class _SkipUnchangedDoFn(beam.DoFn):
  """InputFiles -> those to read, and (tagged KNOWN_TAG) an ImageRecord without data for
  every image file unchanged since every model embedded it: only its key, uri, stored
  digest, size and time, all that sort_completed and the row updates use."""

  def __init__(self, model_names, root, input_format, metrics):
    self._model_names = model_names
    self._root = root
    self._input_format = input_format
    self._metrics = metrics

  def process(self, listed, done):
    if format_of(listed.path, self._input_format) == 'files':  # a shard's rows: read it
      unread = unread_file_record(listed, self._root)
      sha256 = unchanged_sha256(unread, self._model_names, found_rows(unread.key, done))
      if sha256:
        self._metrics.inc(INPUT_FILES_READ)  # as the reader counts every file it reads
        yield beam.pvalue.TaggedOutput(KNOWN_TAG, unread._replace(sha256=sha256))
        return
    yield listed


class SkipUnchangedFiles(beam.PTransform):
  """InputFiles -> (InputFiles to read, ImageRecords without data of the files that need
  no reading), see unchanged_sha256."""

  def __init__(self, done, model_names, root, input_format, metrics):
    super().__init__()
    self._done = done
    self._do_fn = _SkipUnchangedDoFn(tuple(model_names), root, input_format, metrics)

  def expand(self, files):
    split = files | 'Split' >> beam.ParDo(self._do_fn, self._done).with_outputs(
        KNOWN_TAG, main='to_read')
    return split.to_read, split[KNOWN_TAG]


def read_source(record, sha256):
  """(uri, sha256, file_size, file_modified) of an input as this run found it."""
  return record.uri, sha256, record.file_size, record.file_modified


def sort_completed(record, model_names, done):
  """ImageRecord -> the record itself when some model still has to embed it,
  (RESUMED or CHANGED, model, key) tagged FOUND_TAG for every model with a row of its
  key, and (key, read_source) tagged READ_TAG. Only inputs found embedded are
  hashed here; the record passed on carries the digest. A record without data is a file
  found unchanged (unchanged_sha256), up to date for every model: its rows are not
  looked up again (a lookup per key costs the local runner a request to its workers)."""
  if record.data is None:
    yield beam.pvalue.TaggedOutput(READ_TAG, (record.key, read_source(record, record.sha256)))
    for model in model_names:
      yield beam.pvalue.TaggedOutput(FOUND_TAG, (RESUMED, model, record.key))
    return
  found = found_rows(record.key, done)
  current = content_sha256(record.data) if found else None
  yield beam.pvalue.TaggedOutput(READ_TAG, (record.key, read_source(record, current)))
  up_to_date = models_up_to_date(found, current)
  for row in found:
    status = RESUMED if row.model in up_to_date else CHANGED
    yield beam.pvalue.TaggedOutput(FOUND_TAG, (status, row.model, record.key))
  if not set(model_names) <= up_to_date:
    yield record._replace(sha256=current)  # the decode stage needs it too


def rows_to_update(key_and_joined, covered_by_inputs, root):
  """(key, {'rows': [EarlierRow], 'read': [read_source]}) ->
  (REMOVED, model, key) for every earlier row of a key not read as an image this run,
  from an input the run's patterns cover: where the row's uri points, or where its key
  is now (below root: the inputs may have moved); rows of inputs outside them (a
  narrower --input) stay. (MOVED, model, key, uri, file_size, file_modified) for every
  up-to-date row of an input read from another uri, and the same tagged RETIMED for one
  read from the same uri but listed with another size or time."""
  key, joined = key_and_joined
  if not joined['read']:
    return [(REMOVED, row.model, key) for row in joined['rows']
            if covered_by_inputs(row.uri) or covered_by_inputs(root + key)]
  uri_now, sha256_now, size_now, modified_now = joined['read'][0]
  updates = []
  for row in joined['rows']:
    if row.sha256 != sha256_now:
      continue  # changed: its row is dropped, the input embedded again
    if row.uri != uri_now:
      updates.append((MOVED, row.model, key, uri_now, size_now, modified_now))
    elif modified_now and (row.file_size, row.file_modified) != (size_now, modified_now):
      updates.append((RETIMED, row.model, key, uri_now, size_now, modified_now))
  return updates


def models_up_to_date(rows, sha256):
  """The models whose every earlier row of a key was made from these bytes. Rows of a
  repeated key (two inputs under one key) cannot be told apart, and a changed one drops
  them all (by key): every input of the key is then embedded again, so none is lost."""
  changed = {row.model for row in rows if row.sha256 != sha256}
  return {row.model for row in rows} - changed


def embedded_already(image, model_name, done):
  """Whether a DecodedImage has an up-to-date row of `model_name` (models_up_to_date)."""
  return model_name in models_up_to_date(found_rows(image.key, done), image.sha256)


def update_earlier_part(path, found):
  """Removes from an earlier attempt's part the rows of inputs that changed since (this
  run embeds them again) or are gone, and gives moved or retimed ones their file's new
  uri, size and time; returns the part's path. found: this model's (status, model,
  key[, uri, file_size, file_modified]) other than RESUMED."""
  if found:
    outputs.update_rows(path, [f[2] for f in found if f[0] in (CHANGED, REMOVED)],
                        {f[2]: f[3:] for f in found if f[0] in (MOVED, RETIMED)})
  return path


class CompletedWork:
  """What a resumed run skips or replaces, around the graph's read -> decode -> embed,
  from the rows of the completed parts (a side input: {key: [(model, sha256), ...]})."""

  def __init__(self, pipeline, state: ResumeState, model_names, patterns, root):
    """patterns, root: the run's inputs and the folder its keys are relative to."""
    self._pipeline = pipeline
    self._state = state
    self._model_names = tuple(model_names)
    self._patterns = tuple(patterns)
    self._root = root
    self._rows = pipeline | 'CompletedRows' >> CompletedRows(state.completed_parts)
    self._done = beam.pvalue.AsMultiMap(self._rows)
    self._found = None

  def skip_unchanged(self, input_format, metrics):
    """The read stage's skip_unchanged: image files every model embedded from the same
    path, size and time are not read again."""
    return SkipUnchangedFiles(self._done, self._model_names, self._root, input_format,
                              metrics)

  def skip_completed(self, images):
    """ImageRecords -> those some model still needs: new inputs, failed ones, and inputs
    whose file changed since it was embedded (the rest need no decoding)."""
    sorted_images = images | 'SkipCompleted' >> beam.FlatMap(
        sort_completed, self._model_names, self._done).with_outputs(
            FOUND_TAG, READ_TAG, main='images')
    updates = ({'rows': self._rows, 'read': sorted_images[READ_TAG]}
               | 'JoinRead' >> beam.CoGroupByKey()
               | 'RowsToUpdate' >> beam.FlatMap(rows_to_update,
                                                SourceMatcher(self._patterns), self._root))
    self._found = (sorted_images[FOUND_TAG], updates) | 'AllFound' >> beam.Flatten()
    return sorted_images.images

  def embed_input(self, decoded, model_name):
    """DecodedImages -> those the model has no up-to-date embedding of."""
    return decoded | 'NotYetEmbedded[%s]' % model_name >> beam.Filter(
        lambda image, done: not embedded_already(image, model_name, done), self._done)

  def found_counts(self):
    """(fact, count) for every model and status (RESUMED: inputs found embedded from the
    same bytes, which count as embedded, so that read = embedded + failed holds over the
    whole output; CHANGED: embedded from other bytes; REMOVED: rows of inputs gone;
    MOVED: rows given a new uri)."""
    zeros = [(found_fact(status, name), 0) for status in FOUND_STATUSES
             for name in self._model_names]
    found = (self._found
             | 'Counted' >> beam.Filter(lambda found: found[0] in FOUND_STATUSES)
             | 'FoundFacts' >> beam.Map(
                 lambda status_model_key: (found_fact(*status_model_key[:2]), 1)))
    return ((found, self._pipeline | 'NothingFound' >> beam.Create(zeros))
            | 'AllFacts' >> beam.Flatten()
            | 'CountFound' >> beam.CombinePerKey(sum))

  def earlier_parts(self, model_name):
    """Paths of the earlier attempts' completed parts of a model, once the rows of inputs
    that changed since or are gone are removed from them, and moved ones updated."""
    updates = self._found | 'Updates[%s]' % model_name >> beam.Filter(
        lambda found: found[0] != RESUMED and found[1] == model_name)
    return (self._pipeline
            | 'EarlierParts[%s]' % model_name >> beam.Create(
                [path for name, path in self._state.completed_parts if name == model_name])
            | 'UpdateEarlier[%s]' % model_name >> beam.Map(update_earlier_part,
                                                          beam.pvalue.AsList(updates)))
