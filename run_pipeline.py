"""Entry point of the embedding job: flags -> checks -> Beam pipeline -> run -> summary."""

import logging
import sys
import traceback

from pipeline.options import (UsageError, make_config, make_index_only_config,
                              parse_command_line, quiet_tensorflow)


def main(argv=None):
  # What an interruption would leave behind, filled in as the launch goes on.
  launch = {}
  try:
    return run_job(sys.argv[1:] if argv is None else argv, launch)
  except KeyboardInterrupt:
    from pipeline.runners import interrupted_message  # pylint: disable=import-outside-toplevel
    # One line instead of Beam's stack; 130 is how shells report an interrupted command.
    print('run_pipeline.py: ' + interrupted_message(**launch), file=sys.stderr)
    sys.exit(130)
  except Exception as e:  # pylint: disable=broad-except
    if 'out_dir' not in launch:
      raise  # before any work: nothing to finish
    report_failure(e, launch)
    sys.exit(1)


def report_failure(error, launch):
  """The stack is for whoever fixes the cause; the last line says what it means and
  what is left, after the stacks of Beam's own threads."""
  from pipeline.runners import WorkerProcessDied, failed_message  # pylint: disable=import-outside-toplevel
  if not isinstance(error, WorkerProcessDied):  # its stack is only the signal's
    traceback.print_exception(error)
  print('run_pipeline.py: ' + failed_message(error, launch['out_dir'],
                                             launch.get('dataflow_job'),
                                             launch.get('rebuilding_indexes', False)),
        file=sys.stderr, flush=True)


def last_words(launch):
  """What the process does before it ends itself after a worker died (see
  pipeline.runners.stop_if_a_worker_dies): its finally-blocks will not run."""
  from pipeline.resume import unmark_being_written  # pylint: disable=import-outside-toplevel

  def say(error):
    unmark_being_written(launch['out_dir'])
    report_failure(error, launch)
  return say


def run_job(argv, launch):
  """Flags -> checks -> run -> summary; `launch` (a dict) gets interrupted_message's
  arguments as soon as they apply."""
  quiet_tensorflow()
  import apache_beam as beam  # pylint: disable=import-outside-toplevel
  from apache_beam.options import pipeline_options as beam_options  # pylint: disable=import-outside-toplevel
  from pipeline.graph import build_pipeline  # pylint: disable=import-outside-toplevel
  from pipeline import runners  # pylint: disable=import-outside-toplevel
  from pipeline.resume import prepare_output_dir, unmark_being_written  # pylint: disable=import-outside-toplevel
  from pipeline.progress import live_progress  # pylint: disable=import-outside-toplevel
  from pipeline.summary import format_summary  # pylint: disable=import-outside-toplevel
  from schemas import outputs  # pylint: disable=import-outside-toplevel

  parser, args, pipeline_options = parse_command_line(argv)
  if args.index_only:
    return rebuild_indexes(parser, args, pipeline_options, launch)
  try:
    # Beam checks its own options here (project, temp_location, ...): before the models load.
    pipeline = beam.Pipeline(options=pipeline_options)
  except ValueError as e:
    parser.error(' '.join(str(e).split()))
  runner_name = runners.runner_name_of(pipeline_options)
  workers_elsewhere = runners.local_worker_processes(pipeline_options) or (
      runner_name != 'direct')
  try:
    # When the job runs in other processes, the models are probed in a child process too,
    # so that this one never holds TensorFlow and a model in memory while it waits.
    config = make_config(args, probe_in_subprocess=workers_elsewhere)
  except UsageError as e:
    parser.error(str(e))  # one line and exit status 2
  for spec in config.models:
    if spec.output_note:  # said before any work, while a long run is still cheap to stop
      print('run_pipeline.py: note: ' + spec.output_note, file=sys.stderr, flush=True)
  config = config._replace(
      options=dict(config.options, beam=runners.beam_options_record(pipeline_options)),
      intra_op_threads=(config.intra_op_threads or
                        runners.default_intra_op_threads(pipeline_options)))
  runner = pipeline_options.view_as(beam_options.StandardOptions).runner
  # The running-file is written inside the try: a Ctrl-C that lands just after it is
  # written still has it removed.
  try:
    if not args.dry_run:  # a dry run changes nothing, not even with --overwrite
      launch['out_dir'] = config.out_dir
      prepare_output_dir(config.out_dir, config.resume, args.overwrite)
      launch['output_prepared'] = True
    with live_progress(config, runner, args.progress_seconds) as metrics, \
        runners.stop_if_a_worker_dies(last_words(launch)):
      build_pipeline(pipeline, config, metrics)
      with runners.quiet_submission(runner_name):
        result = pipeline.run()
      if runner_name == 'dataflow' and not args.dry_run:
        # Submitted: the job goes on without this process.
        launch['dataflow_job'] = (
            result.job_id(), pipeline_options.view_as(beam_options.GoogleCloudOptions).region)
      result.wait_until_finish()
    if args.dry_run:
      print(runners.dry_run_summary(result))
      return result
    manifest_path = outputs.output_path(config.out_dir, outputs.MANIFEST_FILE)
    if outputs.FileSystems.exists(manifest_path):
      if not args.no_report:
        write_report_or_warn(config.out_dir)
      print(format_summary(outputs.read_json(manifest_path), config.out_dir,
                           with_report=not args.no_report))
  finally:
    if not args.dry_run:
      unmark_being_written(config.out_dir)
  return result


