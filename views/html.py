"""Building blocks shared by every HTML page: escaping, embedded thumbnails, the page shell."""

import base64
import html
import io

from transforms.decode import MAX_IMAGE_PIXELS, load_image
from transforms.read import read_uri_bytes

THUMBNAIL_SIDE = 160

_BASE_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1, h2 { font-weight: 600; }
table { border-collapse: collapse; }
td, th { padding: 0.25em 0.6em; border-bottom: 1px solid #ddd; text-align: left; }
.strip { display: flex; flex-wrap: wrap; gap: 0.6em; align-items: flex-start; }
figure { margin: 0; width: %dpx; font-size: 0.8em; overflow-wrap: anywhere; }
figure img { max-width: %dpx; max-height: %dpx; display: block; background: #eee; }
.missing { width: %dpx; height: %dpx; background: #eee; display: flex;
           align-items: center; justify-content: center; color: #888; }
""" % ((THUMBNAIL_SIDE,) * 5)


def escape(value):
  """Any value from the inputs (keys, paths, labels) as inert HTML text."""
  return html.escape('' if value is None else str(value), quote=True)


def thumbnail_data_uri(data, side=THUMBNAIL_SIDE, max_pixels=MAX_IMAGE_PIXELS):
  """Encoded image bytes -> a small JPEG data: URI (aspect ratio kept), or None when the
  bytes are not a decodable image. Embedded, so the page needs no file access."""
  try:
    # As the run decodes: the same formats, size limit and colour conversion.
    image, _, _ = load_image(data, side * 2, max_pixels)
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', quality=80)
  except Exception:  # pylint: disable=broad-except
    return None
  return 'data:image/jpeg;base64,' + base64.b64encode(buffer.getvalue()).decode('ascii')


class Thumbnails:
  """uri -> embedded thumbnail (None when unreadable now: the page shows a grey box),
  each image read at most once per side however often it appears on a page."""

  def __init__(self, max_pixels=MAX_IMAGE_PIXELS, reader=read_uri_bytes):
    self._max_pixels = max_pixels  # the run's: its largest images are shown too
    self._reader = reader
    self._cache = {}

  def get(self, uri, side=THUMBNAIL_SIDE):
    key = (uri, side)
    if key not in self._cache:
      try:
        data = self._reader(uri)
      except Exception:  # pylint: disable=broad-except
        data = None  # the inputs moved or are unreadable
      self._cache[key] = thumbnail_data_uri(data, side, self._max_pixels) if data else None
    return self._cache[key]


def figure(data_uri, caption_lines):
  """A thumbnail (or a grey box when missing) with escaped caption lines."""
  if data_uri:
    picture = '<img src="%s" alt="">' % data_uri
  else:
    picture = '<div class="missing">no preview</div>'
  captions = '<br>'.join(escape(line) for line in caption_lines)
  return '<figure>%s<figcaption>%s</figcaption></figure>' % (picture, captions)


def page(title, body, extra_css=''):
  """A complete, self-contained HTML document (no external resources)."""
  return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
          '<meta name="viewport" content="width=device-width, initial-scale=1">'
          '<title>%s</title><style>%s%s</style></head><body>%s</body></html>\n'
          % (escape(title), _BASE_CSS, extra_css, body))
