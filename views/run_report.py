"""The HTML run report: a finished run's facts, counts, failures, embedding norms, a 2-D map
of the embeddings and nearest-neighbour strips, as one self-contained page."""

import argparse
import json
import sys

import numpy as np

from pipeline.reachability import UnreachableError, check_cloud_storage_reachable
from schemas import outputs
from transforms.decode import max_pixels_of_run
from transforms.index import embeddings_matrix, load_index, normalize, search
from views.html import Thumbnails, escape, figure, page
from views.projection import pca_2d, tsne_2d

# Embeddings read per model (evenly from every part file) for the histogram and the map:
# enough to see the shape of millions without reading them all.
SAMPLE_ROWS = 10000
# Points on the maps; t-SNE's cost grows with its square (about 15 s for 1,500 on 2 cores).
MAP_POINTS = 1500
MAP_WIDTH, MAP_HEIGHT, MAP_MARGIN = 1000, 700, 30
MAP_THUMBNAILS = 30
MAP_THUMBNAIL_SIDE = 44
NEIGHBOR_QUERIES = 6
NEIGHBORS = 5
HISTOGRAM_BINS = 30
NO_LABEL_COLOUR = '#8a8a8a'

_REPORT_CSS = """
table { max-width: 100%; }
td { overflow-wrap: anywhere; }
.facts td:first-child { color: #555; white-space: nowrap; }
.facts td { vertical-align: top; overflow-wrap: anywhere; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.models { display: flex; flex-wrap: wrap; gap: 2em; }
svg text { font-family: system-ui, sans-serif; }
.map { background: #fff; border: 1px solid #ddd; }
.legend { display: flex; flex-wrap: wrap; gap: 0.2em 1em; font-size: 0.8em; max-width: 1000px; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; border-radius: 50%;
          margin-right: 0.3em; vertical-align: middle; }
.neighbors { margin-bottom: 1em; }
.neighbors figure { border-top: 5px solid transparent; padding-top: 3px; }
.neighbors .query figure { border-top-color: #333; }
.neighbors .same figure { border-top-color: #2a9d3a; }
.neighbors .other figure { border-top-color: #d0453a; }
.examples { font-size: 0.85em; color: #444; }
"""


class ReportError(ValueError):
  """A run directory the report cannot be made for, reported as one line."""


# ---- data -------------------------------------------------------------------------------

def load_sample(out_dir, model_name, limit=SAMPLE_ROWS):
  """Up to `limit` stored embeddings of a model: {'keys', 'uris', 'labels', 'vectors'},
  or None when the model embedded nothing."""
  paths = outputs.matching_paths(outputs.embeddings_glob(out_dir, model_name))
  table = outputs.read_parquet_sample(paths, ['key', 'uri', 'label', 'embedding'], limit)
  if table is None or table.num_rows == 0:
    return None
  return {'keys': table.column('key').to_pylist(), 'uris': table.column('uri').to_pylist(),
          'labels': table.column('label').to_pylist(),
          'vectors': embeddings_matrix(table).astype(np.float64)}


def label_colours(labels):
  """label -> a CSS colour, distinct hues (golden-angle steps) for the commonest labels."""
  counts = {}
  for label in labels:
    if label is not None:
      counts[label] = counts.get(label, 0) + 1
  ordered = sorted(counts, key=lambda label: (-counts[label], label))
  lightness = (42, 60, 32)
  return {label: 'hsl(%.1f, 70%%, %d%%)' % ((i * 137.508) % 360, lightness[i % 3])
          for i, label in enumerate(ordered)}


def _scaled(coordinates):
  """Map coordinates -> SVG pixels inside the margins, y pointing up."""
  low, high = coordinates.min(axis=0), coordinates.max(axis=0)
  span = np.where(high - low > 0, high - low, 1.0)
  unit = (coordinates - low) / span
  x = MAP_MARGIN + unit[:, 0] * (MAP_WIDTH - 2 * MAP_MARGIN)
  y = MAP_HEIGHT - MAP_MARGIN - unit[:, 1] * (MAP_HEIGHT - 2 * MAP_MARGIN)
  return np.stack([x, y], axis=1)


