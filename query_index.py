"""Nearest-neighbour queries over a finished run: images or stored keys -> similar images."""

import argparse
import json
import os
import re
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=wrong-import-position
import numpy as np

from pipeline.reachability import UnreachableError, check_cloud_storage_reachable
from pipeline.resume import OutputDirError, check_not_being_written
from schemas import outputs
from schemas.records import terminal_text, utf8_text
from transforms.decode import decode_image, decode_sizes_of_run, max_pixels_of_run
from transforms.index import (embeddings_matrix, group_pairs, iter_embedding_batches,
                              load_index, near_duplicate_pairs, normalize, search)
from transforms.models import (ModelSpec, ModelUnavailableError, finite_rows, load_embedder,
                               model_response, same_response)
from transforms.read import (folder_as_pattern, match_pattern, may_be_image_file,
                             normalize_pattern, quote_glob, relative_key)
from views import html, query_page


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
                     help='query image (any Beam filesystem path), or a folder or glob '
                          'pattern of them, as run_pipeline.py --input; may repeat')
  group.add_argument('--key', action='append', default=[], metavar='KEY',
                     help='key of an image already in the run; may repeat')
  group.add_argument('--images_from', action='append', default=[], metavar='FILE',
                     help='a text file of query image paths, one per line; may repeat')
  group.add_argument('--k', type=int, default=10,
                     help='neighbours per query, or per image with --duplicates '
                          '(default: 10)')
  group.add_argument('--duplicates', action='store_true',
                     help='list groups of near-duplicate images of the run instead')
  group.add_argument('--threshold', type=float,
                     help='with --duplicates: the cosine similarity from which two images '
                          'count as near-duplicates (default: %s)' % DEFAULT_THRESHOLD)
  group.add_argument('--format', choices=('table', 'json', 'html'), default='table',
                     help='output format; html is one self-contained page with '
                          'thumbnails (default: %(default)s)')
  group.add_argument('--out', metavar='FILE',
                     help='write the output to FILE (any Beam filesystem) instead of stdout')
  return parser


DEFAULT_THRESHOLD = 0.95
DUPLICATE_BATCH_ROWS = 4096
# Query images decoded and embedded at a time: the memory a query takes stays the same
# however many images a list names (all at once, 2,550 images took 11.8 GB).
QUERY_BATCH_IMAGES = 64


def load_manifest(run_dir):
  refusal = outputs.glob_characters_refusal(run_dir)
  if refusal:
    raise QueryError('--run ' + refusal)
  try:
    # An --index_only rebuild keeps the manifest while it replaces the index files.
    check_not_being_written(run_dir, '--run')
  except OutputDirError as e:
    raise QueryError(str(e)) from e
  path = outputs.output_path(run_dir, outputs.MANIFEST_FILE)
  if not outputs.FileSystems.exists(path):
    raise QueryError('%s holds no finished run (no %s)' % (run_dir, outputs.MANIFEST_FILE))
  return outputs.read_json(path)


def load_model_index(run_dir, model_name):
  """load_index, with a file it cannot use (a rebuild killed halfway) told in one line."""
  try:
    return load_index(run_dir, model_name)
  except Exception as e:  # pylint: disable=broad-except
    reason = _FAISS_ERROR_PREFIX.sub('', str(e).strip().splitlines()[-1]) if str(e) else (
        type(e).__name__)
    raise QueryError('cannot read the index of model %s in %s (%s); rebuild it with '
                     'run_pipeline.py --output %s --index_only --model %s' % (
                         model_name, run_dir, reason, run_dir, model_name)) from e


# FAISS prefixes its messages with the C++ function, file and line: not for a user.
_FAISS_ERROR_PREFIX = re.compile(r'^Error in .* at \S+:\d+: ((\w+::)*\w+: *)?')


def choose_model(manifest, name):
  models = {m['name']: m for m in manifest['models']}
  if name is None:
    if len(models) != 1:
      raise QueryError('the run has several models; choose one with --model (%s)'
                       % ', '.join(sorted(models)))
    name = next(iter(models))
  if name not in models:
    raise QueryError('the run has no model %r (it has: %s)' % (name, ', '.join(sorted(models))))
  entry = models[name]
  if entry.get('index', {}).get('count') == 0:
    raise QueryError('model %s embedded no image in this run (see the failures in the run '
                     'summary or failures/): there is nothing to search' % name)
  return entry


