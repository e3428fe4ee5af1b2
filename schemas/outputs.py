"""Where every output file lives and what its columns are: the single source of truth."""

import datetime
import json
import math
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from apache_beam.io.filesystems import FileSystems

# File layout under OUT/ (see README, "Output layout").
MANIFEST_FILE = 'manifest.json'
FAILURES_DIR = 'failures'
EMBEDDINGS_DIR = 'embeddings'
INDEX_FILE = 'index.faiss'
INDEX_IDS_FILE = 'index_ids.parquet'
INDEX_INFO_FILE = 'index_info.json'
REPORT_FILE = 'report.html'
# Who is writing OUT/ now (host, process); present only while a run or an index rebuild
# is under way, so that a second one is refused instead of mixing its files in.
RUNNING_FILE = '.running.json'
# Temporary files of an index build beside the index (trained empty index, filled parts);
# deleted when the build finishes.
INDEX_BUILD_PREFIX = 'index-build-'
PART_PREFIX = 'part'
PART_SHARD_TEMPLATE = '-SSSSS-of-NNNNN'
# Suffix of a file being written; renamed to its final name once complete.
TEMPORARY_SUFFIX = '.tmp-writing'
PARQUET_SUFFIX = '.parquet'
# What a run writes at the top of OUT/ besides one folder per model: no model may take
# one of these names (its folder would replace the file, or mix into the folder).
RUN_LEVEL_NAMES = (MANIFEST_FILE, FAILURES_DIR, REPORT_FILE, RUNNING_FILE)
# Columns of a part written without Parquet's dictionary encoding: the floats of a
# feature vector rarely repeat, so the writer built a dictionary for every row group
# only to drop it (v3_small parts: 10% larger, and 0.006 ms more per row).
PLAIN_COLUMNS = ('embedding',)

MANIFEST_FORMAT_VERSION = 1


def utc_now():
  """The time as every output file records it (manifest, running-file)."""
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def output_path(out_dir, *parts):
  return FileSystems.join(out_dir.rstrip('/'), *parts)


# Beam's glob characters (its translate_pattern knows no braces).
GLOB_CHARS = re.compile(r'[*?\[]')


def glob_characters_refusal(out_dir):
  """Why an output folder named with glob characters cannot be used, or None. Its files
  are found by pattern (by Beam's file sink too, which then cannot find the parts it
  wrote), where '[', '*' and '?' would be read as wildcards."""
  held = sorted(set(GLOB_CHARS.findall(out_dir)))
  if not held:
    return None
  return ('%s: an output folder whose name holds %s cannot be used (its files are found by '
          'pattern, where these are wildcards); choose or rename it without them'
          % (out_dir, ' or '.join("'%s'" % c for c in held)))


def model_dir(out_dir, model_name):
  return output_path(out_dir, model_name)


def embeddings_prefix(out_dir, model_name):
  """Beam file-path prefix for a model's embedding parts."""
  return output_path(out_dir, model_name, EMBEDDINGS_DIR, PART_PREFIX)


def embeddings_glob(out_dir, model_name):
  return output_path(out_dir, model_name, EMBEDDINGS_DIR,
                     PART_PREFIX + '-*' + PARQUET_SUFFIX)


def relative_embeddings_glob(model_name):
  """The embedding files' pattern relative to OUT/, as the manifest records it."""
  return '%s/%s/%s-*%s' % (model_name, EMBEDDINGS_DIR, PART_PREFIX, PARQUET_SUFFIX)


def failures_prefix(out_dir):
  return output_path(out_dir, FAILURES_DIR, PART_PREFIX)


def failures_glob(out_dir):
  return output_path(out_dir, FAILURES_DIR, PART_PREFIX + '-*' + PARQUET_SUFFIX)


