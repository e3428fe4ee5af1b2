"""Runner flags: the all-cores local default, --dry_run's checks, Beam option mistakes."""

import signal
import threading
import time

import pytest
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

import run_pipeline
from pipeline.runners import (PROJECT_SETUP_FILE, RunnerUsageError, WorkerProcessDied,
                              beam_options_record, default_intra_op_threads,
                              interrupted_message, local_cores, local_worker_processes,
                              runner_name, short_runner_name, stop_if_a_worker_dies,
                              with_dry_run, with_local_defaults, with_project_shipped)


def direct_options(beam_args):
  options = PipelineOptions(with_local_defaults(beam_args)).view_as(DirectOptions)
  return options.direct_running_mode, options.direct_num_workers


@pytest.mark.parametrize('beam_args', [[], ['--runner', 'DirectRunner'], ['--runner=direct']])
def test_direct_runner_defaults_to_a_process_per_core(beam_args):
  assert direct_options(beam_args) == ('multi_processing', local_cores())


@pytest.mark.parametrize('beam_args,expected', [
    (['--direct_num_workers', '3'], ('in_memory', 3)),
    (['--direct_num_workers=1'], ('in_memory', 1)),
    (['--direct_running_mode', 'in_memory'], ('in_memory', 1)),
    (['--direct_running_mode=multi_threading', '--direct_num_workers=4'],
     ('multi_threading', 4))])
def test_user_choice_of_direct_mode_is_kept_as_given(beam_args, expected):
  assert direct_options(beam_args) == expected


@pytest.mark.parametrize('runner', ['DataflowRunner', 'PortableRunner', 'FlinkRunner'])
def test_other_runners_get_no_direct_flags(runner):
  assert with_local_defaults(['--runner', runner]) == ['--runner', runner]


def test_short_runner_names_of_every_spelling():
  for spelling in ('DataflowRunner', 'dataflow', 'Dataflow',
                   'apache_beam.runners.dataflow.dataflow_runner.DataflowRunner'):
    assert short_runner_name(spelling) == 'dataflow'
  assert short_runner_name(None) == 'direct'


def test_runner_names():
  assert [runner_name(a) for a in ([], ['--runner=DataflowRunner'], ['--runner', 'dataflow'],
                                   ['--runner', 'PortableRunner'])] == [
      'direct', 'dataflow', 'dataflow', 'portable']


def test_dry_run_only_for_dataflow():
  assert with_dry_run(['--runner', 'DataflowRunner'])[-1] == '--dry_run=True'
  with pytest.raises(RunnerUsageError, match='DataflowRunner'):
    with_dry_run(['--runner', 'DirectRunner'])


def exit_line(capsys, argv):
  with pytest.raises(SystemExit) as exit_info:
    run_pipeline.main(argv)
  lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith('run_pipeline.py:')]
  assert exit_info.value.code == 2 and len(lines) == 1
  return lines[0]


def test_dry_run_on_the_direct_runner_stops_before_work(tmp_path, capsys):
  line = exit_line(capsys, ['--input', str(tmp_path / '*.jpg'), '--output', str(tmp_path / 'o'),
                            '--dry_run'])
  assert '--dry_run needs --runner DataflowRunner' in line


def test_dry_run_takes_true_or_false_only(capsys):
  line = exit_line(capsys, ['--input', 'x', '--output', 'y', '--dry_run=maybe'])
  assert 'expected True or False' in line


def test_beam_option_mistake_is_one_line(tmp_path, capsys):
  # Checked by Beam before any model loads; 'p' is not a valid project id.
  line = exit_line(capsys, [
      '--input', str(tmp_path / '*.jpg'), '--output', 'gs://my-bucket/out',
      '--runner', 'DataflowRunner', '--project', 'p', '--region', 'europe-west4',
      '--temp_location', 'gs://my-bucket/tmp', '--dry_run', '--no_auth'])
  assert 'Invalid Project ID (p)' in line


def test_beam_options_record_is_plain_json():
  record = beam_options_record(PipelineOptions(
      ['--runner', 'DataflowRunner', '--num_workers', '3', '--experiments', 'a']))
  assert record == {'runner': 'DataflowRunner', 'num_workers': 3, 'experiments': ['a']}


