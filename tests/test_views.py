"""Shared HTML building blocks: escaping, embedded thumbnails, rendering in Chromium."""

import base64
import io

from PIL import Image

import imagegen
from browser import screenshot
from views import html


def test_escape_makes_markup_inert():
  assert html.escape('<img src=x onerror="alert(1)">&') == (
      '&lt;img src=x onerror=&quot;alert(1)&quot;&gt;&amp;')
  assert html.escape(None) == ''


def test_thumbnail_keeps_aspect_and_fails_soft():
  uri = html.thumbnail_data_uri(imagegen.encode(imagegen.photo(0, 800, 400)))
  assert uri.startswith('data:image/jpeg;base64,')
  image = Image.open(io.BytesIO(base64.b64decode(uri.split(',', 1)[1])))
  assert image.size == (160, 80)
  assert html.thumbnail_data_uri(b'not an image') is None
  assert 'no preview' in html.figure(None, ['k'])


def test_thumbnail_decodes_as_the_run_does():
  # Transparent pixels on white, as the run embeds them (not their hidden colour), and a
  # decompression bomb refused like in the run.
  hidden_red = imagegen.encode(Image.new('RGBA', (64, 64), (255, 0, 0, 0)), 'PNG')
  data = html.thumbnail_data_uri(hidden_red).split(',', 1)[1]
  thumbnail = Image.open(io.BytesIO(base64.b64decode(data))).convert('RGB')
  assert min(thumbnail.getpixel((32, 32))) > 245
  assert html.thumbnail_data_uri(imagegen.bomb_png(12000, 12000)) is None


def test_page_renders_in_chromium(tmp_path):
  body = html.figure(html.thumbnail_data_uri(imagegen.encode(
      Image.new('RGB', (300, 300), (255, 0, 0)))), ['<b>key</b>'])
  page = tmp_path / 'page.html'
  page.write_text(html.page('red <square>', body))
  assert '<b>' not in page.read_text()
  png = screenshot(page, tmp_path / 'page.png', 400, 300)
  pixels = Image.open(png).convert('RGB')
  # The red thumbnail is drawn near the top-left corner, inside the page margin.
  reds = sum(1 for x in range(0, 200, 4) for y in range(0, 200, 4)
             if pixels.getpixel((x, y))[0] > 200 and pixels.getpixel((x, y))[1] < 60)
  assert reds > 100