def part_shard_template(run_tag=None):
  """Beam shard-name template of the part files. A resumed run tags its parts
  (part-TAG-00000-of-00004.parquet): Beam's sink deletes existing files named like its
  own before renaming, so untagged parts of an earlier attempt could be lost."""
  return PART_SHARD_TEMPLATE if run_tag is None else '-' + run_tag + PART_SHARD_TEMPLATE


def part_has_tag(path, run_tag):
  return path.rsplit('/', 1)[-1].startswith('%s-%s-' % (PART_PREFIX, run_tag))


# Schema metadata of an embeddings part: JSON of the model that wrote it (name, handle,
# tensor, format, input size, dimension, and its response to a fixed picture), so that
# a resume or a query can tell whether the model it loads now is the same one, and of the
# folder its keys are relative to (keys_root), which a resumed run keeps.
MODEL_METADATA_KEY = b'beam_image_embeddings.model'


def embeddings_schema(dim, model_record=None):
  """Columns of OUT/<model>/embeddings/part-*.parquet; model_record (a dict) goes into
  the schema's metadata."""
  metadata = ({MODEL_METADATA_KEY: json.dumps(model_record, sort_keys=True)}
              if model_record else None)
  return pa.schema([
      pa.field('key', pa.string(), nullable=False),
      pa.field('uri', pa.string(), nullable=False),
      pa.field('model', pa.string(), nullable=False),
      pa.field('embedding', pa.list_(pa.float32(), dim), nullable=False),
      pa.field('width', pa.int32(), nullable=False),
      pa.field('height', pa.int32(), nullable=False),
      pa.field('sha256', pa.string(), nullable=False),
      # An image file's size in bytes and modification time (seconds since the epoch) as
      # listed; null for a shard's records. Parts written before they existed lack them.
      pa.field('file_size', pa.int64()),
      pa.field('file_modified', pa.float64()),
      pa.field('label', pa.string()),
      pa.field('metadata', pa.string()),  # JSON text of the source's other fields
  ], metadata=metadata)


FAILURES_SCHEMA = pa.schema([
    pa.field('key', pa.string(), nullable=False),
    pa.field('uri', pa.string(), nullable=False),
    pa.field('stage', pa.string(), nullable=False),
    pa.field('error', pa.string(), nullable=False),
    pa.field('message', pa.string(), nullable=False),
    pa.field('model', pa.string()),
])

INDEX_IDS_SCHEMA = pa.schema([
    pa.field('key', pa.string(), nullable=False),
    pa.field('uri', pa.string(), nullable=False),
])


def embeddings_table(embeddings, dim):
  """A list of schemas.records.Embedding -> one Arrow table of the embeddings schema."""
  vectors = np.stack([e.vector for e in embeddings]).astype(np.float32, copy=False)
  images = [e.image for e in embeddings]
  flat = pa.array(vectors.reshape(-1), type=pa.float32())
  columns = {
      'key': pa.array([i.key for i in images], pa.string()),
      'uri': pa.array([i.uri for i in images], pa.string()),
      'model': pa.array([e.model for e in embeddings], pa.string()),
      'embedding': pa.FixedSizeListArray.from_arrays(flat, dim),
      'width': pa.array([i.width for i in images], pa.int32()),
      'height': pa.array([i.height for i in images], pa.int32()),
      'sha256': pa.array([i.sha256 for i in images], pa.string()),
      'file_size': pa.array([i.file_size for i in images], pa.int64()),
      'file_modified': pa.array([i.file_modified for i in images], pa.float64()),
      'label': pa.array([i.label for i in images], pa.string()),
      'metadata': pa.array([i.metadata for i in images], pa.string()),
  }
  schema = embeddings_schema(dim)
  return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def failures_table(failures):
  """A list of schemas.records.FailureRecord -> one Arrow table of the failures schema."""
  return pa.Table.from_pylist([f._asdict() for f in failures], schema=FAILURES_SCHEMA)


def read_json(path):
  with FileSystems.open(path) as f:
    return json.loads(f.read().decode('utf-8'))


