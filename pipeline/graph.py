"""The Beam graph: read -> decode -> embed (per model) -> write -> index -> manifest."""

import time
from typing import NamedTuple, Optional, Tuple

import apache_beam as beam

from pipeline.resume import (FOUND_STATUSES, RESUMED, CompletedWork, delete_paths,
                             earlier_failure_files, found_fact)
from pipeline.versions import runtime_versions
from schemas import outputs
from schemas.outputs import utc_now
from transforms.decode import MAX_IMAGE_PIXELS, DecodeImages, preprocessing_record
from transforms.embed import EmbedImages
from transforms.failures import FailureReasons
from transforms.index import AUTO, DEFAULT_MEMORY_BUDGET, BuildIndex
from transforms.models import FORMAT_TFLITE
from transforms import metrics as run_metrics
from transforms.read import ReadImages
from transforms.write import WriteEmbeddings, WriteFailures


class JobConfig(NamedTuple):
  """Everything the graph needs, as plain values fixed at launch."""
  patterns: Tuple[str, ...]
  input_format: str
  root: str
  out_dir: str
  models: Tuple  # probed transforms.models.ModelSpec, dim and input_size known
  batch_size: int
  intra_op_threads: Optional[int] = None
  options: Optional[dict] = None  # the command line as the user gave it, for the manifest
  started_at: Optional[str] = None
  resume: Optional[tuple] = None  # pipeline.resume.ResumeState when resuming
  started_unix: Optional[float] = None  # time.time() at launch, for the wall time
  index_type: str = AUTO  # 'auto' or a FAISS factory string
  index_memory_budget: int = DEFAULT_MEMORY_BUDGET  # bytes
  # Whether the inputs matched at launch hold shards, whose records are then spread
  # across workers; None: decided from the patterns alone.
  spread_records: Optional[bool] = None
  max_image_pixels: int = MAX_IMAGE_PIXELS  # larger images are decode failures
  # Whether a resume takes an image file of the same size and time as unchanged, unread
  trust_file_times: bool = True


UNREAD_FACT = 'unread'  # inputs a resume found unchanged in size and time, not read


def manifest_counts(facts, model_names):
  """Per-stage counts -> the manifest's counts, where read = embedded + failed holds for
  every model by construction of the failure records, and is checked here."""
  read_failed, decode_failed = facts['read_failed'], facts['decode_failed']
  read = facts['read_ok'] + read_failed
  models = {}
  for name in model_names:
    # A resumed run counts the inputs it found already embedded as embedded.
    embedded = facts['embedded/' + name] + facts.get(found_fact(RESUMED, name), 0)
    failed = read_failed + decode_failed + facts['embed_failed/' + name]
    models[name] = {'embedded': embedded, 'failed': failed,
                    'embed_failed': facts['embed_failed/' + name]}
    for status in FOUND_STATUSES:
      if found_fact(status, name) in facts:
        models[name][status] = facts[found_fact(status, name)]
  counts = {
      'read': read, 'read_failed': read_failed, 'decode_failed': decode_failed,
      'models': models,
      'reconciled': all(m['embedded'] + m['failed'] == read for m in models.values()),
  }
  if UNREAD_FACT in facts:
    counts['unchanged_not_read'] = facts[UNREAD_FACT]  # counted in read, not read again
  return counts


def throughput(config: JobConfig, counts):
  """Wall time from launch to now, and images per second: overall (images read) and
  per model (images embedded)."""
  if config.started_unix is None:
    return None
  wall = max(time.time() - config.started_unix, 1e-3)
  return {'wall_seconds': round(wall, 3),
          'images_per_second': round(counts['read'] / wall, 3),
          'models': {name: round(model['embedded'] / wall, 3)
                     for name, model in counts['models'].items()}}