def featured_points(pixels, labels, count=MAP_THUMBNAILS, seed=0):
  """Which points get a thumbnail on the map: with labels, the most central image of the
  most compact classes (so the picture says what a cluster is); else a random few."""
  if all(label is None for label in labels):
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(len(labels), size=min(count, len(labels)), replace=False))
  spread = float(np.mean(np.std(pixels, axis=0))) or 1.0
  classes = []
  for label in sorted(set(l for l in labels if l is not None)):
    members = np.array([i for i, l in enumerate(labels) if l == label])
    centre = np.median(pixels[members], axis=0)
    distances = np.linalg.norm(pixels[members] - centre, axis=1)
    classes.append((float(np.median(distances)) / spread, label,
                    int(members[np.argmin(distances)])))
  return [point for _, _, point in sorted(classes)[:count]]


# ---- pieces of the page -----------------------------------------------------------------

def _table(header, rows, numeric=()):
  """An HTML table; every cell escaped; columns numbered in `numeric` right-aligned."""
  def cell(tag, i, value):
    return '<%s%s>%s</%s>' % (tag, ' class="num"' if i in numeric else '', escape(value), tag)
  head = ''.join(cell('th', i, h) for i, h in enumerate(header))
  body = ''.join('<tr>%s</tr>' % ''.join(cell('td', i, v) for i, v in enumerate(row))
                 for row in rows)
  return '<table><tr>%s</tr>%s</table>' % (head, body)


def _facts(pairs):
  return '<table class="facts">%s</table>' % ''.join(
      '<tr><td>%s</td><td>%s</td></tr>' % (escape(k), escape(v)) for k, v in pairs)


def _number(value, digits=0):
  return '-' if value is None else format(value, ',.%df' % digits)


def facts_section(manifest, out_dir):
  timing = manifest.get('throughput') or {}
  run = [('output', out_dir), ('started', manifest.get('started_at')),
         ('completed', manifest.get('completed_at')),
         ('wall time', '%s s' % _number(timing.get('wall_seconds'), 1)),
         ('throughput', '%s images/s' % _number(timing.get('images_per_second'), 1)),
         ('input patterns', ', '.join(manifest['input']['patterns'])),
         ('input format', manifest['input']['format']),
         ('keys relative to', manifest['input'].get('root')),
         ('batch size', manifest.get('batch_size'))]
  models = [[m['name'], m['handle'] + ('#' + m['tensor'] if m.get('tensor') else ''),
             m.get('format'), 'x'.join(str(s) for s in m['input_size']), m['dim'],
             (m.get('index') or {}).get('factory', '-'),
             _number((m.get('index') or {}).get('recall_at_10'), 3)]
            for m in manifest['models']]
  options = [(name, json.dumps(value)) for name, value in sorted(
      (manifest.get('options') or {}).items())]
  versions = sorted((manifest.get('versions') or {}).items())
  return ''.join([
      '<h2>Run</h2>', _facts(run),
      '<h2>Models</h2>', _table(['name', 'handle', 'format', 'input', 'dimension', 'index',
                                 'recall@10'], models, numeric=(4, 6)),
      '<h2>Preprocessing</h2>', _facts(sorted(manifest['preprocessing'].items())),
      '<h2>Options</h2>', _facts(options),
      '<h2>Versions</h2>', _facts(versions)])


def counts_section(manifest):
  counts = manifest['counts']
  rates = (manifest.get('throughput') or {}).get('models', {})
  rows = [[name, _number(counts['read']), _number(m['embedded']), _number(m['failed']),
           _number(rates.get(name), 1)] for name, m in counts['models'].items()]
  note = ('read = embedded + failed holds for every model' if counts.get('reconciled')
          else 'WARNING: counts do not reconcile (read != embedded + failed)')
  return '<h2>Counts</h2>%s<p>%s</p>' % (_table(
      ['model', 'read', 'embedded', 'failed', 'images/s'], rows, numeric=(1, 2, 3, 4)),
      escape(note))