def write_bytes_atomically(path, data, mime_type='application/octet-stream'):
  """Writes to a temporary name beside the target, then renames: a reader never sees a
  half-written file."""
  write_atomically(path, lambda f: f.write(data), mime_type)


def write_atomically(path, write, mime_type='application/octet-stream'):
  """Like write_bytes_atomically, for data streamed by write(file) (e.g. a large index,
  which then never sits in memory twice)."""
  temporary = path + TEMPORARY_SUFFIX
  with FileSystems.create(temporary, mime_type=mime_type) as f:
    write(f)
  move_into_place(temporary, path)


def copy_into_place(source, path):
  """Copies a finished file onto `path` atomically (on Cloud Storage without the data
  passing through this process); returns its size in bytes."""
  size = FileSystems.match([source])[0].metadata_list[0].size_in_bytes
  temporary = path + TEMPORARY_SUFFIX
  FileSystems.copy([source], [temporary])
  move_into_place(temporary, path)
  return size


def move_into_place(source, path):
  """Moves a finished file onto `path`."""
  try:
    # Replaces the target in one step where the filesystem can (a local rename, a GCS
    # copy): deleting it first would leave a moment with no file, and a finished run
    # without its manifest if the process died then.
    FileSystems.rename([source], [path])
  except Exception:  # pylint: disable=broad-except
    # Beam deletes a local folder with everything below it: only a file may be replaced.
    if not FileSystems.exists(path) or is_local_folder(path):
      raise
    FileSystems.delete([path])  # a filesystem that refuses to rename onto a file
    FileSystems.rename([source], [path])


def is_local_folder(path):
  """Whether path names a folder on this machine (object stores have no folders to
  name: a gs:// path is a file or nothing)."""
  return '://' not in path and os.path.isdir(path)


def write_json(path, value):
  """Writes JSON atomically through Beam's filesystems (local, gs://, ...)."""
  write_bytes_atomically(path, json.dumps(value, indent=2, sort_keys=True).encode('utf-8'),
                         mime_type='application/json')


def write_parquet(path, table, row_group_size=None):
  sink = pa.BufferOutputStream()
  pq.write_table(table, sink, row_group_size=row_group_size)
  write_bytes_atomically(path, sink.getvalue().to_pybytes())


def read_parquet(paths, columns=None, filters=None):
  """Reads Parquet files through Beam's filesystems into one Arrow table."""
  tables = []
  for path in paths:
    with FileSystems.open(path) as f:
      tables.append(pq.read_table(f, columns=columns, filters=filters))
  return pa.concat_tables(tables) if tables else None


def read_present_columns(path, columns):
  """Those of the given columns that one Parquet file has (parts written by an earlier
  version lack the newer columns), as an Arrow table."""
  with FileSystems.open(path) as f:
    parquet = pq.ParquetFile(f)
    return parquet.read(columns=[c for c in columns if c in parquet.schema_arrow.names])


def part_writer(sink, schema):
  """A Parquet writer for an embeddings or failures part, whether the write stage makes
  it or a resume rewrites it: Snappy, dictionary encoding only where values repeat, and
  nested types named as Beam's own Parquet sink names them, so every part reads alike."""
  return pq.ParquetWriter(
      sink, schema, compression='snappy', use_compliant_nested_type=False,
      use_dictionary=[name for name in schema.names if name not in PLAIN_COLUMNS])


# Where a row's image is and its file's size and time as listed: what a resume updates
# when it finds the same bytes elsewhere or under a new time.
SOURCE_COLUMNS = ('uri', 'file_size', 'file_modified')


def _schema_with_source_columns(schema):
  """An embeddings part's schema with the SOURCE_COLUMNS that parts written before they
  existed lack, each put where embeddings_schema has it (the metadata is kept)."""
  current = embeddings_schema(schema.field('embedding').type.list_size)
  for name in SOURCE_COLUMNS:
    if name not in schema.names:
      before = current.names[current.get_field_index(name) - 1]
      schema = schema.insert(schema.get_field_index(before) + 1, current.field(name))
  return schema


