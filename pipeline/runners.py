"""Runner choices around the job: local parallelism, shipping the code to Dataflow, dry
runs, dying local workers, and the last line of an interrupted or failed launch."""

import contextlib
import logging
import os
import re
import signal
import threading

from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

# The flags with which a user takes control of how the DirectRunner runs.
DIRECT_RUNNER_FLAGS = ('--direct_num_workers', '--direct_running_mode')
# The flags with which a user says how Dataflow workers get this project's code.
SHIPPING_FLAGS = ('--setup_file', '--sdk_container_image', '--extra_package',
                  '--extra_packages')
# The checkout's setup.py, which --setup_file ships (absent in an installed copy).
PROJECT_SETUP_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), 'setup.py')


# What Beam's stager leaves on stderr at each Dataflow launch, building the --setup_file
# sdist: it tries 'python -m build' first and falls back to 'setup.py sdist' when that
# module is missing (it is: one dependency less), but the child's error reaches the user.
SDIST_BUILD_NOISE = re.compile(r': No module named build\s*$')


class RunnerUsageError(ValueError):
  """Runner flags that do not fit together."""


class WorkerProcessDied(RuntimeError):
  """A local worker process ended with an error status while the run went on."""


# How the DirectRunner reports a worker process's death: an error in the thread that
# waits for it ('Worker ... exited with return code N').
_WORKER_THREAD = 'run_worker'
_WORKER_EXIT = 'exited with return code'


def process_stat_field(pid, field):
  """One numeric field of a process's /proc/PID/stat, numbered as proc(5) numbers them
  (4: parent pid, 22: start time), or None when the process does not exist (any more)
  or there is no /proc. The command name (field 2) may hold spaces and parentheses, so
  the fields are counted from its closing parenthesis."""
  try:
    with open('/proc/%d/stat' % pid, encoding='ascii', errors='replace') as f:
      return int(f.read().rsplit(')', 1)[1].split()[field - 3])
  except (OSError, ValueError, IndexError):
    return None


def _parent_pids():
  """{pid: parent pid} of every process this user can see (Linux /proc; {} elsewhere)."""
  parents = {}
  for entry in os.listdir('/proc') if os.path.isdir('/proc') else ():
    if entry.isdigit():
      parent = process_stat_field(int(entry), 4)
      if parent is not None:  # else it ended meanwhile
        parents[int(entry)] = parent
  return parents


def local_worker_pids(launcher=None):
  """The DirectRunner worker processes that a launcher process (default: this one)
  started, through a shell."""
  launcher = launcher or os.getpid()
  parents, found = _parent_pids(), []
  for pid in parents:
    ancestor = parents.get(pid)
    while ancestor and ancestor != launcher:
      ancestor = parents.get(ancestor)
    if ancestor:
      try:
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
          command = f.read()
      except OSError:
        continue
      if b'sdk_worker_main' in command and not command.startswith(b'/bin/sh'):
        found.append(pid)
  return found


def _kill(pid):
  try:
    os.kill(pid, signal.SIGKILL)
  except OSError:
    pass  # already gone


# Seconds the main thread gets to come out of the runner after a worker died, before
# the process ends itself: the runner can keep waiting on a worker that died, or on one
# it starts afterwards.
WORKER_DEATH_GRACE_SECONDS = 10