def failures_section(manifest):
  reasons = manifest.get('failures_by_reason') or []
  if not reasons:
    return '<h2>Failures</h2><p>None: every image read was embedded by every model.</p>'
  rows = []
  for entry in reasons:
    examples = '<br>'.join('%s: %s' % (escape(e['key']), escape(e['message']))
                           for e in entry['examples'])
    rows.append('<tr><td class="num">%s</td><td>%s</td><td>%s</td><td>%s</td>'
                '<td class="examples">%s</td></tr>' % (
                    escape(_number(entry['count'])), escape(entry['stage']),
                    escape(entry['error']), escape(entry['model'] or 'all models'),
                    examples))
  return ('<h2>Failures by reason</h2><table><tr><th class="num">count</th><th>stage</th>'
          '<th>error</th><th>model</th><th>first examples (key: message)</th></tr>%s'
          '</table>' % ''.join(rows))


def histogram_svg(values, bins=HISTOGRAM_BINS, width=440, height=170):
  """A bar chart of the distribution of `values`, with its range and peak marked."""
  counts, edges = np.histogram(values, bins=bins)
  left, bottom, top = 10, height - 24, 16
  bar_width = (width - 2 * left) / len(counts)
  peak = max(int(counts.max()), 1)
  bars = ''.join(
      '<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="#4a7ab8"><title>%s to %s: '
      '%d</title></rect>' % (left + i * bar_width, bottom - (bottom - top) * c / peak,
                             max(bar_width - 1, 1), (bottom - top) * c / peak,
                             '%.3g' % edges[i], '%.3g' % edges[i + 1], c)
      for i, c in enumerate(counts))
  return ('<svg width="%d" height="%d" role="img"><line x1="%d" y1="%d" x2="%d" y2="%d" '
          'stroke="#999"/>%s<text x="%d" y="%d" font-size="11">%s</text>'
          '<text x="%d" y="%d" font-size="11" text-anchor="end">%s</text>'
          '<text x="%d" y="11" font-size="11">peak %d</text></svg>' % (
              width, height, left, bottom, width - left, bottom, bars, left, height - 8,
              '%.3g' % edges[0], width - left, height - 8, '%.3g' % edges[-1], left, peak))


def norms_section(samples):
  parts = []
  for name, sample in samples.items():
    if sample is None:
      continue
    norms = np.linalg.norm(sample['vectors'], axis=1)
    parts.append('<div><h3>%s</h3>%s<p>%s embeddings: L2 norm from %.3g to %.3g, median '
                 '%.3g</p></div>' % (escape(name), histogram_svg(norms),
                                     _number(len(norms)), norms.min(), norms.max(),
                                     np.median(norms)))
  return '<h2>Embedding norms</h2><div class="models">%s</div>' % ''.join(parts)