def spec_of(model_entry):
  return ModelSpec(name=model_entry['name'], handle=model_entry['handle'],
                   tensor=model_entry.get('tensor'),
                   input_size=tuple(model_entry['input_size']), dim=model_entry['dim'],
                   model_format=model_entry.get('format'),
                   freeze_weights=model_entry.get('freeze_weights', True))


def check_same_model(embedder, spec, run_dir):
  """Stops when the model at the run's handle is no longer the one that wrote the run
  (its files were replaced): its vectors would not be comparable with the stored ones."""
  parts = outputs.matching_paths(outputs.embeddings_glob(run_dir, spec.name))
  made_by = outputs.parquet_embeddings_info(parts[0])[1] if parts else None
  if not made_by or not made_by.get('response'):
    return  # a run made before parts named their model
  if not same_response(model_response(embedder)[1], made_by['response']):
    raise QueryError(
        'model %s at %s is not the one that made %s (it gives other vectors for the same '
        'picture; were its files replaced?): its query vectors would not be comparable '
        'with the stored ones. Restore its original files, or query with --key'
        % (spec.name, spec.handle, run_dir))


def embed_query_images(paths, spec, manifest, run_dir):
  """Query images -> float32 vectors, decoded and embedded exactly as the run did (to
  every size it decoded to, within its pixel limit), by the model that made the run."""
  try:
    embedder = load_embedder(spec)
  except ModelUnavailableError as e:
    raise QueryError(str(e)) from e
  check_same_model(embedder, spec, run_dir)
  size = tuple(spec.input_size)
  sizes, max_pixels = decode_sizes_of_run(manifest), max_pixels_of_run(manifest)

  def pixels_of(path):
    try:
      with outputs.FileSystems.open(path) as f:
        return decode_image(f.read(), sizes, max_pixels)[2][size]
    except Exception as e:  # pylint: disable=broad-except
      raise QueryError('cannot use query image %s: %s' % (path, e)) from e
  paths = list(paths)
  vectors = np.concatenate([
      embedder(np.stack([pixels_of(path) for path in paths[start:start + QUERY_BATCH_IMAGES]]))
      for start in range(0, len(paths), QUERY_BATCH_IMAGES)])
  for path, finite in zip(paths, finite_rows(vectors)):
    if not finite:  # as the run makes such an image a failure: nothing to compare
      raise QueryError('cannot use query image %s: the model gave non-finite values (NaN '
                       'or infinity) for it' % utf8_text(path))
  return vectors


def stored_vectors(run_dir, model_name, keys, root=None):
  """Stored embeddings of the given keys, in the order asked. root: the folder the run's
  keys are relative to, to say which key a path given as a key has."""
  # A path given for a key (a common slip): the key its file would have.
  keys_of_paths = {}
  for key in keys:
    path = normalize_pattern(key)
    if root and path.startswith(root) and path != root:
      keys_of_paths[key] = relative_key(path, root)
  paths = outputs.matching_paths(outputs.embeddings_glob(run_dir, model_name))
  table = outputs.read_parquet(paths, columns=['key', 'embedding'],
                               filters=[('key', 'in', list(keys) + list(keys_of_paths.values()))])
  found = dict(zip(table.column('key').to_pylist(), embeddings_matrix(table)))
  missing = [k for k in keys if k not in found]
  if missing:
    hints = ['%s is the key of %s' % (keys_of_paths[k], k) for k in missing
             if keys_of_paths.get(k) in found]
    if hints:
      detail = ' (%s; keys are paths relative to %s)' % (', '.join(hints), root)
    else:  # keys of the run whose inputs failed: why
      reasons = ['%s failed at %s: %s' % (key, failure['stage'], failure['message'])
                 for key, failure in failures_of(run_dir, missing, model_name).items()]
      detail = ' (%s)' % '; '.join(reasons) if reasons else ''
    raise QueryError('no embedding with key %s in model %s%s' % (
        ', '.join(missing), model_name, detail))
  return np.stack([found[k] for k in keys])


def failures_of(run_dir, keys, model_name):
  """{key: failure row} of the inputs among `keys` that the run recorded as failures
  for this model (or for every model: read and decode failures name none)."""
  paths = outputs.matching_paths(outputs.failures_glob(run_dir))
  table = outputs.read_parquet(paths, filters=[('key', 'in', list(keys))]) if paths else None
  return {row['key']: row for row in (table.to_pylist() if table is not None else [])
          if row['model'] in (None, model_name)}


