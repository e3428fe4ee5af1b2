"""Model-only throughput: one model on in-memory uint8 batches, the pipeline's ceiling.

Run alone it measures one process; bench_pipeline.py runs it as one process with
TensorFlow's default threads and as one process per core with one thread each. With
--decode_list, every batch is first decoded from encoded images held in memory, by the
pipeline's own decode: a plain loop without Beam, reading or writing, the bound of what
a pipeline with this decode can reach.
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def read_encoded(paths):
  """The bytes of every file, in order: images held in memory, so that decoding them is
  measured without reading."""
  encoded = []
  for path in paths:
    with open(path, 'rb') as image:
      encoded.append(image.read())
  return encoded


def measure(handle, name, batch_size, threads, seconds, start_at=None, encoded=None):
  """Images/s of the model alone, over `seconds` of calls after a warm-up; with
  `encoded` (a list of encoded images), of decoding them in turn and the model."""
  # pylint: disable=import-outside-toplevel
  import itertools
  import numpy as np
  from pipeline.registry import parse_model_spec
  from transforms.decode import decode_image
  from transforms.embed import configure_tensorflow_threads
  from transforms.models import load_embedder
  configure_tensorflow_threads(threads)
  spec = parse_model_spec('%s=%s' % (name, handle))
  embedder = load_embedder(spec, num_threads=threads)
  size = tuple(embedder.input_size)
  random_batch = np.random.default_rng(0).integers(0, 256, (batch_size,) + size + (3,),
                                                   dtype=np.uint8)
  embedder(random_batch)  # warm-up: tracing, memory pools
  embedder(random_batch)
  blobs = itertools.cycle(encoded or [])

  def next_batch():
    if not encoded:
      return random_batch
    return np.stack([decode_image(next(blobs), [size])[2][size] for _ in range(batch_size)])

  if start_at:  # processes measured together start together
    time.sleep(max(0.0, start_at - time.time()))
  images, started = 0, time.perf_counter()
  while time.perf_counter() - started < seconds:
    embedder(next_batch())
    images += batch_size
  return images / (time.perf_counter() - started)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--model', required=True, help='NAME=HANDLE')
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--threads', type=int, default=None)
  parser.add_argument('--seconds', type=float, default=10.0)
  parser.add_argument('--start_at', type=float, default=None)
  parser.add_argument('--decode_list', default=None,
                      help='a file listing image paths, one per line, to decode before '
                           'every batch (read into memory first)')
  parser.add_argument('--part', default='0/1',
                      help='I/N: with --decode_list, take every Nth image from the Ith')
  args = parser.parse_args()
  name, _, handle = args.model.partition('=')
  encoded = None
  if args.decode_list:
    part, parts = (int(n) for n in args.part.split('/'))
    with open(args.decode_list, encoding='utf-8') as listing:
      paths = listing.read().split('\n')
    encoded = read_encoded([p for p in paths if p][part::parts])
  rate = measure(handle, name, args.batch_size, args.threads, args.seconds, args.start_at,
                 encoded)
  print(json.dumps({'images_per_second': rate}))


if __name__ == '__main__':
  main()
