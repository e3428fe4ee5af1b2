"""Nearest-neighbour queries over a finished run: images or stored keys -> similar images."""

import argparse
import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=wrong-import-position
import numpy as np

from schemas import outputs
from transforms.decode import decode_image
from transforms.index import embeddings_matrix, load_index, normalize, search
from transforms.models import ModelSpec, ModelUnavailableError, load_embedder


class QueryError(ValueError):
  """A mistake in the query's flags or inputs, reported as one line."""


def build_parser():
  parser = argparse.ArgumentParser(
      prog='query_index.py',
      description='Find the images most similar (cosine) to query images or stored keys.')
  group = parser.add_argument_group('query options')
  group.add_argument('--run', required=True, metavar='DIR',
                     help='output directory of a finished run_pipeline.py run')
  group.add_argument('--model', metavar='NAME',
                     help='which model of the run (optional when it has one)')
  group.add_argument('--image', action='append', default=[], metavar='PATH',
                     help='query image (any Beam filesystem path); may repeat')
  group.add_argument('--key', action='append', default=[], metavar='KEY',
                     help='key of an image already in the run; may repeat')
  group.add_argument('--k', type=int, default=10, help='neighbours per query (default: 10)')
  group.add_argument('--format', choices=('table', 'json'), default='table',
                     help='output format (default: %(default)s)')
  return parser


def load_manifest(run_dir):
  path = outputs.output_path(run_dir, outputs.MANIFEST_FILE)
  if not outputs.FileSystems.exists(path):
    raise QueryError('%s holds no finished run (no %s)' % (run_dir, outputs.MANIFEST_FILE))
  return outputs.read_json(path)


def choose_model(manifest, name):
  models = {m['name']: m for m in manifest['models']}
  if name is None:
    if len(models) != 1:
      raise QueryError('the run has several models; choose one with --model (%s)'
                       % ', '.join(sorted(models)))
    return next(iter(models.values()))
  if name not in models:
    raise QueryError('the run has no model %r (it has: %s)' % (name, ', '.join(sorted(models))))
  return models[name]


def spec_of(model_entry):
  return ModelSpec(name=model_entry['name'], handle=model_entry['handle'],
                   tensor=model_entry.get('tensor'),
                   input_size=tuple(model_entry['input_size']), dim=model_entry['dim'],
                   model_format=model_entry.get('format'))


def embed_query_images(paths, spec):
  """Query images -> float32 vectors, decoded and embedded exactly as the run did."""
  try:
    embedder = load_embedder(spec)
  except ModelUnavailableError as e:
    raise QueryError(str(e)) from e
  size = tuple(spec.input_size)
  batch = []
  for path in paths:
    try:
      with outputs.FileSystems.open(path) as f:
        _, _, pixels = decode_image(f.read(), [size])
    except Exception as e:  # pylint: disable=broad-except
      raise QueryError('cannot use query image %s: %s' % (path, e)) from e
    batch.append(pixels[size])
  return embedder(np.stack(batch))


def stored_vectors(run_dir, model_name, keys):
  """Stored embeddings of the given keys, in the order asked."""
  paths = outputs.matching_paths(outputs.embeddings_glob(run_dir, model_name))
  table = outputs.read_parquet(paths, columns=['key', 'embedding'],
                               filters=[('key', 'in', list(keys))])
  found = dict(zip(table.column('key').to_pylist(), embeddings_matrix(table)))
  missing = [k for k in keys if k not in found]
  if missing:
    raise QueryError('no embedding with key %s in model %s' % (', '.join(missing), model_name))
  return np.stack([found[k] for k in keys])


def run_queries(run_dir, model_name=None, images=(), keys=(), k=10):
  """-> a list of {'query': ..., 'neighbors': [...]}, one per query, images first."""
  if not images and not keys:
    raise QueryError('give at least one --image or --key')
  if k < 1:
    raise QueryError('--k must be at least 1')
  manifest = load_manifest(run_dir)
  entry = choose_model(manifest, model_name)
  vectors = []
  if images:
    vectors.append(embed_query_images(images, spec_of(entry)))
  if keys:
    vectors.append(stored_vectors(run_dir, entry['name'], keys))
  index, index_keys, index_uris = load_index(run_dir, entry['name'])
  results = search(index, index_keys, index_uris, normalize(np.concatenate(vectors)), k)
  return [{'query': query, 'neighbors': neighbors}
          for query, neighbors in zip(list(images) + list(keys), results)]


def format_table(results):
  lines = []
  for result in results:
    lines.append('query: %s' % result['query'])
    lines.append('  rank   score  key')
    for n in result['neighbors']:
      lines.append('  %4d  %6.4f  %s' % (n['rank'], n['score'], n['key']))
  return '\n'.join(lines)


def main(argv=None):
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    results = run_queries(args.run, args.model, args.image, args.key, args.k)
  except QueryError as e:
    parser.error(str(e))
  if args.format == 'json':
    print(json.dumps(results, indent=2))
  else:
    print(format_table(results))
  return results


if __name__ == '__main__':
  sys.exit(0 if main() is not None else 1)
