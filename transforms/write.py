"""Write stage: Embeddings and FailureRecords -> sharded Parquet files under OUT/."""

import apache_beam as beam
from apache_beam.io.filebasedsink import FileBasedSink
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.iobase import Write

from schemas import outputs

# Rows per Arrow table handed to the Parquet sink; each becomes one row group. Batches
# are held until full (a bundle's last one excepted): Beam's adaptive sizes, from 1 row
# up, made groups of 1-190 rows, 22% larger files, and more to read per row.
ROWS_PER_ROW_GROUP = 2048


class ParquetPartSink(FileBasedSink):
  """Arrow tables -> Parquet part files (outputs.part_writer), one row group per table,
  as Beam's WriteToParquetBatched writes them but with dictionary encoding only where
  values repeat. Beam names, finalizes and shards the parts (FileBasedSink)."""

  def __init__(self, prefix, schema, run_tag=None):
    super().__init__(prefix, coder=None, file_name_suffix=outputs.PARQUET_SUFFIX,
                     shard_name_template=outputs.part_shard_template(run_tag),
                     mime_type='application/x-parquet',
                     compression_type=CompressionTypes.UNCOMPRESSED)
    self._schema = schema

  def open(self, temp_path):
    handle = super().open(temp_path)
    return handle, outputs.part_writer(handle, self._schema)

  def write_record(self, file_handle, value):
    file_handle[1].write_table(value)

  def close(self, file_handle):
    handle, writer = file_handle
    writer.close()
    handle.close()


def _write_batched(rows, prefix, schema, to_table, run_tag=None):
  return (
      rows
      | 'Batch' >> beam.BatchElements(min_batch_size=ROWS_PER_ROW_GROUP,
                                      max_batch_size=ROWS_PER_ROW_GROUP)
      | 'ToArrow' >> beam.Map(to_table)
      | 'Parquet' >> Write(ParquetPartSink(prefix, schema, run_tag)))


class WriteEmbeddings(beam.PTransform):
  """Embeddings of one model -> OUT/<model>/embeddings/part-*.parquet; outputs the
  written file paths once they are final."""

  def __init__(self, out_dir, model_name, dim, run_tag=None, model_record=None):
    super().__init__()
    self._prefix = outputs.embeddings_prefix(out_dir, model_name)
    self._dim = dim
    self._run_tag = run_tag
    self._model_record = model_record  # written into every part's schema metadata

  def expand(self, embeddings):
    dim = self._dim
    return _write_batched(embeddings, self._prefix,
                          outputs.embeddings_schema(dim, self._model_record),
                          lambda batch: outputs.embeddings_table(batch, dim), self._run_tag)


class WriteFailures(beam.PTransform):
  """FailureRecords -> OUT/failures/part-*.parquet; outputs the written file paths."""

  def __init__(self, out_dir, run_tag=None):
    super().__init__()
    self._prefix = outputs.failures_prefix(out_dir)
    self._run_tag = run_tag

  def expand(self, failures):
    return _write_batched(failures, self._prefix, outputs.FAILURES_SCHEMA,
                          outputs.failures_table, self._run_tag)
