"""The job's command line: our flags, their checks, and the Beam options passed through."""

import argparse
import difflib
import os
import re
import sys
import time

from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

from pipeline.graph import IndexOnlyConfig, JobConfig
from pipeline.probe_cache import probe_models_remembered
from pipeline.reachability import UnreachableError, check_cloud_storage_reachable
from pipeline.registry import DEFAULT_MODEL, SEED_MODELS, ModelSpecError, parse_model_specs
from pipeline.resume import (OutputDirError, check_every_model_resumed, check_not_being_written,
                             check_output_dir, resume_state, resumed_keys_root)
from pipeline.runners import (RunnerUsageError, check_cloud_storage_locations, with_dry_run,
                              with_local_defaults, with_local_worker_plugin,
                              with_project_shipped)
from schemas import outputs
from schemas.records import utf8_text
from transforms.decode import MAX_IMAGE_PIXELS
from transforms.embed import DEFAULT_BATCH_SIZE
from transforms.index import AUTO, MIN_MEMORY_BUDGET, check_factory, training_minimum
from transforms.models import ModelUnavailableError
from transforms.read import (INPUT_FORMATS, common_root, folder_as_pattern, holds_shards,
                             match_pattern, normalize_pattern, other_case_matches)


class UsageError(ValueError):
  """A command-line mistake, reported as one line before any work starts."""


class OneLineErrorParser(argparse.ArgumentParser):
  """Reports a mistake as one line on stderr and exit status 2, without the usage block
  (the line itself says what to change; --help lists every flag)."""

  def error(self, message):
    self.exit(2, '%s: error: %s\n' % (self.prog, message))


def whole_number(minimum, example):
  """argparse type: an integer of at least `minimum`, with an example when it is not."""
  def parse(text):
    try:
      value = int(text)
    except ValueError:
      value = None
    if value is None or value < minimum:
      raise argparse.ArgumentTypeError(
          'expected a whole number of at least %d, got %r (example: %s)'
          % (minimum, text, example))
    return value
  return parse


DEFAULT_PROGRESS_SECONDS = 30


def build_parser():
  parser = OneLineErrorParser(
      prog='run_pipeline.py', allow_abbrev=False,
      description='Embed images with MobileNet feature-vector models on Apache Beam, '
                  'write the embeddings to Parquet and build a FAISS index. Every '
                  'standard Beam pipeline option (--runner, --direct_num_workers, '
                  '--project, ...) is accepted too.')
  group = parser.add_argument_group('image-embedding options')
  group.add_argument(
      '--input', action='append', metavar='PATTERN',
      help="glob pattern of input files on any Beam filesystem; may repeat (required, "
           "no default, unless --index_only). Example: --input 'photos/**/*.jpg' --input "
           "'gs://bucket/shards/*.tar'")
  group.add_argument(
      '--input_format', choices=INPUT_FORMATS, default='auto',
      help='files (one image per file), tfrecord (tf.train.Example with image/encoded), '
           'webdataset (img2dataset tar shards), or auto by file extension '
           '(default: %(default)s). Example: --input_format webdataset')
  group.add_argument('--output', metavar='DIR',
                     help='output directory, local or gs:// (required, no default). '
                          'Example: --output out/')
  group.add_argument(
      '--model', action='append', metavar='SPEC',
      help='a registry name (%s) or NAME=HANDLE, HANDLE being a hub URL, a SavedModel '
           'directory or a .tflite file, optionally followed by #TENSOR (TFLite); may '
           'repeat (default: %s). Example: --model v1=/models/v1_050_160'
           % (', '.join(sorted(SEED_MODELS)), DEFAULT_MODEL))
  group.add_argument('--batch_size', type=whole_number(1, '--batch_size 32'),
                     default=DEFAULT_BATCH_SIZE, metavar='N',
                     help='images per model call (default: %(default)s); a worker\'s '
                          'memory grows with it. Example: --batch_size 32')
  group.add_argument('--intra_op_threads', type=whole_number(1, '--intra_op_threads 1'),
                     default=None, metavar='N',
                     help='TensorFlow/TFLite threads per worker process (default: for '
                          'local multi-process runs the cores shared out among the worker '
                          "processes, otherwise the library's own choice). "
                          'Example: --intra_op_threads 1')
  group.add_argument(
      '--no_freeze_weights', action='store_true',
      help='run SavedModels with their variables as loaded, not made constants: about '
           'half the memory per worker process, and slower (v2_130_224 at batch 8: about '
           '645 MiB frozen, 290 MiB not; see README, Memory per worker) (default: '
           'frozen). '
           'Example: --no_freeze_weights')
  group.add_argument(
      '--max_image_pixels', type=whole_number(1, '--max_image_pixels 300000000'),
      default=MAX_IMAGE_PIXELS, metavar='N',
      help='largest image that is decoded, in pixels (a JPEG counts its reduced-size '
           'decode); a larger one becomes a decode failure, as a possible decompression '
           "bomb (default: %(default)s, Pillow's limit). Raise it for big scans: a worker "
           'process holds about 5 bytes per pixel while it decodes one (20 with '
           'transparency). '
           'Example: --max_image_pixels 300000000')
  add_output_dir_flags(group)
  group.add_argument(
      '--progress_seconds', type=whole_number(0, '--progress_seconds 10'),
      default=DEFAULT_PROGRESS_SECONDS, metavar='S',
      help='seconds between progress lines when stderr is not a terminal; on a terminal '
           'the line is redrawn every 2 seconds; 0 turns progress off (default: '
           '%(default)s). Example: --progress_seconds 10')
  group.add_argument('--no_report', action='store_true',
                     help='do not write OUT/report.html at the end (default: write it). '
                          'Example: --no_report')
  group.add_argument(
      '--dry_run', nargs='?', const=True, default=False, type=_true_or_false,
      metavar='True|False',
      help='with --runner DataflowRunner: build the complete Dataflow job, then stop '
           'without staging or submitting anything (default: off). Example: --dry_run '
           '--no_auth (offline)')
  add_index_flags(parser)
  return parser


