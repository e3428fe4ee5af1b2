"""Runner choices around the job: local parallelism defaults, Dataflow dry runs, summaries."""

import os

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

# The flags with which a user takes control of how the DirectRunner runs.
DIRECT_RUNNER_FLAGS = ('--direct_num_workers', '--direct_running_mode')


class RunnerUsageError(ValueError):
  """Runner flags that do not fit together."""


def local_cores():
  """Cores this process may run on (its CPU affinity, which containers narrow)."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def short_runner_name(runner):
  """'direct', 'dataflow', 'portable', ... for a --runner value, which Beam accepts as
  'DataflowRunner', 'dataflow' or a dotted path alike; 'direct' for None, as in Beam."""
  if runner is None:
    return 'direct'
  name = runner if isinstance(runner, str) else type(runner).__name__
  name = name.rsplit('.', 1)[-1].lower()
  return name[:-len('runner')] if name.endswith('runner') else name


def runner_name(beam_args):
  """short_runner_name of the --runner among beam_args."""
  return short_runner_name(PipelineOptions(beam_args).view_as(StandardOptions).runner)


def _given(beam_args, flag):
  return any(arg == flag or arg.startswith(flag + '=') for arg in beam_args)


def with_local_defaults(beam_args):
  """beam_args, plus one DirectRunner worker process per core unless the user chose how
  the DirectRunner runs (Beam's own default is one thread in the launching process)."""
  if runner_name(beam_args) not in ('direct', 'switchingdirect') or any(
      _given(beam_args, flag) for flag in DIRECT_RUNNER_FLAGS):
    return list(beam_args)
  return list(beam_args) + ['--direct_running_mode=multi_processing',
                            '--direct_num_workers=%d' % local_cores()]


def with_dry_run(beam_args):
  """beam_args with Beam's dry-run switch, which only the DataflowRunner honours: any
  other runner would quietly run the whole job."""
  if runner_name(beam_args) != 'dataflow':
    raise RunnerUsageError('--dry_run needs --runner DataflowRunner')
  return list(beam_args) + ['--dry_run=True']


def job_stages(pipeline_proto):
  """Names of the top-level stages of a Beam pipeline proto, in graph order."""
  transforms = pipeline_proto.components.transforms
  stages = []
  for root_id in pipeline_proto.root_transform_ids:
    stages.extend(transforms[t].unique_name for t in transforms[root_id].subtransforms)
  return stages


def dry_run_summary(result):
  """One line about the Dataflow job that a dry run built and did not submit."""
  job = result.job
  return 'dry run: built Dataflow job %s (%d stages: %s); nothing was staged or submitted' % (
      job.proto.name, len(job_stages(job.proto_pipeline)),
      ', '.join(job_stages(job.proto_pipeline)))


def beam_options_record(pipeline_options):
  """The Beam options that differ from Beam's defaults, as JSON values for the manifest."""
  record = {}
  for name, value in sorted(pipeline_options.get_all_options(drop_default=True).items()):
    basic = value is None or isinstance(value, (bool, int, float, str))
    record[name] = value if basic or isinstance(value, list) else str(value)
  return record