def map_svg(pixels, sample, shown, thumbnails, axes=None):
  """One map: a dot per embedding coloured by label, and thumbnails of featured points.
  axes: (x caption, y caption), or None when the axes mean nothing (t-SNE)."""
  labels = [sample['labels'][i] for i in shown]
  keys = [sample['keys'][i] for i in shown]
  colours = label_colours(labels)
  dots = ''.join(
      '<circle cx="%.1f" cy="%.1f" r="3.2" fill="%s" fill-opacity="0.8"><title>%s%s'
      '</title></circle>' % (x, y, colours.get(label, NO_LABEL_COLOUR), escape(key),
                             '' if label is None else ' (%s)' % escape(label))
      for (x, y), key, label in zip(pixels, keys, labels))
  featured = []
  half = MAP_THUMBNAIL_SIDE / 2
  centre = np.array([MAP_WIDTH / 2, MAP_HEIGHT / 2])
  for point in featured_points(pixels, labels):
    # The thumbnail sits beside its point, away from the middle, with a line to it, so
    # that it does not hide the cluster it names.
    direction = pixels[point] - centre
    direction = direction / (np.linalg.norm(direction) or 1.0)
    x, y = np.clip(pixels[point] + direction * (half + 16), half,
                   [MAP_WIDTH - half, MAP_HEIGHT - half - 14])
    leader = '<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="1.5"/>' % (
        pixels[point][0], pixels[point][1], x, y, colours.get(labels[point], NO_LABEL_COLOUR))
    data_uri = thumbnails.get(sample['uris'][shown[point]], MAP_THUMBNAIL_SIDE * 2)
    colour = colours.get(labels[point], NO_LABEL_COLOUR)
    picture = ('<image href="%s" x="%.1f" y="%.1f" width="%d" height="%d" '
               'preserveAspectRatio="xMidYMid slice"/>' % (
                   data_uri, x - half, y - half, MAP_THUMBNAIL_SIDE, MAP_THUMBNAIL_SIDE)
               if data_uri else '')
    caption = ('<text x="%.1f" y="%.1f" font-size="11" text-anchor="middle" '
               'stroke="#fff" stroke-width="3" paint-order="stroke">%s</text>' % (
                   x, y + half + 11, escape(labels[point]))
               if labels[point] is not None else '')
    featured.append('<g><title>%s</title>%s%s<rect x="%.1f" y="%.1f" width="%d" height="%d" '
                    'fill="none" stroke="%s" stroke-width="3"/>%s</g>' % (
                        escape(keys[point]), leader, picture, x - half, y - half,
                        MAP_THUMBNAIL_SIDE, MAP_THUMBNAIL_SIDE, colour, caption))
  captions = ''
  if axes:
    captions = ('<text x="%d" y="%d" font-size="12" fill="#555">%s &#8594;</text>'
                '<text x="12" y="%d" font-size="12" fill="#555" transform="rotate(-90 12 %d)">'
                '%s &#8594;</text>' % (MAP_WIDTH // 2 - 60, MAP_HEIGHT - 8, escape(axes[0]),
                                      MAP_HEIGHT // 2 + 40, MAP_HEIGHT // 2 + 40,
                                      escape(axes[1])))
  return ('<svg class="map" width="%d" height="%d" viewBox="0 0 %d %d" role="img">%s%s%s'
          '</svg>' % (MAP_WIDTH, MAP_HEIGHT, MAP_WIDTH, MAP_HEIGHT, dots, ''.join(featured),
                      captions))


def legend_html(labels):
  colours = label_colours(labels)
  counts = {}
  for label in labels:
    counts[label] = counts.get(label, 0) + 1
  return '<div class="legend">%s</div>' % ''.join(
      '<span><span class="swatch" style="background:%s"></span>%s (%d)</span>'
      % (colours.get(label, NO_LABEL_COLOUR), escape('no label' if label is None else label),
         counts[label]) for label in sorted(counts, key=lambda l: (l is None, str(l))))


def maps_html(name, sample, thumbnails, seed=0):
  """A model's two maps of the same sample (L2-normalized, as the index compares them)."""
  count = len(sample['keys'])
  rng = np.random.default_rng(seed)
  shown = np.sort(rng.choice(count, size=min(count, MAP_POINTS), replace=False))
  vectors = normalize(sample['vectors'][shown])
  pca, shares = pca_2d(vectors)
  tsne = tsne_2d(vectors)
  legend = legend_html([sample['labels'][i] for i in shown])
  return (
      '<h3>%s: neighbourhoods (t-SNE)</h3><p>%s embeddings; images that are near each other '
      'in the embedding space are near each other here; colour = label. Thumbnails show '
      'the most central image of the tightest classes; hover a dot for its key.</p>%s%s'
      '<h3>%s: principal components (PCA)</h3><p>The same embeddings projected on their '
      'first two principal components (a linear view: %.0f%% and %.0f%% of the variance).'
      '</p>%s' % (
          escape(name), _number(len(shown)), map_svg(_scaled(tsne), sample, shown, thumbnails),
          legend, escape(name), 100 * shares[0], 100 * shares[1],
          map_svg(_scaled(pca), sample, shown, thumbnails,
                  ('PC1 (%.0f%% of variance)' % (100 * shares[0]),
                   'PC2 (%.0f%%)' % (100 * shares[1])))))


def map_section(samples, thumbnails):
  return '<h2>Maps of the embeddings</h2>%s' % ''.join(
      maps_html(name, sample, thumbnails) for name, sample in samples.items()
      if sample is not None)


def pick_queries(labels, count=NEIGHBOR_QUERIES, seed=0):
  """Sample images for the neighbour strips: different labels where there are labels."""
  order = np.random.default_rng(seed).permutation(len(labels))
  picked, seen = [], set()
  for i in order:
    if labels[i] is None or labels[i] not in seen:
      picked.append(int(i))
      seen.add(labels[i])
    if len(picked) == count:
      break
  return picked


