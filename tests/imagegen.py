"""Generated test photos: smooth colour fields with shapes, in any format and mode."""

import io

import numpy as np
from PIL import Image, ImageDraw


def photo(seed, width=320, height=240):
  """A deterministic RGB image with gradients and shapes, different for every seed."""
  rng = np.random.default_rng(seed)
  low = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
  image = Image.fromarray(low, 'RGB').resize((width, height), Image.BICUBIC)
  draw = ImageDraw.Draw(image)
  for _ in range(6):
    x0, y0 = rng.integers(0, width), rng.integers(0, height)
    x1, y1 = x0 + rng.integers(10, width // 2), y0 + rng.integers(10, height // 2)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    if rng.random() < 0.5:
      draw.ellipse([x0, y0, x1, y1], fill=colour)
    else:
      draw.rectangle([x0, y0, x1, y1], fill=colour)
  return image


def encode(image, image_format='JPEG', **params):
  buffer = io.BytesIO()
  image.save(buffer, format=image_format, **params)
  return buffer.getvalue()


def write_photo_tree(root, count=12, classes=('cats', 'dogs', 'boats')):
  """root/<class>/<n>.jpg|png photos; returns the written paths."""
  paths = []
  for n in range(count):
    folder = root / classes[n % len(classes)]
    folder.mkdir(parents=True, exist_ok=True)
    image_format = 'PNG' if n % 4 == 3 else 'JPEG'
    path = folder / ('%03d.%s' % (n, 'png' if image_format == 'PNG' else 'jpg'))
    path.write_bytes(encode(photo(n, 320 + 16 * n, 240), image_format))
    paths.append(path)
  return paths


def bomb_png(width, height):
  """A tiny PNG whose header declares width x height pixels (a decompression bomb)."""
  import struct  # pylint: disable=import-outside-toplevel
  import zlib  # pylint: disable=import-outside-toplevel
  data = bytearray(encode(Image.new('L', (1, 1)), 'PNG'))
  # IHDR's payload starts at byte 16: width, height (big-endian), then 5 bytes; CRC after.
  data[16:24] = struct.pack('>II', width, height)
  data[29:33] = struct.pack('>I', zlib.crc32(bytes(data[12:29])))
  return bytes(data)
