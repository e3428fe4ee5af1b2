"""Write stage: embedding and failure parts, their rows and row groups."""

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions

from schemas import outputs
from schemas.records import STAGE_DECODE, DecodedImage, Embedding, FailureRecord
from transforms.write import ROWS_PER_ROW_GROUP, WriteEmbeddings, WriteFailures

DIM = 8


def _embedding(number):
  image = DecodedImage(key='img%05d.jpg' % number, uri='/photos/img%05d.jpg' % number,
                       width=640, height=480, sha256='%064x' % number, pixels=None)
  return Embedding(image=image, model='m',
                   vector=np.full(DIM, number, dtype=np.float32))


def _row_groups(paths):
  return [[pq.ParquetFile(path).metadata.row_group(i).num_rows
           for i in range(pq.ParquetFile(path).metadata.num_row_groups)] for path in paths]


def test_parts_hold_every_row_in_full_row_groups(tmp_path):
  count = 2 * ROWS_PER_ROW_GROUP + 500
  options = PipelineOptions(['--direct_running_mode', 'in_memory'])
  with beam.Pipeline(options=options) as pipeline:
    embeddings = pipeline | 'Embeddings' >> beam.Create(
        [_embedding(n) for n in range(count)])
    _ = embeddings | WriteEmbeddings(str(tmp_path), 'm', DIM)
    _ = (embeddings
         | beam.Map(lambda e: FailureRecord(key=e.image.key, uri=e.image.uri,
                                            stage=STAGE_DECODE, error='ValueError',
                                            message='broken'))
         | WriteFailures(str(tmp_path)))
  for glob in (outputs.embeddings_glob(str(tmp_path), 'm'),
               outputs.failures_glob(str(tmp_path))):
    paths = outputs.matching_paths(glob)
    table = outputs.read_parquet(paths)
    assert sorted(table.column('key').to_pylist()) == [
        'img%05d.jpg' % n for n in range(count)]
    # Row groups of ROWS_PER_ROW_GROUP rows, but for each file's last one: readers pay
    # per row group, and small ones compress worse.
    for groups in _row_groups(paths):
      assert all(rows == ROWS_PER_ROW_GROUP for rows in groups[:-1]), groups
      assert 0 < groups[-1] <= ROWS_PER_ROW_GROUP
  vectors = outputs.read_parquet(outputs.matching_paths(
      outputs.embeddings_glob(str(tmp_path), 'm')))
  rows = {key: vector for key, vector in zip(vectors.column('key').to_pylist(),
                                              vectors.column('embedding').to_pylist())}
  assert rows['img00042.jpg'] == [42.0] * DIM


def _assert_written_as_a_part(path, rows):
  metadata = pq.ParquetFile(path).metadata
  columns = {metadata.row_group(0).column(i).path_in_schema.split('.')[0]:
             metadata.row_group(0).column(i) for i in range(metadata.num_columns)}
  assert not columns['embedding'].has_dictionary_page
  assert columns['model'].has_dictionary_page and columns['key'].has_dictionary_page
  assert columns['embedding'].compression == 'SNAPPY'
  table = pq.read_table(path)
  assert table.schema.equals(outputs.embeddings_schema(DIM), check_metadata=False)
  assert table.num_rows == rows


def _write_one_part(out_dir, rows=300):
  """The path of the one embeddings part the write stage makes of `rows` embeddings."""
  options = PipelineOptions(['--direct_running_mode', 'in_memory'])
  with beam.Pipeline(options=options) as pipeline:
    _ = (pipeline
         | beam.Create([_embedding(n) for n in range(rows)])
         | WriteEmbeddings(str(out_dir), 'm', DIM))
  path, = outputs.matching_paths(outputs.embeddings_glob(str(out_dir), 'm'))
  return path


def test_vectors_are_written_without_a_dictionary(tmp_path):
  # Feature vectors rarely repeat a float, so a dictionary per row group only grew the
  # files; the string columns keep theirs (one model name for every row).
  path = _write_one_part(tmp_path)
  _assert_written_as_a_part(path, 300)
  # A resume that drops rows rewrites the part as the write stage wrote it.
  schema = pq.read_schema(path)
  assert outputs.update_rows(path, ['img00007.jpg']) == (1, 0)
  _assert_written_as_a_part(path, 299)
  assert pq.read_schema(path).equals(schema, check_metadata=True)


def test_a_part_written_before_the_file_columns_gets_them_when_rewritten(tmp_path):
  path = _write_one_part(tmp_path)
  written = pq.read_table(path)
  pq.write_table(written.drop_columns(['file_size', 'file_modified']), path)  # as before

  assert outputs.update_rows(path, ['img00007.jpg'],
                             {'img00009.jpg': ('/moved/img00009.jpg', 1234, 56.5)}) == (1, 1)
  _assert_written_as_a_part(path, 299)
  assert pq.read_schema(path).metadata == written.schema.metadata
  rows = {row['key']: row for row in pq.read_table(path).to_pylist()}
  assert (rows['img00009.jpg']['uri'], rows['img00009.jpg']['file_size'],
          rows['img00009.jpg']['file_modified']) == ('/moved/img00009.jpg', 1234, 56.5)
  assert (rows['img00010.jpg']['uri'], rows['img00010.jpg']['file_size'],
          rows['img00010.jpg']['file_modified']) == ('/photos/img00010.jpg', None, None)
  assert rows['img00010.jpg']['embedding'] == [10.0] * DIM