@pytest.mark.parametrize('beam_args,workers', [
    ([], None),  # Beam's own default: one thread in this process
    (['--direct_running_mode=in_memory'], 0),
    (['--direct_running_mode=multi_processing', '--direct_num_workers=2'], 2),
    (['--direct_running_mode=multi_processing', '--direct_num_workers=8'], 8),
    (['--runner=DataflowRunner'], 0)])
def test_threads_are_shared_out_among_local_worker_processes(beam_args, workers):
  options = PipelineOptions(beam_args)
  if workers is None:
    assert local_worker_processes(options) == 0
    assert default_intra_op_threads(options) is None
    # What run_pipeline.py runs with: one single-threaded process per core.
    options = PipelineOptions(with_local_defaults(beam_args))
    assert local_worker_processes(options) == local_cores()
    assert default_intra_op_threads(options) == 1
    return
  assert local_worker_processes(options) == workers
  expected = max(1, local_cores() // workers) if workers else None
  assert default_intra_op_threads(options) == expected


@pytest.mark.parametrize('runner', ['DataflowRunner', 'dataflow'])
def test_dataflow_job_ships_this_project_unless_told_how(runner):
  assert with_project_shipped(['--runner', runner]) == [
      '--runner', runner, '--setup_file=' + PROJECT_SETUP_FILE]
  for told in (['--setup_file', 'other/setup.py'], ['--setup_file=other/setup.py'],
               ['--sdk_container_image', 'image:1'], ['--extra_package', 'x.whl']):
    assert with_project_shipped(['--runner', runner] + told) == ['--runner', runner] + told


def test_other_runners_ship_nothing():
  for beam_args in ([], ['--runner', 'DirectRunner'], ['--runner', 'PortableRunner']):
    assert with_project_shipped(beam_args) == beam_args


def test_dataflow_job_without_a_setup_file_to_ship_is_refused(tmp_path):
  with pytest.raises(RunnerUsageError, match='pass --setup_file'):
    with_project_shipped(['--runner', 'DataflowRunner'], str(tmp_path / 'setup.py'))


def test_interrupted_dataflow_launch_says_the_job_goes_on_and_how_to_stop_it():
  line = interrupted_message('gs://b/out', True, ('2026-11-24_01_02_03-123', 'europe-west4'))
  assert 'Dataflow job 2026-11-24_01_02_03-123 keeps running and will complete gs://b/out' in line
  assert line.endswith('gcloud dataflow jobs cancel 2026-11-24_01_02_03-123 '
                       '--region europe-west4)')
  assert 'may be partly rebuilt' in interrupted_message('out', rebuilding_indexes=True)
  assert interrupted_message() == 'interrupted before any work; nothing was written'


def _raise(error):
  raise error


def test_a_worker_death_reported_by_the_runner_thread_raises_in_the_main_thread():
  before = threading.excepthook, signal.getsignal(signal.SIGUSR1)
  with pytest.raises(WorkerProcessDied, match='return code 137'):
    with stop_if_a_worker_dies(lambda error: None):
      # As Beam's DirectRunner reports it, from the thread waiting on the worker.
      reporter = threading.Thread(name='run_worker', target=_raise, args=(
          RuntimeError('Worker subprocess exited with return code 137'),))
      reporter.start()
      reporter.join()
      time.sleep(30)  # interrupted by the report
  assert (threading.excepthook, signal.getsignal(signal.SIGUSR1)) == before


def test_other_thread_errors_pass_through_the_worker_watch(monkeypatch):
  seen = []
  monkeypatch.setattr(threading, 'excepthook', lambda args: seen.append(str(args.exc_value)))
  with stop_if_a_worker_dies(lambda error: None):
    for name, error in (('other', RuntimeError('unrelated')),
                        ('run_worker', ValueError('exited with return code, but no death'))):
      thread = threading.Thread(name=name, target=_raise, args=(error,))
      thread.start()
      thread.join()
  assert seen == ['unrelated', 'exited with return code, but no death']
