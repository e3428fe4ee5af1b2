"""Memory of one worker process per model: the libraries alone, then the model loaded and
running batches, as each Dataflow SDK process (one per vCPU) holds its own copy.

Usage: .venv/bin/python benchmarks/worker_memory.py --model NAME=HANDLE [--model ...]
       [--batch_size N]   (default: the pipeline's own batch size) [--no_freeze_weights]
Each model is measured in a fresh process; prints resident memory in MiB.
"""

import argparse
import json
import os
import subprocess
import sys

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCHES = 3


def resident_mib():
  with open('/proc/self/status', encoding='ascii') as status:
    for line in status:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) // 1024
  return None


def measure(model_text, batch_size, freeze_weights=True):
  """In this process: RSS with the libraries loaded, after loading the model, and the
  peak over a few batches."""
  import resource  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  # The libraries every worker imports, whatever the model format.
  import apache_beam  # pylint: disable=import-outside-toplevel,unused-import
  import faiss  # pylint: disable=import-outside-toplevel,unused-import
  import tensorflow  # pylint: disable=import-outside-toplevel,unused-import
  from pipeline.registry import parse_model_spec  # pylint: disable=import-outside-toplevel
  from transforms.models import load_embedder  # pylint: disable=import-outside-toplevel
  libraries = resident_mib()
  embedder = load_embedder(parse_model_spec(model_text)._replace(freeze_weights=freeze_weights))
  loaded = resident_mib()
  height, width = embedder.input_size
  rng = np.random.default_rng(0)
  for _ in range(BATCHES):
    embedder(rng.integers(0, 256, (batch_size, height, width, 3), dtype=np.uint8))
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
  return {'model': model_text.split('=')[0], 'libraries_mib': libraries,
          'loaded_mib': loaded, 'peak_mib': peak, 'model_share_mib': peak - libraries}


def main(argv=None):
  from transforms.embed import DEFAULT_BATCH_SIZE  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', action='append', required=True, metavar='SPEC')
  parser.add_argument('--batch_size', type=int, default=DEFAULT_BATCH_SIZE)
  parser.add_argument('--no_freeze_weights', action='store_true',
                      help='SavedModels as loaded, as run_pipeline.py --no_freeze_weights')
  parser.add_argument('--one', help=argparse.SUPPRESS)  # internal: measure in this process
  args = parser.parse_args(argv)
  if args.one:
    print(json.dumps(measure(args.one, args.batch_size, not args.no_freeze_weights)))
    return
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  print('batch size %d%s; resident memory in MiB' % (
      args.batch_size, ', weights not frozen' if args.no_freeze_weights else ''))
  print('%-28s %10s %10s %10s %12s' % ('model', 'libraries', 'loaded', 'peak', 'model share'))
  for model_text in args.model:
    output = subprocess.run(
        [sys.executable, os.path.abspath(__file__), '--model', model_text, '--one', model_text,
         '--batch_size', str(args.batch_size)]
        + (['--no_freeze_weights'] if args.no_freeze_weights else []),
        cwd=PROJECT, env=env, capture_output=True, text=True, check=True).stdout
    row = json.loads(output.strip().splitlines()[-1])
    print('%-28s %10d %10d %10d %12d' % (row['model'], row['libraries_mib'], row['loaded_mib'],
                                          row['peak_mib'], row['model_share_mib']))


if __name__ == '__main__':
  sys.path.insert(0, PROJECT)
  main()
