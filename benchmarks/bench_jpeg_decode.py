"""Reduced-size against full decoding of camera-sized JPEGs: the pipeline's bound on them.

How far reduced-size decoding can put the pipeline ahead of the tf.data baseline depends
on the file. For generated 3000x2000 JPEGs of several kinds (grain, quality, chroma
subsampling, progressive), it times on one core, per image held in memory: the baseline's
preprocessing (TensorFlow's full decode and plain resize, as tfdata_baseline.py does it),
the pipeline's (Pillow's reduced-size decode and antialiased resize), and for reference
Pillow's and TensorFlow's full decode and TensorFlow's 1/8-scale one. The baseline's time
over the pipeline's bounds what `bench_pipeline.py --large` can measure end to end: the
model costs both the same, which only brings the ratio closer to 1. Prints a table and
JSON.

  python benchmarks/bench_jpeg_decode.py
"""

import argparse
import io
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
sys.path.insert(0, PROJECT)
sys.path.insert(0, os.path.join(PROJECT, 'tests'))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=wrong-import-position
import imagegen
import tensorflow as tf
from PIL import Image

from benchmarks.bench_pipeline import camera_like, print_report
from benchmarks.tfdata_baseline import preprocess
from transforms.decode import decode_image

WIDTH, HEIGHT = 3000, 2000
# (label, grain sigma, Pillow save options). The first is what bench_pipeline.py --large
# writes; the others bracket it: smooth files (little entropy decoding), a camera's
# higher quality, full-resolution chroma, progressive encoding.
VARIANTS = [
    ('--large files: grain 10, q90, 4:2:0', 10, {'quality': 90}),
    ('grain 10, q95, 4:2:0', 10, {'quality': 95}),
    ('grain 3, q95, 4:2:0', 3, {'quality': 95}),
    ('grain 3, q95, 4:4:4', 3, {'quality': 95, 'subsampling': 0}),
    ('grain 10, q90, progressive', 10, {'quality': 90, 'progressive': True}),
    ('smooth, q90, 4:2:0', 0, {'quality': 90}),
    ('smooth, q95, 4:4:4', 0, {'quality': 95, 'subsampling': 0}),
]


def generated_jpeg(seed, grain_sigma, options):
  image = imagegen.photo(seed, WIDTH, HEIGHT)
  if grain_sigma:
    image = camera_like(image, seed, grain_sigma)
  return imagegen.encode(image, 'JPEG', **options)


def milliseconds_per_image(decode, blobs, repeats):
  """Median over repeats of the mean time to decode every blob once (after a warm-up)."""
  for blob in blobs:
    decode(blob)
  rounds = []
  for _ in range(repeats):
    started = time.perf_counter()
    for blob in blobs:
      decode(blob)
    rounds.append((time.perf_counter() - started) / len(blobs) * 1000)
  return statistics.median(rounds)


def pillow_full(blob):
  with Image.open(io.BytesIO(blob)) as image:
    image.load()


def decoders(size):
  """name -> function of encoded bytes, each doing all of its work before returning."""
  return {
      'baseline_ms': lambda blob: preprocess(blob, size).numpy(),
      'pipeline_ms': lambda blob: decode_image(blob, [(size, size)]),
      'pillow_full_ms': pillow_full,
      'tensorflow_full_ms': lambda blob: tf.io.decode_jpeg(blob).numpy(),
      'tensorflow_eighth_ms': lambda blob: tf.io.decode_jpeg(blob, ratio=8).numpy(),
  }


def measure(images, repeats, size):
  results = []
  for label, grain_sigma, options in VARIANTS:
    blobs = [generated_jpeg(seed, grain_sigma, options) for seed in range(images)]
    figures = {'variant': label, 'megabytes': statistics.mean(len(b) for b in blobs) / 1e6}
    for name, decode in decoders(size).items():
      figures[name] = milliseconds_per_image(decode, blobs, repeats)
    figures['baseline_over_pipeline'] = figures['baseline_ms'] / figures['pipeline_ms']
    results.append(figures)
    print_row(figures)
  return results


COLUMNS = ['megabytes', 'pillow_full_ms', 'tensorflow_full_ms', 'tensorflow_eighth_ms',
           'baseline_ms', 'pipeline_ms', 'baseline_over_pipeline']


def print_row(figures):
  print('| %s | %s |' % (figures['variant'], ' | '.join(
      '%.2f' % figures[column] if column == 'baseline_over_pipeline' else
      '%.1f' % figures[column] for column in COLUMNS)), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--images', type=int, default=4, help='files per variant')
  parser.add_argument('--repeats', type=int, default=5, help='timed rounds (median)')
  parser.add_argument('--size', type=int, default=224, help='model input side')
  parser.add_argument('--json', help='also write the JSON figures to this file')
  args = parser.parse_args()
  # One core each, as in the jobs: a worker per core, tf.data's map across cores.
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  print('| %dx%d JPEG | %s |' % (WIDTH, HEIGHT, ' | '.join(COLUMNS)))
  print('|---|%s|' % '|'.join('---' for _ in COLUMNS))
  results = measure(args.images, args.repeats, args.size)
  report = {'width': WIDTH, 'height': HEIGHT, 'size': args.size, 'variants': results}
  print_report(report, args.json)


if __name__ == '__main__':
  main()
