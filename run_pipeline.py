"""Entry point of the embedding job: flags -> checks -> Beam pipeline -> run -> summary."""

import logging
import sys

from pipeline.options import UsageError, make_config, parse_command_line, quiet_tensorflow


def main(argv=None):
  quiet_tensorflow()
  import apache_beam as beam  # pylint: disable=import-outside-toplevel
  from pipeline.graph import build_pipeline  # pylint: disable=import-outside-toplevel
  from pipeline.resume import prepare_output_dir  # pylint: disable=import-outside-toplevel
  from schemas import outputs  # pylint: disable=import-outside-toplevel

  parser, args, pipeline_options = parse_command_line(sys.argv[1:] if argv is None else argv)
  try:
    config = make_config(args)
  except UsageError as e:
    parser.error(str(e))  # one line and exit status 2
  prepare_output_dir(config.out_dir, config.resume, args.overwrite)
  pipeline = beam.Pipeline(options=pipeline_options)
  build_pipeline(pipeline, config)
  result = pipeline.run()
  result.wait_until_finish()
  manifest_path = outputs.output_path(config.out_dir, outputs.MANIFEST_FILE)
  if outputs.FileSystems.exists(manifest_path):
    counts = outputs.read_json(manifest_path)['counts']
    for name, model_counts in counts['models'].items():
      print('%s: %d read, %d embedded, %d failed' % (
          name, counts['read'], model_counts['embedded'], model_counts['failed']))
    print('outputs in %s' % config.out_dir)
  return result


if __name__ == '__main__':
  logging.getLogger().setLevel(logging.WARNING)
  main()