def _true_or_false(text):
  # Beam's own --dry_run takes any string, so that "--dry_run=False" would mean True.
  if text.lower() in ('true', 'false'):
    return text.lower() == 'true'
  raise argparse.ArgumentTypeError('expected True or False, not %r' % text)


def add_output_dir_flags(group):
  group.add_argument(
      '--resume', action='store_true',
      help='continue an interrupted or completed run in --output: embed only the inputs '
           'that have no embedding in its completed files or changed since, remove the '
           'rows of inputs gone, retry its failures, and rebuild the indexes and '
           'manifest over everything (default: off). '
           'Example: --resume')
  group.add_argument(
      '--resume_checksum', action='store_true',
      help='with --resume: also read the image files unchanged in size and modification '
           'time since they were embedded (which --resume alone trusts, as rsync does) '
           'and compare their SHA-256, to find a file rewritten with its old size and '
           'time (default: off). Example: --resume_checksum --resume')
  group.add_argument(
      '--overwrite', action='store_true',
      help='delete the earlier run in --output first (without --resume or --overwrite, '
           'an --output holding a run is refused; default: off). Example: --overwrite')


def _beam_parser():
  """A parser of every Beam pipeline option, reporting a mistake as a UsageError."""

  class Parser(_BeamArgumentParser):

    def error(self, message):
      raise UsageError(message)

  parser = Parser(allow_abbrev=False)
  classes = {}
  for cls in PipelineOptions.__subclasses__():
    classes.setdefault(str(cls), cls)  # the same class can be listed twice
  for cls in classes.values():
    cls._add_argparse_args(parser)  # pylint: disable=protected-access
  return parser


def _option_names(parser):
  return [name for action in parser._actions  # pylint: disable=protected-access
          for name in action.option_strings if name.startswith('--')]


def check_beam_args(beam_args, our_parser):
  """Beam's options, checked the way Beam parses them. Beam itself drops an unknown or
  misspelled flag with a warning and runs on without it, and reports a bad value with a
  page of usage text; here both become one UsageError."""
  parser = _beam_parser()
  known, unknown = parser.parse_known_args(beam_args)
  if unknown:
    flag = next((arg for arg in unknown if arg.startswith('-')), unknown[0])
    if not flag.startswith('-'):
      raise UsageError('unexpected argument %r: quote glob patterns so that the shell '
                       "does not expand them (--input 'photos/*.jpg'), and give each "
                       'value after its flag' % flag)
    name = flag.split('=', 1)[0]
    # Compared without their dashes, which every flag shares ('--k' is not '--gbek').
    close = difflib.get_close_matches(
        name.lstrip('-'), [option[2:] for option in _option_names(our_parser)
                           + _option_names(parser)], n=1)
    raise UsageError('unknown flag %s%s (run_pipeline.py --help lists ours; every '
                     'standard Beam pipeline option is accepted too)'
                     % (name, ': did you mean --%s?' % close[0] if close else ''))
  if known.runner:
    from apache_beam.runners.runner import create_runner  # pylint: disable=import-outside-toplevel
    try:
      create_runner(known.runner)
    except (ValueError, ImportError) as e:
      raise UsageError('--runner %s: %s' % (known.runner, e)) from e