def write_report_or_warn(out_dir):
  """The report is a view of finished outputs: if it cannot be made, the run still
  succeeded, and the report can be made later with python -m views.run_report."""
  from views.run_report import write_report  # pylint: disable=import-outside-toplevel
  try:
    write_report(out_dir)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('report not written (%s: %s); the run is complete, retry with '
                    'python -m views.run_report --run %s', type(e).__name__, e, out_dir)


def rebuild_indexes(parser, args, pipeline_options, launch):
  """--index_only: the index stage alone over a finished run's Parquet."""
  import apache_beam as beam  # pylint: disable=import-outside-toplevel
  from pipeline.graph import build_index_only_pipeline  # pylint: disable=import-outside-toplevel
  from pipeline import runners  # pylint: disable=import-outside-toplevel
  from pipeline.resume import delete_paths, mark_being_written, unmark_being_written  # pylint: disable=import-outside-toplevel
  from schemas import outputs  # pylint: disable=import-outside-toplevel
  try:
    config = make_index_only_config(args)
  except UsageError as e:
    parser.error(str(e))
  pipeline = beam.Pipeline(options=pipeline_options)
  build_index_only_pipeline(pipeline, config)
  launch.update(out_dir=config.out_dir, rebuilding_indexes=True)
  try:
    mark_being_written(config.out_dir)  # inside the try, as run_job prepares its output
    # The report shows the index figures: with --no_report it would keep the old ones.
    delete_paths([outputs.output_path(config.out_dir, outputs.REPORT_FILE)])
    with runners.stop_if_a_worker_dies(last_words(launch)):
      with runners.quiet_submission(runners.runner_name_of(pipeline_options)):
        result = pipeline.run()
      result.wait_until_finish()
    manifest = outputs.read_json(outputs.output_path(config.out_dir, outputs.MANIFEST_FILE))
    if not args.no_report:
      write_report_or_warn(config.out_dir)  # it shows the index figures
  finally:
    unmark_being_written(config.out_dir)
  for model in manifest['models']:
    info = model['index'] or {}
    if model['name'] in config.model_names:
      recall = info.get('recall_at_10')
      print('%s: %s index of %s vectors, recall@10 %s, median latency %s ms' % (
          model['name'], info.get('factory'), info.get('count'),
          '-' if recall is None else '%.3f' % recall, (info.get('latency_ms') or {}).get('median')))
  return result


if __name__ == '__main__':
  logging.getLogger().setLevel(logging.WARNING)
  # Local worker processes relay their start-up warnings (unparsed runner flags, no
  # resource module) through the job service; they say nothing a user can act on.
  logging.getLogger('apache_beam.runners.portability.local_job_service').setLevel(
      logging.ERROR)
  main()