@contextlib.contextmanager
def stop_if_a_worker_dies(last_words):
  """Around a local multi-process run: when a worker process ends with an error (killed,
  crashed), the other workers are stopped and WorkerProcessDied is raised in this (the
  main) thread. The DirectRunner only reports the death in a thread of its own and can
  wait forever. If the main thread is still inside the runner after
  WORKER_DEATH_GRACE_SECONDS, last_words(error) runs and the process exits (status 1).
  Does nothing outside the main thread, where signals cannot be handled, or without
  SIGUSR1 (Windows)."""
  if (threading.current_thread() is not threading.main_thread()
      or not hasattr(signal, 'SIGUSR1')):
    yield
    return
  lock = threading.Lock()
  watching = True  # False once the handler is gone: a signal then would end us
  death = None  # the first worker's report
  interrupted = False

  def raise_in_main_thread(signum, frame):
    raise WorkerProcessDied(death)

  def stop_on_interrupt(signum, frame):
    # The workers leave Ctrl-C to this process (pipeline/local_worker.py). They are
    # stopped here, and the runner's complaints about them, in its threads and in its
    # clean-up on the way out, are not shown: the interruption gets one line.
    nonlocal interrupted
    with lock:
      interrupted = True
    logging.disable(logging.CRITICAL)
    workers = local_worker_pids()
    # The shell each worker runs under first: it would print "Killed" for its child.
    for pid in {process_stat_field(pid, 4) for pid in workers} - {os.getpid(), None}:
      _kill(pid)
    for pid in workers:
      _kill(pid)
    raise KeyboardInterrupt

  def give_up():
    with lock:
      if not watching:
        return
    for pid in local_worker_pids():  # any started since
      _kill(pid)
    last_words(WorkerProcessDied(death))
    os._exit(1)  # pylint: disable=protected-access

  deadline = threading.Timer(WORKER_DEATH_GRACE_SECONDS, give_up)
  deadline.daemon = True

  def on_thread_error(args):
    nonlocal death
    if interrupted:
      return  # a runner thread that lost its worker
    if (args.thread is not None and args.thread.name == _WORKER_THREAD
        and isinstance(args.exc_value, RuntimeError) and _WORKER_EXIT in str(args.exc_value)):
      with lock:
        if watching:
          if death is None:
            death = str(args.exc_value)
            # The runner's cleanup waits for every worker process to end, and the others
            # would wait for work forever.
            for pid in local_worker_pids():
              _kill(pid)
            deadline.start()
            os.kill(os.getpid(), signal.SIGUSR1)
          return  # the main thread reports it
    previous_hook(args)

  previous_hook = threading.excepthook
  previous_handler = signal.signal(signal.SIGUSR1, raise_in_main_thread)
  previous_interrupt_handler = signal.signal(signal.SIGINT, stop_on_interrupt)
  threading.excepthook = on_thread_error
  try:
    yield
  finally:
    with lock:
      watching = False
      if not interrupted:  # else the runner's threads may still be failing
        threading.excepthook = previous_hook
      deadline.cancel()
    signal.signal(signal.SIGUSR1, previous_handler)
    signal.signal(signal.SIGINT, previous_interrupt_handler)
    # After an interruption, logging stays off: the runner's threads may still be
    # failing while the process ends with its one line.


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


def runner_name_of(pipeline_options):
  return short_runner_name(pipeline_options.view_as(StandardOptions).runner)


def runner_name(beam_args):
  """short_runner_name of the --runner among beam_args."""
  return runner_name_of(PipelineOptions(beam_args))


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


# Imported by each local worker process as it starts (see pipeline/local_worker.py).
LOCAL_WORKER_PLUGIN = 'pipeline.local_worker'


def with_local_worker_plugin(beam_args):
  """beam_args, plus the plugin that quiets Ctrl-C in local worker processes, when the
  job runs in such processes."""
  if not local_worker_processes(PipelineOptions(beam_args)):
    return list(beam_args)
  return list(beam_args) + ['--beam_plugins=' + LOCAL_WORKER_PLUGIN]


def local_worker_processes(pipeline_options):
  """How many DirectRunner worker processes will run the job in other processes than this
  one (0: it runs in this process, or on another runner)."""
  from apache_beam.options.pipeline_options import DirectOptions  # pylint: disable=import-outside-toplevel
  if runner_name_of(pipeline_options) not in ('direct', 'switchingdirect'):
    return 0
  direct = pipeline_options.view_as(DirectOptions)
  if direct.direct_running_mode != 'multi_processing':
    return 0
  return direct.direct_num_workers or 1