def neighbors_section(out_dir, model_name, sample, thumbnails):
  """For a few sample images, a strip of their nearest neighbours in the run's index."""
  picks = pick_queries(sample['labels'])
  index, keys, uris = load_index(out_dir, model_name)
  results = search(index, keys, uris, normalize(sample['vectors'][picks]), NEIGHBORS + 1)
  wanted = sorted({n['key'] for result in results for n in result})
  paths = outputs.matching_paths(outputs.embeddings_glob(out_dir, model_name))
  table = outputs.read_parquet(paths, columns=['key', 'label'],
                               filters=[('key', 'in', wanted)])
  label_of = dict(zip(table.column('key').to_pylist(), table.column('label').to_pylist()))
  strips = []
  for pick, result in zip(picks, results):
    query_key, query_label = sample['keys'][pick], sample['labels'][pick]
    cells = ['<div class="query">%s</div>' % figure(
        thumbnails.get(sample['uris'][pick]),
        ['query: ' + query_key] + ([] if query_label is None else ['label: ' + query_label]))]
    neighbors = [n for n in result if n['key'] != query_key][:NEIGHBORS]
    for rank, n in enumerate(neighbors, 1):
      label = label_of.get(n['key'])
      match = '' if query_label is None else ('same' if label == query_label else 'other')
      cells.append('<div class="%s">%s</div>' % (match, figure(
          thumbnails.get(n['uri']),
          ['#%d  cosine %.3f' % (rank, n['score']), n['key']] + (
              [] if label is None else ['label: ' + label]))))
    strips.append('<div class="strip neighbors">%s</div>' % ''.join(cells))
  return ('<h3>%s</h3><p>Nearest neighbours in the index (cosine); a green bar marks a '
          'neighbour with the query\'s label, a red bar another label.</p>%s'
          % (escape(model_name), ''.join(strips)))


def build_report(out_dir):
  """A finished run's directory -> the report page (HTML text)."""
  manifest_path = outputs.output_path(out_dir, outputs.MANIFEST_FILE)
  if not outputs.FileSystems.exists(manifest_path):
    raise ReportError('%s holds no finished run (no %s)' % (out_dir, outputs.MANIFEST_FILE))
  manifest = outputs.read_json(manifest_path)
  names = [m['name'] for m in manifest['models']]
  samples = {name: load_sample(out_dir, name) for name in names}
  thumbnails = Thumbnails(max_pixels_of_run(manifest))
  counts = manifest['counts']
  headline = '%s images read; %s' % (_number(counts['read']), '; '.join(
      '%s: %s embedded, %s failed' % (name, _number(m['embedded']), _number(m['failed']))
      for name, m in counts['models'].items()))
  body = ['<h1>Run report</h1><p>%s</p>' % escape(headline),
          counts_section(manifest), failures_section(manifest), norms_section(samples),
          map_section(samples, thumbnails), '<h2>Nearest neighbours</h2>']
  body.extend(neighbors_section(out_dir, name, sample, thumbnails)
              for name, sample in samples.items() if sample is not None)
  body.append(facts_section(manifest, out_dir))
  return page('Run report: %s' % out_dir, ''.join(body), _REPORT_CSS)


def write_report(out_dir):
  """Writes OUT/report.html for a finished run; returns its path."""
  path = outputs.output_path(out_dir, outputs.REPORT_FILE)
  outputs.write_bytes_atomically(path, build_report(out_dir).encode('utf-8'),
                                 mime_type='text/html')
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m views.run_report',
      description='Write (or rewrite) the HTML report of a finished run: OUT/report.html.')
  parser.add_argument('--run', required=True, metavar='DIR',
                      help='output directory of a finished run_pipeline.py run. '
                           'Example: --run out/')
  args = parser.parse_args(argv)
  try:
    check_cloud_storage_reachable([('--run', args.run)], parser.prog)
    path = write_report(args.run)
  except (ReportError, UnreachableError) as e:
    parser.error(str(e))
  print(path)
  return path


if __name__ == '__main__':
  sys.exit(0 if main() else 1)
