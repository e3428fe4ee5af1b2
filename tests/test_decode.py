"""Decode stage: every colour mode to RGB, EXIF orientation, reduced-size JPEG, bad bytes."""

import io

import numpy as np
import pytest
from PIL import Image

import imagegen
from schemas.records import FailureRecord, ImageRecord
from transforms.decode import ImageDecodeError, decode_image, decode_record

SIZE = (64, 64)


def decode(data, sizes=(SIZE,)):
  return decode_image(data, list(sizes))


def test_rgb_jpeg_sizes_and_dtype():
  width, height, pixels = decode(imagegen.encode(imagegen.photo(0, 320, 240)),
                                 [(64, 64), (32, 48)])
  assert (width, height) == (320, 240)
  assert pixels[(64, 64)].shape == (64, 64, 3) and pixels[(64, 64)].dtype == np.uint8
  assert pixels[(32, 48)].shape == (32, 48, 3)


@pytest.mark.parametrize('mode', ['L', 'LA', 'P', 'RGBA', 'CMYK', 'I;16', 'I', '1'])
def test_every_mode_becomes_rgb(mode):
  source = imagegen.photo(1, 80, 60)
  if mode == 'I;16':
    values = (np.asarray(source.convert('L'), dtype=np.uint16) * 257)
    image = Image.fromarray(values)
    assert image.mode == 'I;16'
  else:
    image = source.convert(mode)
  image_format = 'TIFF' if mode in ('CMYK', 'I') else 'PNG'
  _, _, pixels = decode(imagegen.encode(image, image_format))
  assert pixels[SIZE].shape == (64, 64, 3)
  if mode in ('I;16', 'I', 'L'):
    # 16-bit samples are scaled to 8 bits, not clipped to white.
    expected = np.asarray(source.convert('L').resize((64, 64), Image.BILINEAR))
    assert np.abs(pixels[SIZE][..., 0].astype(int) - expected).mean() < 3


def test_transparent_pixels_become_white():
  image = Image.new('RGBA', (64, 64), (10, 200, 30, 0))
  _, _, pixels = decode(imagegen.encode(image, 'PNG'))
  assert (pixels[SIZE] == 255).all()


def with_orientation(image, orientation):
  exif = Image.Exif()
  exif[0x0112] = orientation
  return imagegen.encode(image, 'JPEG', exif=exif.tobytes(), quality=95)


def test_exif_orientation_is_applied():
  upright = imagegen.photo(2, 120, 80)
  # Orientation 6 means: rotate 90 degrees clockwise to display. Store it rotated back.
  stored = upright.transpose(Image.ROTATE_90)
  width, height, pixels = decode(with_orientation(stored, 6))
  assert (width, height) == (120, 80)
  _, _, reference = decode(imagegen.encode(upright, 'JPEG', quality=95))
  assert np.abs(pixels[SIZE].astype(int) - reference[SIZE]).mean() < 4


def test_reduced_size_jpeg_decoding_is_close_to_full_decoding():
  data = imagegen.encode(imagegen.photo(3, 2000, 1500), 'JPEG', quality=90)
  _, _, fast = decode(data, [(160, 160)])
  full = np.asarray(Image.open(io.BytesIO(data)).convert('RGB').resize((160, 160),
                                                                        Image.BILINEAR))
  assert np.abs(fast[(160, 160)].astype(int) - full).mean() < 2.0


@pytest.mark.parametrize('data,fragment', [
    (b'', 'empty file'),
    (b'hello, I am a text file\n', 'unsupported or unrecognized image format'),
    (bytes(range(256)) * 4, 'unsupported or unrecognized image format'),
])
def test_bad_bytes_raise_clear_errors(data, fragment):
  with pytest.raises(ImageDecodeError, match=fragment):
    decode(data)


def test_truncated_jpeg_fails():
  with pytest.raises(OSError):
    decode(imagegen.encode(imagegen.photo(4))[:500])


def test_decompression_bomb_is_refused_before_decoding():
  bomb = imagegen.bomb_png(100_000, 100_000)
  assert len(bomb) < 200
  with pytest.raises(ImageDecodeError, match='decompression bomb'):
    decode_image(bomb, [SIZE])


def test_decode_record_returns_failure_record_with_reason():
  result = decode_record(ImageRecord(key='k', uri='u', data=b'nope'), [SIZE])
  assert isinstance(result, FailureRecord)
  assert (result.key, result.uri, result.stage, result.error) == (
      'k', 'u', 'decode', 'ImageDecodeError')


def test_decode_record_keeps_metadata_and_hash():
  import hashlib  # pylint: disable=import-outside-toplevel
  data = imagegen.encode(imagegen.photo(5))
  result = decode_record(ImageRecord(key='k', uri='u', data=data, label='cat',
                                     metadata='{"a": 1}'), [SIZE])
  assert result.sha256 == hashlib.sha256(data).hexdigest()
  assert (result.label, result.metadata) == ('cat', '{"a": 1}')