def _check_utf8_name(flag, path):
  """Refuses a path whose name is not UTF-8 (bytes of a Latin-1 name): Beam's coders take
  text as UTF-8 and would fail while building the job. Files below a folder given (and
  their names) may be anything."""
  if utf8_text(path) != path:
    raise UsageError(
        '%s %s: a name that is not UTF-8 cannot be handed to Beam, whose coders take UTF-8 '
        'text; rename it to UTF-8 (convmv does that)%s'
        % (flag, utf8_text(path), ', or give a folder above it (names below it may be '
           'anything)' if flag == '--input' else ''))


def _check_output_name(out_dir):
  _check_utf8_name('--output', out_dir)
  refusal = outputs.glob_characters_refusal(out_dir)
  if refusal:
    raise UsageError('--output ' + refusal)


def check_output(out_dir):
  """A local --output must be (or become) a directory this user can write to. Remote
  outputs (gs://) are checked by the first write, since probing one needs credentials
  that a dry run does not have."""
  _check_output_name(out_dir)
  if '://' in out_dir:
    return
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise UsageError('--output %s is a file, not a directory: give a directory path'
                     % out_dir)
  existing = out_dir
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UsageError('--output %s cannot be created: %s is a file' % (out_dir, existing))
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UsageError('--output %s cannot be written: no write permission on %s; choose '
                     'a directory you can write to' % (out_dir, existing))


def add_index_flags(parser):
  group = parser.add_argument_group('index options')
  group.add_argument(
      '--index_type', metavar='auto|FACTORY',
      help="'auto' chooses the FAISS index from the number of vectors, the dimension and "
           "--index_memory_budget; or any FAISS factory string (default: auto; with "
           "--resume, the one the run was last built with). "
           "Example: --index_type 'IVF1024,PQ32'")
  group.add_argument(
      '--index_memory_budget', default='4GB', type=parse_bytes, metavar='SIZE',
      help='memory the index build may use, and the filled index at most 60%% of it '
           '(default: 4GB). Example: --index_memory_budget 512MB')
  group.add_argument(
      '--index_only', action='store_true',
      help='rebuild the indexes of the finished run in --output from its Parquet, '
           'without decoding or embedding (default: off). '
           'Example: --index_only --output out/')


_SIZE_UNITS = {'': 1, 'B': 1, 'K': 2**10, 'KB': 2**10, 'M': 2**20, 'MB': 2**20,
               'G': 2**30, 'GB': 2**30, 'T': 2**40, 'TB': 2**40}


