"""The job's command line: our flags, their checks, and the Beam options passed through."""

import argparse
import os

from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.graph import JobConfig, utc_now
from pipeline.registry import DEFAULT_MODEL, SEED_MODELS, ModelSpecError, parse_model_specs
from pipeline.resume import OutputDirError, check_output_dir, resume_state
from transforms.embed import DEFAULT_BATCH_SIZE
from transforms.models import ModelUnavailableError, probe_model
from transforms.read import INPUT_FORMATS, common_root, normalize_pattern


class UsageError(ValueError):
  """A command-line mistake, reported as one line before any work starts."""


def build_parser():
  parser = argparse.ArgumentParser(
      prog='run_pipeline.py',
      description='Embed images with MobileNet feature-vector models on Apache Beam, '
                  'write the embeddings to Parquet and build a FAISS index. Every '
                  'standard Beam pipeline option (--runner, --direct_num_workers, '
                  '--project, ...) is accepted too.')
  group = parser.add_argument_group('image-embedding options')
  group.add_argument(
      '--input', action='append', required=True, metavar='PATTERN',
      help="glob pattern of input files on any Beam filesystem; may repeat. "
           "Example: --input 'photos/**/*.jpg' --input 'gs://bucket/shards/*.tar'")
  group.add_argument(
      '--input_format', choices=INPUT_FORMATS, default='auto',
      help='files (one image per file), tfrecord (tf.train.Example with image/encoded), '
           'webdataset (img2dataset tar shards), or auto by file extension '
           '(default: %(default)s)')
  group.add_argument('--output', required=True, metavar='DIR',
                     help='output directory, local or gs://. Example: --output out/')
  group.add_argument(
      '--model', action='append', metavar='SPEC',
      help='a registry name (%s) or NAME=HANDLE, HANDLE being a hub URL, a SavedModel '
           'directory or a .tflite file, optionally followed by #TENSOR (TFLite); may '
           'repeat (default: %s). Example: --model v1=/models/v1_050_160'
           % (', '.join(sorted(SEED_MODELS)), DEFAULT_MODEL))
  group.add_argument('--batch_size', type=int, default=DEFAULT_BATCH_SIZE, metavar='N',
                     help='images per model call (default: %(default)s)')
  group.add_argument('--intra_op_threads', type=int, default=None, metavar='N',
                     help='TensorFlow/TFLite threads per worker process (default: the '
                          "library's own choice). Example: --intra_op_threads 1")
  add_output_dir_flags(group)
  return parser


def add_output_dir_flags(group):
  group.add_argument(
      '--resume', action='store_true',
      help='continue an interrupted or completed run in --output: embed only the inputs '
           'that have no embedding in its completed files, retry its failures, and '
           'rebuild the indexes and manifest over everything')
  group.add_argument(
      '--overwrite', action='store_true',
      help='delete the earlier run in --output first (without --resume or --overwrite, '
           'an --output holding a run is refused)')


def _check_patterns(patterns):
  for pattern, result in zip(patterns, FileSystems.match(patterns)):
    if not result.metadata_list:
      raise UsageError('--input %s matches no files' % pattern)


def make_config(args, probe=probe_model):
  """Parsed flags -> JobConfig; checks inputs and loads every model once, so that any
  mistake stops the job before work starts. Raises UsageError."""
  if args.batch_size < 1:
    raise UsageError('--batch_size must be at least 1, not %d' % args.batch_size)
  if args.intra_op_threads is not None and args.intra_op_threads < 1:
    raise UsageError('--intra_op_threads must be at least 1')
  patterns = [normalize_pattern(p) for p in args.input]
  try:
    _check_patterns(patterns)
  except UsageError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError('cannot list --input: %s' % e) from e
  out_dir = normalize_pattern(args.output)
  try:
    check_output_dir(out_dir, args.resume, args.overwrite)
  except OutputDirError as e:
    raise UsageError(str(e)) from e
  try:
    # Local handles are made absolute: workers and the query script run elsewhere.
    specs = [probe(spec._replace(handle=normalize_pattern(spec.handle)))
             for spec in parse_model_specs(args.model)]
  except (ModelSpecError, ModelUnavailableError) as e:
    raise UsageError(str(e)) from e
  try:
    resume = resume_state(out_dir, specs) if args.resume else None
  except OutputDirError as e:
    raise UsageError(str(e)) from e
  return JobConfig(
      patterns=tuple(patterns), input_format=args.input_format,
      root=common_root(patterns), out_dir=out_dir, models=tuple(specs),
      batch_size=args.batch_size, intra_op_threads=args.intra_op_threads,
      options={k: v for k, v in vars(args).items()}, started_at=utc_now(), resume=resume)


def parse_command_line(argv):
  """argv -> (parsed flags of ours, Beam PipelineOptions of the rest)."""
  parser = build_parser()
  args, beam_args = parser.parse_known_args(argv)
  return parser, args, PipelineOptions(beam_args)


def quiet_tensorflow():
  # Set before TensorFlow is imported anywhere; inherited by local worker processes.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
