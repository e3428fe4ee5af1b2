"""HTML pages of query_index.py: query images beside their neighbours, near-duplicate groups."""

from views import html

_EXTRA_CSS = """
section { margin-bottom: 2em; }
section h2 { font-size: 1.05em; margin: 0 0 0.5em 0; overflow-wrap: anywhere; }
.query { padding-right: 1em; border-right: 3px solid #4a7; }
"""


def results_page(results, run_dir, model_name, thumbnails=None):
  """query_index results (each with query, query_uri, neighbors) -> one HTML page."""
  thumbnails = thumbnails or html.Thumbnails()
  sections = []
  for number, result in enumerate(results, 1):
    query = html.figure(thumbnails.get(result['query_uri']), ['query', result['query']])
    figures = ['<div class="query">%s</div>' % query]
    figures += [html.figure(thumbnails.get(n['uri']),
                            ['#%d  score %.4f' % (n['rank'], n['score']), n['key']])
                for n in result['neighbors']]
    sections.append('<section><h2>%d. %s</h2><div class="strip">%s</div></section>' % (
        number, html.escape(result['query']), ''.join(figures)))
  title = 'Nearest neighbours in %s (%s)' % (run_dir, model_name)
  body = '<h1>%s</h1>%s' % (html.escape(title), ''.join(sections) or '<p>No queries.</p>')
  return html.page(title, body, _EXTRA_CSS)


def duplicates_page(groups, run_dir, model_name, threshold, thumbnails=None):
  """Near-duplicate groups (each with images and closest score) -> one HTML page."""
  thumbnails = thumbnails or html.Thumbnails()
  sections = []
  for number, group in enumerate(groups, 1):
    figures = [html.figure(thumbnails.get(image['uri']), [image['key']])
               for image in group['images']]
    sections.append(
        '<section><h2>Group %d: %d images, closest pair %.4f</h2>'
        '<div class="strip">%s</div></section>'
        % (number, len(group['images']), group['max_score'], ''.join(figures)))
  title = 'Near-duplicates in %s (%s), cosine at least %g' % (run_dir, model_name, threshold)
  body = '<h1>%s</h1>%s' % (html.escape(title),
                            ''.join(sections) or '<p>No near-duplicates.</p>')
  return html.page(title, body, _EXTRA_CSS)