def build_manifest(config: JobConfig, facts, index_infos, failure_reasons=()):
  names = [spec.name for spec in config.models]
  counts = manifest_counts(facts, names)
  return {
      'format_version': outputs.MANIFEST_FORMAT_VERSION,
      'started_at': config.started_at,
      'completed_at': utc_now(),
      'input': {'patterns': list(config.patterns), 'format': config.input_format,
                'root': config.root},
      'models': [dict(model_record(spec),
                      embeddings=outputs.relative_embeddings_glob(spec.name),
                      index=index_infos.get(spec.name)) for spec in config.models],
      'preprocessing': preprocessing_record(config.max_image_pixels),
      'counts': counts,
      'failures_by_reason': list(failure_reasons),
      'throughput': throughput(config, counts),
      'batch_size': config.batch_size,
      'intra_op_threads': config.intra_op_threads,
      'options': config.options or {},
      'versions': runtime_versions(),
  }


def model_record(spec):
  """A probed model as the manifest describes it."""
  return {'name': spec.name, 'handle': spec.handle, 'tensor': spec.tensor,
          'format': spec.model_format, 'input_size': list(spec.input_size), 'dim': spec.dim,
          # Only a SavedModel has weights to freeze: no claim for a TFLite model.
          'freeze_weights': (None if spec.model_format == FORMAT_TFLITE
                             else spec.freeze_weights)}


def write_manifest(config: JobConfig, facts, index_infos, failure_reasons=()):
  if config.resume:
    # This run retried every earlier failure; its own failure files replace theirs.
    delete_paths(earlier_failure_files(config.out_dir, config.resume.run_tag))
  manifest = build_manifest(config, dict(facts), dict(index_infos), failure_reasons)
  outputs.write_json(outputs.output_path(config.out_dir, outputs.MANIFEST_FILE), manifest)
  return manifest


def _count(pcoll, fact, label):
  return (pcoll
          | 'Count[%s]' % label >> beam.combiners.Count.Globally()
          | 'Name[%s]' % label >> beam.Map(lambda n: (fact, n)))


def _tally(pcoll, fact, metrics, count_of, label):
  """Counts a PCollection both ways: live into the run's metrics (progress line, Beam
  counters), and exactly, as a (fact, count) pair for the manifest."""
  _ = pcoll | 'Metrics[%s]' % label >> run_metrics.CountInto(metrics, count_of)
  return _count(pcoll, fact, label)


