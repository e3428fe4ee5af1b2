"""Where the pipeline's decode time goes on small photos, and what the ratio targets allow.

Times, on one core over caltech101-25 (or generated photos when it is absent) held in
memory, the three parts of the pipeline's decode (transforms.decode.decode_image) at each
seed model's input size: opening and decoding the JPEG at reduced size to RGB
(load_image), Pillow's antialiased resize to the model input, and the copy into a numpy
array. Given the figures of a `bench_pipeline.py --json` run on the same machine, it
also says what pipeline / ceiling each model could reach if a part cost nothing: the
loop bound rebuilt with that part left out, times the pipeline / loop bound that run
measured. Prints a table and JSON.

  python benchmarks/bench_pipeline.py --json figures.json
  python benchmarks/decode_split.py --figures figures.json
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)
sys.path.insert(0, PROJECT)
sys.path.insert(0, os.path.join(PROJECT, 'tests'))

# pylint: disable=wrong-import-position
import numpy as np
from PIL import Image

from benchmarks.bench_pipeline import SEED_SIZES, dataset_files, print_report
from benchmarks.model_ceiling import read_encoded
from transforms.decode import DRAFT_MARGIN, load_image

PARTS = ('decode_ms', 'resize_ms', 'array_ms')


def split_milliseconds(blobs, size, repeats):
  """{part: median over repeats of its mean milliseconds per image}, one model size."""
  rounds = {part: [] for part in PARTS}
  for _ in range(repeats):
    spent = dict.fromkeys(PARTS, 0.0)
    for blob in blobs:
      started = time.perf_counter()
      image, _, _ = load_image(blob, size * DRAFT_MARGIN)
      decoded = time.perf_counter()
      resized = image if image.size == (size, size) else image.resize((size, size),
                                                                       Image.BILINEAR)
      resized_at = time.perf_counter()
      np.asarray(resized, dtype=np.uint8)
      spent['decode_ms'] += decoded - started
      spent['resize_ms'] += resized_at - decoded
      spent['array_ms'] += time.perf_counter() - resized_at
    for part in PARTS:
      rounds[part].append(spent[part] / len(blobs) * 1000)
  return {part: statistics.median(values) for part, values in rounds.items()}


def without_parts(model_figures, split, parts):
  """The pipeline / ceiling a model could reach if these decode parts cost nothing: the
  loop bound's time per image less their share of the decode, at the pipeline / loop
  bound measured."""
  cores = os.cpu_count()
  loop_ms = cores * 1000 / model_figures['loop_bound']  # per image and core
  decode_ms = 1000 / model_figures['decode_only']
  share = sum(split[part] for part in parts) / sum(split.values())
  loop_without = cores * 1000 / (loop_ms - decode_ms * share)
  return model_figures['pipeline_over_loop'] * loop_without / model_figures['ceiling']


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--repeats', type=int, default=5, help='timed rounds (median)')
  parser.add_argument('--limit', type=int, default=None, help='use only the first N images')
  parser.add_argument('--figures', help="a bench_pipeline.py --json file of this machine")
  parser.add_argument('--json', help='also write the JSON figures to this file')
  args = parser.parse_args()
  figures = {}
  if args.figures:
    with open(args.figures, encoding='utf-8') as f:
      figures = json.load(f)['models']
  with tempfile.TemporaryDirectory() as workdir:
    files, dataset = dataset_files(argparse.Namespace(large=False, limit=args.limit), workdir)
    blobs = read_encoded(files)
  print('%s, %d images, one core; milliseconds per image' % (dataset, len(blobs)))
  print('| model | size | JPEG decode | resize | array | resize share |'
        ' pipeline / ceiling measured | with a free resize | with a free decode and resize |')
  print('|---|---|---|---|---|---|---|---|---|')
  results = {}
  for name, size in sorted(SEED_SIZES.items()):
    split = split_milliseconds(blobs, size, args.repeats)
    row = dict(split, size=size, resize_share=split['resize_ms'] / sum(split.values()))
    if name in figures:
      row['pipeline_over_ceiling'] = figures[name]['pipeline_over_ceiling']
      row['free_resize'] = without_parts(figures[name], split, ['resize_ms'])
      row['free_decode_and_resize'] = without_parts(figures[name], split,
                                                    ['decode_ms', 'resize_ms'])
    results[name] = row
    print('| %s | %d | %.3f | %.3f | %.3f | %.2f | %s | %s | %s |' % (
        name, size, split['decode_ms'], split['resize_ms'], split['array_ms'],
        row['resize_share'], *('%.2f' % row[key] if key in row else '-' for key in (
            'pipeline_over_ceiling', 'free_resize', 'free_decode_and_resize'))), flush=True)
  report = {'dataset': dataset, 'images': len(blobs), 'models': results}
  print_report(report, args.json)


if __name__ == '__main__':
  main()