def default_intra_op_threads(pipeline_options):
  """TensorFlow threads per local worker process: the cores shared out among the worker
  processes, so that they do not fight over them (measured in benchmarks/: two
  single-threaded processes beat one process using both cores, because one process's
  decoding overlaps the other's inference). None (TensorFlow's own choice) otherwise."""
  workers = local_worker_processes(pipeline_options)
  return max(1, local_cores() // workers) if workers else None


def with_project_shipped(beam_args, setup_file=PROJECT_SETUP_FILE):
  """beam_args, plus --setup_file with this project's setup.py for a Dataflow job that
  says nothing of how its workers get the code: without it they fail, minutes after
  submission, on the first import of this project's modules."""
  if runner_name(beam_args) != 'dataflow' or any(
      _given(beam_args, flag) for flag in SHIPPING_FLAGS):
    return list(beam_args)
  if not os.path.isfile(setup_file):
    raise RunnerUsageError(
        '--runner DataflowRunner: the workers need this project; pass --setup_file '
        'PATH/setup.py of a checkout, or --sdk_container_image with a worker image')
  return list(beam_args) + ['--setup_file=' + setup_file]


def check_cloud_storage_locations(beam_args):
  """For a Dataflow job: a --temp_location or --staging_location given must be a valid
  gs:// path. Beam would only warn, then fall back to creating a bucket of its own (over
  the network, minutes of retries where there is none) instead of the one the user named."""
  options = PipelineOptions(beam_args)
  if runner_name_of(options) != 'dataflow':
    return
  from apache_beam.options.pipeline_options import GoogleCloudOptions  # pylint: disable=import-outside-toplevel
  from apache_beam.options.pipeline_options_validator import PipelineOptionsValidator  # pylint: disable=import-outside-toplevel
  validator = PipelineOptionsValidator(options, None)
  view = options.view_as(GoogleCloudOptions)
  for name in ('temp_location', 'staging_location'):
    value = getattr(view, name)
    errors = validator.validate_gcs_path(view, name) if value is not None else []
    if errors:
      raise RunnerUsageError(
          '--%s %s is not a Cloud Storage path Dataflow can use: gs://BUCKET/FOLDER, where '
          'BUCKET is 3 to 63 lowercase letters, digits, dashes, underscores or dots, '
          'beginning and ending with a letter or digit' % (name, value))


def with_dry_run(beam_args):
  """beam_args with Beam's dry-run switch, which only the DataflowRunner honours: any
  other runner would quietly run the whole job."""
  if runner_name(beam_args) != 'dataflow':
    raise RunnerUsageError('--dry_run needs --runner DataflowRunner')
  return list(beam_args) + ['--dry_run=True']


def interrupted_message(out_dir=None, output_prepared=False, dataflow_job=None,
                        rebuilding_indexes=False):
  """One line on what an interrupted launcher (Ctrl-C) leaves behind. dataflow_job:
  (job id, region) of a submitted Dataflow job, which goes on without its launcher."""
  if dataflow_job:
    return ('interrupted; Dataflow job %s keeps running and will complete %s without this '
            'launcher (to stop it: gcloud dataflow jobs cancel %s --region %s)'
            % (dataflow_job[0], out_dir, dataflow_job[0], dataflow_job[1]))
  if rebuilding_indexes:
    return ('interrupted; the indexes of %s may be partly rebuilt: run the same command '
            'again' % out_dir)
  if output_prepared:
    return ('interrupted; %s holds an unfinished run: to finish it, run the same command '
            'with --resume (without --overwrite)' % out_dir)
  return 'interrupted before any work; nothing was written'


# An exception's own line in a traceback's text: 'module.Name: message', unindented.
_EXCEPTION_LINE = re.compile(r'^[A-Za-z_][\w.]*: \S')


def error_cause(error):
  """'Type: message' of an error, on one line. The DirectRunner raises a worker's error
  as a RuntimeError whose message is the worker's whole traceback: its last error line
  (the error, with the stage it happened in) stands for it."""
  text = str(error)
  if 'Traceback (most recent call last)' in text:
    raised = [line for line in text.splitlines() if _EXCEPTION_LINE.match(line)]
    if raised:
      return ' '.join(raised[-1].split())
  return '%s: %s' % (type(error).__name__, ' '.join(text.split()))


def failed_message(error, out_dir, dataflow_job=None, rebuilding_indexes=False):
  """One line after the stack of a run that failed once it had begun: what the error
  means when Beam's own words do not say it, and what is left in the output."""
  cause = error_cause(error)
  # 'Channel closed prematurely': the DirectRunner's words when a worker process died
  # while it was being sent work.
  if isinstance(error, WorkerProcessDied) or (
      isinstance(error, RuntimeError) and 'closed prematurely' in str(error)):
    status = str(error).rsplit(' ', 1)[-1] if isinstance(error, WorkerProcessDied) else None
    cause = ('a worker process ended unexpectedly%s (killed or crashed; a system short of '
             'memory kills its largest process: see "Memory per worker process" in the '
             'README; fewer --direct_num_workers or a smaller --batch_size use less)'
             % (' with exit status %s' % status if status else ''))
  if rebuilding_indexes:
    return 'the index rebuild failed: %s. Run it again once the cause is fixed' % cause
  left = ('Dataflow job %s failed and %s' % (dataflow_job[0], out_dir) if dataflow_job
          else out_dir)
  return ('the run failed: %s. %s holds an unfinished run: once the cause is fixed, run '
          'the same command with --resume (without --overwrite) to finish it'
          % (cause, left))


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


def quiet_submission(runner_name):
  """Around pipeline.run(): for Dataflow, file descriptor 2 without SDIST_BUILD_NOISE
  (the rest is written once the job is submitted, or built in a dry run)."""
  if runner_name != 'dataflow':
    return contextlib.nullcontext()
  from transforms.models import stderr_without  # pylint: disable=import-outside-toplevel
  return stderr_without(SDIST_BUILD_NOISE)