def query_image_paths(given):
  """An --image value -> (the query images it names, the files it names that are no
  image), as --input names images: a file as given, or every file below a folder or
  matching a glob pattern (sorted). A named file is taken as an image: if it is not one,
  the query stops and says why."""
  pattern = folder_as_pattern(normalize_pattern(given))
  if pattern == quote_glob(normalize_pattern(given)):  # one file: keep it as typed
    return [given], []
  paths = [metadata.path for metadata in match_pattern(pattern)]
  if not paths:
    raise QueryError('--image %s matches no files' % given)
  # A folder of query images also holds sidecar files (.txt, .xmp, Thumbs.db): left out.
  images, not_images = [], []
  for path in paths:
    (images if may_be_image_file(path) else not_images).append(path)
  if not images:
    raise QueryError('--image %s matches no image files (%d other files, such as %s)' % (
        given, len(paths), utf8_text(paths[0])))
  return images, not_images


def read_image_list(path):
  """Query image paths listed in a text file, one per line (blank lines skipped)."""
  try:
    with outputs.FileSystems.open(path) as f:
      text = f.read().decode('utf-8-sig')  # the byte-order mark Windows editors write
  except Exception as e:  # pylint: disable=broad-except
    raise QueryError('cannot read --images_from %s: %s' % (path, e)) from e
  paths = [line.strip() for line in text.splitlines() if line.strip()]
  if not paths:
    raise QueryError('--images_from %s lists no image (it holds only blank lines)' % path)
  return paths


def run_queries(run_dir, model_name=None, images=(), keys=(), k=10, manifest=None):
  """-> a list of {'query', 'query_uri', 'neighbors': [...]}, one per query, images
  first. manifest: the run's, when the caller has read it already."""
  if not images and not keys:
    raise QueryError('give at least one --image, --images_from or --key')
  if k < 1:
    raise QueryError('--k must be at least 1')
  manifest = manifest or load_manifest(run_dir)
  entry = choose_model(manifest, model_name)
  vectors = []
  if images:
    vectors.append(embed_query_images(images, spec_of(entry), manifest, run_dir))
  if keys:
    vectors.append(stored_vectors(run_dir, entry['name'], keys,
                                  manifest.get('input', {}).get('root')))
  index, index_keys, index_uris = load_model_index(run_dir, entry['name'])
  results = search(index, index_keys, index_uris, normalize(np.concatenate(vectors)), k)
  uri_of = dict(zip(index_keys, index_uris)) if keys else {}
  # Paths as the run stores its own (a name that is not UTF-8 could not be printed).
  query_uris = [utf8_text(path) for path in images] + [uri_of.get(key, key) for key in keys]
  return [{'query': query, 'query_uri': uri, 'neighbors': neighbors} for query, uri, neighbors
          in zip([utf8_text(path) for path in images] + list(keys), query_uris, results)]


def _indexed_batches(run_dir, model_name, index_keys):
  """(index ids, normalized vectors) of a run's embeddings, batch by batch."""
  sorted_keys = np.asarray(index_keys, dtype=object)  # index ids follow the keys' order
  for path in outputs.matching_paths(outputs.embeddings_glob(run_dir, model_name)):
    for _, batch in iter_embedding_batches(path, DUPLICATE_BATCH_ROWS,
                                           columns=('key', 'embedding')):
      keys = np.asarray(batch.column('key').to_pylist(), dtype=object)
      ids = np.minimum(np.searchsorted(sorted_keys, keys), max(len(sorted_keys) - 1, 0))
      if not len(sorted_keys) or (sorted_keys[ids] != keys).any():
        raise QueryError('the index of model %s does not match its embeddings; rebuild it '
                         'with run_pipeline.py --output %s --index_only' % (model_name, run_dir))
      yield ids, normalize(embeddings_matrix(batch))


def find_duplicates(run_dir, model_name=None, threshold=DEFAULT_THRESHOLD, k=10,
                    manifest=None):
  """-> groups of near-duplicate images, largest first: {'images': [{'key', 'uri'}],
  'pairs': [{'keys': [a, b], 'score'}], 'max_score'}."""
  if k < 1:
    raise QueryError('--k must be at least 1')
  entry = choose_model(manifest or load_manifest(run_dir), model_name)
  index, keys, uris = load_model_index(run_dir, entry['name'])
  pairs = near_duplicate_pairs(index, _indexed_batches(run_dir, entry['name'], keys),
                               threshold, k)
  groups = group_pairs(pairs)
  group_of = {row: number for number, members in enumerate(groups) for row in members}
  scored = [[] for _ in groups]
  for (a, b), score in sorted(pairs.items(), key=lambda item: -item[1]):
    scored[group_of[a]].append({'keys': [keys[a], keys[b]], 'score': score})
  groups = [{'images': [{'key': keys[row], 'uri': uris[row]} for row in members],
             'pairs': group_scores, 'max_score': group_scores[0]['score']}
            for members, group_scores in zip(groups, scored)]
  return entry['name'], groups