def parse_bytes(text):
  """'4GB', '512M', '1.5G' or a plain number of bytes -> bytes (units of 1024)."""
  match = re.fullmatch(r'\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*', text)
  if not match or match.group(2).upper() not in _SIZE_UNITS:
    raise argparse.ArgumentTypeError('not a size: %r (examples: 4GB, 512MB)' % text)
  return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def _check_memory_budget(args):
  if args.index_memory_budget < MIN_MEMORY_BUDGET:
    raise UsageError('--index_memory_budget must be at least %dMB'
                     % (MIN_MEMORY_BUDGET // 2**20))


def _choose_index_type(args, earlier_manifest=None):
  """Sets args.index_type when the flag was left out: the factory string a resumed run
  was last built with, when it was given then (a resume that chose again would undo an
  --index_only rebuild without a word), else auto."""
  if args.index_type is not None:
    return
  earlier = earlier_manifest or {}
  chosen = ((earlier.get('index_rebuilt') or {}).get('options') or {}).get('index_type') or (
      earlier.get('options') or {}).get('index_type') or AUTO
  args.index_type = chosen
  if chosen != AUTO:
    print('run_pipeline.py: note: --resume keeps the index type the run was built with, '
          '%s (--index_type auto chooses again)' % chosen, file=sys.stderr)


def _check_index_type(args, dims, vector_counts=None, counted='its embeddings'):
  """vector_counts: {model name: (dim, the most vectors its index can get)}, when known
  at launch: an index type that cannot be trained on so few stops the job now, not
  after every image is embedded."""
  if args.index_type != AUTO:
    for dim in sorted(set(dims)):
      try:
        check_factory(args.index_type, dim)
      except ValueError as e:
        raise UsageError('--index_type %s' % e) from e
    for name, (dim, count) in sorted((vector_counts or {}).items()):
      needed = training_minimum(args.index_type, dim)
      if count < needed:
        raise UsageError(
            '--index_type %s needs at least %d vectors to train, and model %s can have %d '
            '(%s); use --index_type auto, or fewer lists, codes or PCA dimensions' % (
                args.index_type, needed, name, count, counted))


def make_index_only_config(args):
  """Parsed flags with --index_only -> IndexOnlyConfig of the finished run in --output.
  Raises UsageError."""
  if args.input:
    raise UsageError('--index_only rebuilds the indexes of --output; it takes no --input')
  output_dir_flags = [flag for flag, given in (('--resume', args.resume),
                                               ('--resume_checksum', args.resume_checksum),
                                               ('--overwrite', args.overwrite)) if given]
  if output_dir_flags:
    raise UsageError('--index_only rebuilds the indexes of the finished run in --output, '
                     'changing nothing else; it takes no %s' % output_dir_flags[0])
  _check_memory_budget(args)
  _choose_index_type(args)
  out_dir = normalize_pattern(args.output)
  _check_output_name(out_dir)
  _check_reachable([('--output', out_dir)])
  try:
    check_not_being_written(out_dir)
  except OutputDirError as e:
    raise UsageError(str(e)) from e
  manifest_path = outputs.output_path(out_dir, outputs.MANIFEST_FILE)
  if not outputs.FileSystems.exists(manifest_path):
    raise UsageError('--output %s holds no finished run (no %s)'
                     % (args.output, outputs.MANIFEST_FILE))
  manifest = outputs.read_json(manifest_path)
  models = manifest['models']
  if args.model:
    chosen = {spec.split('=', 1)[0] for spec in args.model}
    unknown = sorted(chosen - {m['name'] for m in models})
    if unknown:
      raise UsageError('the run has no model %s (it has: %s)' % (
          ', '.join(unknown), ', '.join(m['name'] for m in models)))
    models = [m for m in models if m['name'] in chosen]
  embedded = manifest.get('counts', {}).get('models', {})
  _check_index_type(args, [m['dim'] for m in models],
                    {m['name']: (m['dim'], embedded[m['name']]['embedded']) for m in models
                     if 'embedded' in embedded.get(m['name'], {})})
  return IndexOnlyConfig(out_dir=out_dir, model_names=tuple(m['name'] for m in models),
                         index_type=args.index_type,
                         index_memory_budget=args.index_memory_budget,
                         options={k: v for k, v in vars(args).items()})


# Files the launcher lists per --input pattern: enough to see that it matches and whether
# it matches shards, without listing millions of objects (and holding their names) before
# a Dataflow job is even submitted; the workers list everything.
LISTED_AT_LAUNCH = 10000


def _why_nothing(pattern):
  """What to add when a pattern matches no input: that it matched only the output, or
  files in another letter case."""
  if match_pattern(pattern, 1):
    return ' outside --output'
  others = other_case_matches(pattern)
  if others:
    return (' (patterns are case-sensitive: %s would match in another letter case)'
            % ', '.join(others))
  if '[' in pattern:
    return (" ('[...]' in a pattern matches one of the characters inside; to match a '['"
            " in a name, write '[[]', as in 'photos [[]2019]/**/*.jpg')")
  return ''


def _check_patterns(given, patterns, out_dir):
  """Lists the patterns (as given, and as they will be matched), leaving out the output
  folder; returns the paths listed, up to LISTED_AT_LAUNCH per pattern."""
  paths = []
  for given_pattern, pattern in zip(given, patterns):
    matched = match_pattern(pattern, LISTED_AT_LAUNCH, excluded=out_dir)
    if not matched:
      raise UsageError('--input %s matches no files%s' % (given_pattern,
                                                          _why_nothing(pattern)))
    paths.extend(metadata.path for metadata in matched)
  return paths


def _parsed_models(args):
  """The --model flags as ModelSpecs, local handles made absolute (workers and the query
  script run elsewhere)."""
  try:
    return [spec._replace(handle=normalize_pattern(spec.handle),
                          freeze_weights=not args.no_freeze_weights)
            for spec in parse_model_specs(args.model)]
  except ModelSpecError as e:
    raise UsageError(str(e)) from e


def _check_reachable(flagged_paths):
  try:
    check_cloud_storage_reachable(flagged_paths, 'run_pipeline.py')
  except UnreachableError as e:
    raise UsageError(str(e)) from e


def make_config(args, probe_in_subprocess=False):
  """Parsed flags -> JobConfig; checks inputs and loads every model once, so that any
  mistake stops the job before work starts. Raises UsageError."""
  if args.resume_checksum and not args.resume:
    raise UsageError('--resume_checksum applies to --resume only')
  _check_memory_budget(args)
  out_dir = normalize_pattern(args.output)
  check_output(out_dir)
  inputs = [normalize_pattern(given) for given in args.input]
  for path in inputs:
    _check_utf8_name('--input', path)
  given = _parsed_models(args)
  _check_reachable([('--input', path) for path in inputs] + [('--output', out_dir)]
                   + [('--model', spec.handle) for spec in given])
  try:
    patterns = [folder_as_pattern(path) for path in inputs]
    matched = _check_patterns(args.input, patterns, out_dir)
  except UsageError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise UsageError('cannot list --input: %s' % e) from e
  try:
    check_output_dir(out_dir, args.resume, args.overwrite)
  except OutputDirError as e:
    raise UsageError(str(e)) from e
  earlier_manifest = outputs.output_path(out_dir, outputs.MANIFEST_FILE)
  _choose_index_type(args, outputs.read_json(earlier_manifest) if args.resume and (
      outputs.FileSystems.exists(earlier_manifest)) else None)
  try:
    if args.resume:
      check_every_model_resumed(out_dir, [spec.name for spec in given])
    specs = probe_models_remembered(given, probe_in_subprocess)
  except (ModelUnavailableError, OutputDirError) as e:
    raise UsageError(str(e)) from e
  try:
    resume = resume_state(out_dir, specs) if args.resume else None
    root = resumed_keys_root(resume, common_root(patterns), patterns, args.input)
  except OutputDirError as e:
    raise UsageError(str(e)) from e
  shards = holds_shards(matched, args.input_format)
  # Each file is one image at most: the listing bounds the vectors, unless it was cut
  # short, holds shards, or a resumed run keeps earlier rows.
  bounded = not (args.resume or shards or len(matched) >= LISTED_AT_LAUNCH)
  _check_index_type(args, [spec.dim for spec in specs],
                    {spec.name: (spec.dim, len(matched)) for spec in specs}
                    if bounded else None, 'the files --input matches')
  return JobConfig(
      patterns=tuple(patterns), input_format=args.input_format,
      root=root, out_dir=out_dir, models=tuple(specs),
      batch_size=args.batch_size, intra_op_threads=args.intra_op_threads,
      max_image_pixels=args.max_image_pixels,
      options={k: v for k, v in vars(args).items()}, started_at=outputs.utc_now(),
      started_unix=time.time(), resume=resume, trust_file_times=not args.resume_checksum,
      index_type=args.index_type, index_memory_budget=args.index_memory_budget,
      # The listing above already says whether a shuffle of every image's bytes is
      # needed: only shards hold many images per matched file. A pattern matching more
      # files than were listed is judged by the first ones.
      spread_records=shards)


def parse_command_line(argv):
  """argv -> (parsed flags of ours, Beam PipelineOptions of the rest)."""
  parser = build_parser()
  args, beam_args = parser.parse_known_args(argv)
  missing = [flag for flag, given in (('--input', args.input or args.index_only),
                                      ('--output', args.output)) if not given]
  if missing:
    # Both at once: a first run without flags should not learn them one at a time.
    parser.error("the following arguments are required: %s (example: --input "
                 "'photos/**/*.jpg' --output out/; --help lists every flag)"
                 % ', '.join(missing))
  try:
    check_beam_args(beam_args, parser)
    check_cloud_storage_locations(beam_args)
    beam_args = with_project_shipped(beam_args)
    if args.dry_run:
      beam_args = with_dry_run(beam_args)
  except (UsageError, RunnerUsageError) as e:
    parser.error(str(e))
  return parser, args, PipelineOptions(with_local_worker_plugin(with_local_defaults(beam_args)))


def quiet_tensorflow():
  # Set before TensorFlow is imported anywhere; inherited by local worker processes.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
