"""An existing output directory: refuse it, overwrite it, or resume the run it holds."""

import glob
import uuid
from typing import NamedTuple, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from schemas import outputs
from transforms.models import import_tensorflow, scheme_of, tensorflow_reads


class OutputDirError(ValueError):
  """The output directory cannot be used as asked (reported as one line, exit 2)."""


class ResumeState(NamedTuple):
  """What a --resume run keeps from the earlier attempts, fixed at launch."""
  run_tag: str  # names this attempt's part files, so they never collide with earlier ones
  # (model name, path) of every completed embedding part, listed before this run writes
  completed_parts: Tuple[Tuple[str, str], ...] = ()


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
  sink directories (beam-temp-*) and half-written index or JSON files."""
  patterns = [outputs.output_path(out_dir, '*', outputs.EMBEDDINGS_DIR, 'beam-temp-*'),
              outputs.output_path(out_dir, outputs.FAILURES_DIR, 'beam-temp-*'),
              outputs.output_path(out_dir, '*', '*' + outputs.TEMPORARY_SUFFIX),
              outputs.output_path(out_dir, '*' + outputs.TEMPORARY_SUFFIX)]
  return [path for pattern in patterns for path in _glob_paths(pattern)]


def run_outputs(out_dir):
  """The files and directories a run writes into out_dir, manifest first (deleting it
  first means a half-deleted directory never looks complete)."""
  found = [outputs.output_path(out_dir, outputs.MANIFEST_FILE)]
  found = [p for p in found if FileSystems.exists(p)]
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
  """(model name, path) of every completed embedding part of the given models. A part
  exists under its final name only once it is complete (the sink renames it there)."""
  parts = []
  for spec in model_specs:
    for path in outputs.matching_paths(outputs.embeddings_glob(out_dir, spec.name)):
      dim = outputs.parquet_embedding_dim(path)
      if dim != spec.dim:
        raise OutputDirError(
            'cannot resume: %s holds %d-dimensional embeddings, but model %s gives %d; '
            'use --overwrite or another --output' % (path, dim, spec.name, spec.dim))
      parts.append((spec.name, path))
  return tuple(parts)


def check_output_dir(out_dir, resume=False, overwrite=False):
  """Refuses (OutputDirError) an out_dir holding a run, unless told what to do with it.
  Nothing is changed here: see prepare_output_dir."""
  if resume and overwrite:
    raise OutputDirError('--resume and --overwrite exclude each other')
  if resume or overwrite:
    return
  if FileSystems.exists(outputs.output_path(out_dir, outputs.MANIFEST_FILE)):
    raise OutputDirError(
        '--output %s holds a completed run; pass --resume to embed only new inputs '
        '(and retry its failures) or --overwrite to replace it' % out_dir)
  if run_outputs(out_dir):
    raise OutputDirError(
        '--output %s holds the outputs of an unfinished run; pass --resume to finish '
        'it or --overwrite to start again' % out_dir)


def resume_state(out_dir, model_specs):
  """A new ResumeState: this attempt's tag and the completed parts found at launch."""
  return ResumeState(run_tag='r' + uuid.uuid4().hex[:12],
                     completed_parts=completed_parts(out_dir, model_specs))


def prepare_output_dir(out_dir, resume_state, overwrite=False):
  """Just before the pipeline starts: --overwrite deletes the earlier run's outputs;
  --resume deletes the manifest (the output is about to change) and the temporary
  leftovers of interrupted attempts, keeping every completed part."""
  if overwrite:
    delete_paths(run_outputs(out_dir))
  elif resume_state is not None:
    delete_paths([outputs.output_path(out_dir, outputs.MANIFEST_FILE)]
                 + unfinished_leftovers(out_dir))


def earlier_failure_files(out_dir, run_tag):
  """Failure parts of earlier attempts: a resumed run retries every failed input, so
  its own failure files replace them."""
  return [path for path in outputs.matching_paths(outputs.failures_glob(out_dir))
          if not outputs.part_has_tag(path, run_tag)]


def _completed_keys(model_and_path):
  model, path = model_and_path
  table = outputs.read_parquet([path], columns=['key'])
  return [(key, model) for key in table.column('key').to_pylist()]


class CompletedKeys(beam.PTransform):
  """(model, path) of completed parts -> (key, model) for every key they hold."""

  def __init__(self, parts):
    super().__init__()
    self._parts = list(parts)

  def expand(self, pbegin):
    return (pbegin
            | 'Parts' >> beam.Create(self._parts)
            | 'Keys' >> beam.FlatMap(_completed_keys))


def models_done(key, done):
  """The models that already embedded `key`, from the AsMultiMap side input (a lookup
  per key on runners that cannot hold all keys in memory; [] for unknown keys)."""
  return set(done[key])


def needs_work(record, model_names, done):
  return not set(model_names) <= models_done(record.key, done)


def done_for(record, model_name, done):
  return model_name in models_done(record.key, done)


class CompletedWork:
  """What a resumed run skips, around the graph's read -> decode -> embed, from the keys
  of the completed parts (a side input: {key: [model, ...]})."""

  def __init__(self, pipeline, state: ResumeState, model_names):
    self._model_names = tuple(model_names)
    self._done = beam.pvalue.AsMultiMap(
        pipeline | 'CompletedKeys' >> CompletedKeys(state.completed_parts))

  def skip_decoding(self, images):
    """ImageRecords -> those some model still needs (the rest need no decoding)."""
    return images | 'SkipCompleted' >> beam.Filter(needs_work, self._model_names, self._done)

  def embed_input(self, decoded, model_name):
    """DecodedImages -> those the model has no embedding of yet."""
    return decoded | 'NotYetEmbedded[%s]' % model_name >> beam.Filter(
        lambda record, done: not done_for(record, model_name, done), self._done)

  def already_embedded(self, images, model_name):
    """ImageRecords -> those the model embedded earlier; they count as embedded, so
    that read = embedded + failed holds over the whole output."""
    return images | 'AlreadyEmbedded[%s]' % model_name >> beam.Filter(
        done_for, model_name, self._done)