def update_rows(path, drop_keys=(), new_sources=None):
  """Rewrites an embeddings Parquet file without its rows whose key is in drop_keys, and
  with the SOURCE_COLUMNS of the rows whose key is in new_sources ({key: (uri,
  file_size, file_modified)}) replaced, a row group at a time, with its schema and
  metadata; the new file replaces the old in one step, so a reader sees all the old rows
  or all the new ones. A part written before the file columns existed gets them (null
  but for the rows given a size and time), so that the next resume need not read those
  files again and the output's parts share one schema. Returns (rows dropped, rows
  updated); the file is left alone when both are 0."""
  drop_keys = pa.array(sorted(set(drop_keys)), pa.string())
  new_sources = new_sources or {}

  def changes(table):
    """(rows dropped, rows updated, the rows kept with their new source columns)."""
    dropped = pc.is_in(table.column('key'), value_set=drop_keys)
    kept = table.filter(pc.invert(dropped))
    keys = kept.column('key').to_pylist()
    updated = np.zeros(len(keys), bool)
    for position, name in enumerate(SOURCE_COLUMNS):
      if name not in kept.column_names:  # a part written before it existed
        field = embeddings_schema(1).field(name)
        kept = kept.append_column(field, pa.nulls(kept.num_rows, field.type))
      at = kept.schema.get_field_index(name)
      old = kept.column(at).to_pylist()
      new = [new_sources[key][position] if key in new_sources else value
             for key, value in zip(keys, old)]
      updated |= np.array([a != b for a, b in zip(old, new)], bool)
      kept = kept.set_column(at, kept.schema.field(at),
                             pa.array(new, kept.schema.field(at).type))
    return pc.sum(dropped).as_py() or 0, int(updated.sum()), kept

  dropped, updated, _ = changes(read_present_columns(path, ('key',) + SOURCE_COLUMNS))
  if not dropped and not updated:
    return 0, 0

  def write(target):
    with FileSystems.open(path) as source:
      parquet = pq.ParquetFile(source)
      schema = _schema_with_source_columns(parquet.schema_arrow)
      with part_writer(target, schema) as writer:
        for group in range(parquet.num_row_groups):
          writer.write_table(changes(parquet.read_row_group(group))[2].select(schema.names))

  write_atomically(path, write)
  return dropped, updated


def parquet_embeddings_info(path):
  """(vector length, record of the model that wrote it or None) of an embeddings
  Parquet file, from its schema alone. Parts written before the record existed have
  none."""
  with FileSystems.open(path) as f:
    schema = pq.read_schema(f)
  record = (schema.metadata or {}).get(MODEL_METADATA_KEY)
  return schema.field('embedding').type.list_size, json.loads(record) if record else None


def read_parquet_sample(paths, columns, limit):
  """Up to `limit` rows, taken evenly from the start of each file (whole record batches,
  so a large run is not read in full)."""
  tables = []
  per_file = math.ceil(limit / max(len(paths), 1))
  for path in paths:
    with FileSystems.open(path) as f:
      batches, rows = [], 0
      for batch in pq.ParquetFile(f).iter_batches(batch_size=1024, columns=columns):
        batches.append(batch)
        rows += batch.num_rows
        if rows >= per_file:
          break
      if batches:
        tables.append(pa.Table.from_batches(batches).slice(0, per_file))
  return pa.concat_tables(tables) if tables else None


def index_build_path(out_dir, model_name, name):
  """A temporary file of a model's index build (see INDEX_BUILD_PREFIX)."""
  return output_path(model_dir(out_dir, model_name), INDEX_BUILD_PREFIX + name)


def matching_paths(pattern):
  """Sorted paths matching a glob on any Beam filesystem ([] when none)."""
  result = FileSystems.match([pattern])[0]
  return sorted(m.path for m in result.metadata_list)
