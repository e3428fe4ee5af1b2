"""Fuzzing the decode stage with mutated image bytes: it returns pixels or a failure record,
and never raises or hangs.

A short run is part of ./test.sh. A longer one:
  FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -q tests/test_fuzz_decode.py
"""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import imagegen
from schemas.records import DecodedImage, FailureRecord, ImageRecord
from transforms.decode import decode_record

SIZES = [(32, 32), (24, 40)]
EXAMPLES = int(os.environ.get('FUZZ_EXAMPLES', '200'))


def _seeds():
  photo = imagegen.photo(11, 48, 36)
  exif = Image.Exif()
  exif[0x0112] = 6
  return [
      imagegen.encode(photo, 'JPEG', exif=exif.tobytes()),
      imagegen.encode(photo, 'JPEG', progressive=True),
      imagegen.encode(photo.convert('RGBA'), 'PNG'),
      imagegen.encode(photo.convert('P'), 'GIF', save_all=True,
                      append_images=[imagegen.photo(12, 48, 36).convert('P')]),
      imagegen.encode(photo, 'TIFF', compression='tiff_lzw'),
      imagegen.encode(photo, 'WEBP'),
      imagegen.encode(photo, 'BMP'),
      imagegen.bomb_png(12000, 12000),
  ]


SEEDS = _seeds()


@st.composite
def mutated_images(draw):
  """A valid encoded image with a few bytes flipped, cut off, inserted or overwritten,
  mostly near the start, where headers declare sizes, modes and lengths."""
  data = bytearray(draw(st.sampled_from(SEEDS)))
  for _ in range(draw(st.integers(1, 6))):
    kind = draw(st.sampled_from(['flip', 'set', 'truncate', 'insert', 'delete']))
    limit = len(data) - 1 if draw(st.booleans()) else min(len(data) - 1, 64)
    if limit < 1:
      break
    at = draw(st.integers(0, limit))
    if kind == 'flip':
      data[at] ^= 1 << draw(st.integers(0, 7))
    elif kind == 'set':
      data[at] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01]))
    elif kind == 'truncate':
      del data[at:]
    elif kind == 'insert':
      data[at:at] = draw(st.binary(min_size=1, max_size=8))
    else:
      del data[at:at + draw(st.integers(1, 16))]
  return bytes(data)


# Mutated bytes break EXIF blocks by design: Pillow's TIFF reader warns (corrupt data,
# truncated read), and decode keeps the pixels unrotated (it reads such an orientation
# as 1).
@pytest.mark.filterwarnings('ignore::UserWarning:PIL.TiffImagePlugin')
@settings(max_examples=EXAMPLES, deadline=10_000, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(mutated_images(), st.binary(max_size=512)))
def test_decode_returns_pixels_or_a_failure_record(data):
  result = decode_record(ImageRecord(key='k', uri='u', data=data), SIZES)
  assert isinstance(result, (DecodedImage, FailureRecord))
  if isinstance(result, FailureRecord):
    assert (result.key, result.stage) == ('k', 'decode') and result.error and result.message
  else:
    assert result.width >= 1 and result.height >= 1
    for height, width in SIZES:
      pixels = result.pixels[(height, width)]
      assert pixels.shape == (height, width, 3) and pixels.dtype == np.uint8
