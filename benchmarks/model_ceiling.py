"""Model-only throughput: one model on in-memory uint8 batches, the pipeline's ceiling.

Run alone it measures one process; bench_pipeline.py runs it as one process with
TensorFlow's default threads and as one process per core with one thread each.
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def measure(handle, name, batch_size, threads, seconds, start_at=None):
  """Images/s of the model alone, over `seconds` of calls after a warm-up."""
  # pylint: disable=import-outside-toplevel
  import numpy as np
  from pipeline.registry import parse_model_spec
  from transforms.embed import configure_tensorflow_threads
  from transforms.models import load_embedder
  configure_tensorflow_threads(threads)
  spec = parse_model_spec('%s=%s' % (name, handle))
  embedder = load_embedder(spec, num_threads=threads)
  height, width = embedder.input_size
  batch = np.random.default_rng(0).integers(0, 256, (batch_size, height, width, 3),
                                            dtype=np.uint8)
  embedder(batch)  # warm-up: tracing, memory pools
  embedder(batch)
  if start_at:  # processes measured together start together
    time.sleep(max(0.0, start_at - time.time()))
  images, started = 0, time.perf_counter()
  while time.perf_counter() - started < seconds:
    embedder(batch)
    images += batch_size
  return images / (time.perf_counter() - started)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--model', required=True, help='NAME=HANDLE')
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--threads', type=int, default=None)
  parser.add_argument('--seconds', type=float, default=10.0)
  parser.add_argument('--start_at', type=float, default=None)
  args = parser.parse_args()
  name, _, handle = args.model.partition('=')
  rate = measure(handle, name, args.batch_size, args.threads, args.seconds, args.start_at)
  print(json.dumps({'images_per_second': rate}))


if __name__ == '__main__':
  main()