def build_pipeline(pipeline, config: JobConfig, metrics=None):
  """Adds the whole job to `pipeline`; returns the PCollection holding the manifest.
  metrics: a transforms.metrics.RunMetrics (Beam counters, plus progress files when it
  has a folder)."""
  metrics = metrics or run_metrics.RunMetrics()
  run_tag = config.resume.run_tag if config.resume else None
  completed = CompletedWork(pipeline, config.resume, [spec.name for spec in config.models],
                            config.patterns, config.root) if config.resume else None
  read = pipeline | 'ReadImages' >> ReadImages(
      config.patterns, config.input_format, config.root, metrics, config.spread_records,
      excluded=config.out_dir,
      skip_unchanged=completed.skip_unchanged(config.input_format, metrics)
      if completed and config.trust_file_times else None)
  images = completed.skip_completed(read.images) if completed else read.images
  decoded = images | 'DecodeImages' >> DecodeImages(
      [spec.input_size for spec in config.models], config.max_image_pixels)

  failures = [read.failures, decoded.failures]
  facts = [
      _tally(read.images, 'read_ok', metrics, run_metrics.count_images_read, 'read'),
      _tally(read.failures, 'read_failed', metrics,
             run_metrics.failure_counts(run_metrics.READ_FAILED), 'read failures'),
      _tally(decoded.failures, 'decode_failed', metrics,
             run_metrics.failure_counts(run_metrics.DECODE_FAILED), 'decode failures')]
  index_infos = []
  for spec in config.models:
    to_embed = (completed.embed_input(decoded.decoded, spec.name) if completed
                else decoded.decoded)
    embedded = to_embed | 'Embed[%s]' % spec.name >> EmbedImages(
        spec, config.batch_size, config.intra_op_threads)
    # Each part names the model that wrote it, with its response to a fixed picture,
    # and the folder its keys are relative to (which a resumed run keeps).
    written = embedded['embeddings'] | 'WriteEmbeddings[%s]' % spec.name >> WriteEmbeddings(
        config.out_dir, spec.name, spec.dim, run_tag,
        dict(model_record(spec), response=list(spec.response or ()), keys_root=config.root))
    if completed:
      # The index covers the earlier attempts' parts too.
      written = ((written, completed.earlier_parts(spec.name))
                 | 'AllParts[%s]' % spec.name >> beam.Flatten())
    index_infos.append(
        written
        | 'BuildIndex[%s]' % spec.name >> BuildIndex(config.out_dir, spec.name,
                                                     config.index_type,
                                                     config.index_memory_budget)
        | 'Tag[%s]' % spec.name >> beam.Map(lambda info, name=spec.name: (name, info)))
    failures.append(embedded['failures'])
    facts.append(_tally(embedded['embeddings'], 'embedded/' + spec.name, metrics,
                        run_metrics.embedding_counts(spec.name), spec.name))
    facts.append(_tally(embedded['failures'], 'embed_failed/' + spec.name, metrics,
                        run_metrics.failure_counts(run_metrics.embed_failed_metric(spec.name)),
                        spec.name + ' failures'))

  if completed:
    facts.append(completed.found_counts())
    facts.append(_count(read.unread, UNREAD_FACT, 'unread') if read.unread is not None
                 else pipeline | 'NoneUnread' >> beam.Create([(UNREAD_FACT, 0)]))
  all_failures = failures | 'AllFailures' >> beam.Flatten()
  failure_files = all_failures | 'WriteFailures' >> WriteFailures(config.out_dir, run_tag)
  failure_reasons = all_failures | 'FailureReasons' >> beam.CombineGlobally(FailureReasons())
  all_facts = facts | 'AllCounts' >> beam.Flatten()
  all_infos = index_infos | 'AllIndexes' >> beam.Flatten()
  # Side inputs are complete before the manifest step runs, so the manifest is written
  # after every embedding, failure and index file: its presence means the run finished.
  return (
      pipeline
      | 'ManifestTrigger' >> beam.Create([None])
      | 'WriteManifest' >> beam.Map(
          lambda _, facts, infos, unused_failure_files, reasons: write_manifest(
              config, facts, infos, reasons),
          beam.pvalue.AsList(all_facts), beam.pvalue.AsList(all_infos),
          beam.pvalue.AsList(failure_files), beam.pvalue.AsSingleton(failure_reasons)))


class IndexOnlyConfig(NamedTuple):
  """What --index_only needs: a finished run and how to index it."""
  out_dir: str
  model_names: Tuple[str, ...]
  index_type: str
  index_memory_budget: int
  options: Optional[dict] = None


def refresh_manifest_indexes(out_dir, index_infos, options):
  """A finished run's manifest with the index info of the rebuilt models replaced."""
  path = outputs.output_path(out_dir, outputs.MANIFEST_FILE)
  manifest = outputs.read_json(path)
  infos = dict(index_infos)
  for model in manifest['models']:
    if model['name'] in infos:
      model['index'] = infos[model['name']]
  manifest['index_rebuilt'] = {'at': utc_now(), 'options': options or {}}
  outputs.write_json(path, manifest)
  return manifest


def build_index_only_pipeline(pipeline, config: IndexOnlyConfig):
  """Rebuilds the indexes of a finished run from its embedding Parquet (no decoding or
  embedding) through the same BuildIndex stage, then refreshes its manifest."""
  infos = []
  for name in config.model_names:
    paths = outputs.matching_paths(outputs.embeddings_glob(config.out_dir, name))
    infos.append(
        pipeline
        | 'Paths[%s]' % name >> beam.Create(paths)
        | 'BuildIndex[%s]' % name >> BuildIndex(config.out_dir, name, config.index_type,
                                                config.index_memory_budget)
        | 'Tag[%s]' % name >> beam.Map(lambda info, name=name: (name, info)))
  return (
      infos
      | 'AllIndexes' >> beam.Flatten()
      | 'AllInfos' >> beam.combiners.ToList()
      | 'RefreshManifest' >> beam.Map(
          lambda all_infos: refresh_manifest_indexes(config.out_dir, all_infos,
                                                     config.options)))