def format_table(results):
  lines = []
  for result in results:
    lines.append('query: %s' % terminal_text(result['query']))
    lines.append('  rank   score  key')
    for n in result['neighbors']:
      lines.append('  %4d  %6.4f  %s' % (n['rank'], n['score'], terminal_text(n['key'])))
  return '\n'.join(lines)


def format_duplicates_table(groups):
  lines = []
  for number, group in enumerate(groups, 1):
    lines.append('group %d: %d images, closest pair %.4f' % (
        number, len(group['images']), group['max_score']))
    lines.extend('  %s' % terminal_text(image['key']) for image in group['images'])
  return '\n'.join(lines) if lines else 'no near-duplicates'


def render(args, value, model_name, manifest):
  """Results or duplicate groups -> the text of the chosen --format."""
  if args.format == 'json':
    return json.dumps(value, indent=2)
  if args.format == 'html':
    thumbnails = html.Thumbnails(max_pixels=max_pixels_of_run(manifest))
    if args.duplicates:
      return query_page.duplicates_page(value, args.run, model_name, args.threshold,
                                        thumbnails)
    return query_page.results_page(value, args.run, model_name, thumbnails)
  if args.duplicates:
    return format_duplicates_table(value)
  return format_table(value)


def run_command(args):
  """Parsed flags -> (results or duplicate groups, model name, the run's manifest). Raises
  QueryError."""
  if args.duplicates and (args.image or args.key or args.images_from):
    raise QueryError('--duplicates looks at the whole run; it takes no --image, --key '
                     'or --images_from')
  if args.threshold is None:
    args.threshold = DEFAULT_THRESHOLD
  elif not args.duplicates:
    raise QueryError('--threshold applies to --duplicates only')
  if not -1 <= args.threshold <= 1:
    raise QueryError('--threshold is a cosine similarity, from -1 to 1 (got %s)'
                     % args.threshold)
  if args.out and (args.out.endswith('/') or outputs.is_local_folder(args.out)):
    raise QueryError('--out %s is a folder; give the name of a file to write, for example '
                     '--out %s' % (args.out, outputs.output_path(args.out, 'results.' + (
                         'txt' if args.format == 'table' else args.format))))
  try:
    check_cloud_storage_reachable(
        [('--run', args.run)] + [('--image', path) for path in args.image]
        + [('--images_from', path) for path in args.images_from], 'query_index.py')
  except UnreachableError as e:
    raise QueryError(str(e)) from e
  # Read once: one request on Cloud Storage, and one version of a run being replaced.
  manifest = load_manifest(args.run)
  model_name = choose_model(manifest, args.model)['name']
  if args.duplicates:
    _, groups = find_duplicates(args.run, model_name, args.threshold, args.k, manifest)
    return groups, model_name, manifest
  images = []
  for given in args.image:
    found, not_images = query_image_paths(given)
    images += found
    if not_images:
      print('%s: note: --image %s: left out %d files that are not images (%s)' % (
          'query_index.py', given, len(not_images), ', '.join(
              terminal_text(utf8_text(path)) for path in not_images[:3])
          + (', ...' if len(not_images) > 3 else '')), file=sys.stderr)
  for path in args.images_from:
    images += read_image_list(path)
  results = run_queries(args.run, model_name, images, args.key, args.k, manifest)
  return results, model_name, manifest


def main(argv=None):
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    value, model_name, manifest = run_command(args)
  except QueryError as e:
    # One line, as run_pipeline.py's: the flags parsed, the usage would only bury it.
    print('%s: error: %s' % (parser.prog, e), file=sys.stderr)
    sys.exit(2)
  text = render(args, value, model_name, manifest)
  if args.out:
    outputs.write_bytes_atomically(args.out, text.encode('utf-8'), mime_type=(
        'text/html' if args.format == 'html' else 'text/plain'))
  else:
    print(text)
  return value


if __name__ == '__main__':
  sys.exit(0 if main() is not None else 1)
