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
  with pytest.raises(ImageDecodeError) as error:
    decode_image(bomb, [SIZE])
  # Beyond twice Pillow's limit Pillow refuses first; the reason still names the run's.
  assert str(error.value) == (
      'image declares 10000000000 pixels, more than the limit of %d (possible decompression '
      'bomb; --max_image_pixels raises the limit)' % Image.MAX_IMAGE_PIXELS)
  near = imagegen.bomb_png(10_000, 10_000)  # above the limit, below Pillow's refusal
  with pytest.raises(ImageDecodeError, match='^image declares 10000x10000 pixels, more than '
                     'the limit of %d ' % Image.MAX_IMAGE_PIXELS):
    decode_image(near, [SIZE])


@pytest.mark.parametrize('image_format', ['PNG', 'JPEG'])
def test_pixel_limit_is_the_callers(image_format):
  # 30,000 pixels, smaller than the input size: a JPEG too decodes at full size.
  scan = imagegen.encode(imagegen.photo(5, 200, 150), image_format)
  with pytest.raises(ImageDecodeError, match='limit of 10000 .*--max_image_pixels'):
    decode_image(scan, [(224, 224)], max_pixels=10_000)
  width, height, _ = decode_image(scan, [(224, 224)], max_pixels=30_000)
  assert (width, height) == (200, 150)


def test_raised_limit_goes_beyond_pillows_own(monkeypatch):
  # Pillow refuses from twice its process-wide limit before any check of ours runs.
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1_000)
  scan = imagegen.encode(imagegen.photo(6, 200, 150), 'PNG')
  width, height, pixels = decode_image(scan, [SIZE], max_pixels=40_000)
  assert (width, height) == (200, 150) and pixels[SIZE].shape == SIZE + (3,)
  with pytest.raises(ImageDecodeError, match='decompression bomb'):
    decode_image(scan, [SIZE], max_pixels=20_000)
  # A program that turned Pillow's check off still gets ours.
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', None)
  with pytest.raises(ImageDecodeError, match='limit of 20000'):
    decode_image(scan, [SIZE], max_pixels=20_000)
  assert decode_image(scan, [SIZE], max_pixels=40_000)[:2] == (200, 150)


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


def _reference(image):
  return np.asarray(image.convert('RGB').resize((64, 64), Image.BILINEAR)).astype(int)


@pytest.mark.parametrize('image_format,params', [
    ('TIFF', {}), ('TIFF', {'compression': 'tiff_lzw'}), ('WEBP', {'lossless': True}),
    ('GIF', {}), ('BMP', {}), ('PNG', {}), ('PPM', {})])
def test_lossless_formats_decode_to_their_pixels(image_format, params):
  image = imagegen.photo(6, 90, 70)
  if image_format == 'GIF':
    image = image.convert('P')
  width, height, pixels = decode(imagegen.encode(image, image_format, **params))
  assert (width, height) == (90, 70)
  assert np.abs(pixels[SIZE].astype(int) - _reference(image)).max() <= 1


def test_animated_images_give_their_first_frame():
  first, second = imagegen.photo(7, 90, 70), imagegen.photo(8, 90, 70)
  for image_format, params in (('GIF', {}), ('WEBP', {'lossless': True}), ('TIFF', {})):
    data = imagegen.encode(first, image_format, save_all=True, append_images=[second], **params)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    _, _, pixels = decode(data)
    single = Image.open(io.BytesIO(imagegen.encode(first, image_format, **params)))
    assert np.abs(pixels[SIZE].astype(int) - _reference(single)).max() <= 1


def test_float_tiff_in_unit_range_is_scaled_not_black():
  gray = imagegen.photo(9, 80, 60).convert('L')
  data = imagegen.encode(Image.fromarray(np.asarray(gray, dtype=np.float32) / 255.0), 'TIFF')
  _, _, pixels = decode(data)
  assert np.abs(pixels[SIZE][..., 0].astype(int) - _reference(gray)[..., 0]).mean() < 2


@pytest.mark.parametrize('width,height', [(1, 1), (10000, 50), (50, 10000)])
def test_extreme_shapes(width, height):
  image = (imagegen.photo(10, width, height) if min(width, height) > 20 else
           Image.new('RGB', (width, height), (200, 30, 30)))
  got_width, got_height, pixels = decode(imagegen.encode(image))
  assert (got_width, got_height) == (width, height)
  assert pixels[SIZE].shape == (64, 64, 3)


def test_postscript_is_never_handed_to_ghostscript():
  # Pillow's EPS plugin would run Ghostscript on the bytes: a program from the input.
  eps = b'%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n(x) print showpage\n'
  with pytest.raises(ImageDecodeError, match='unsupported or unrecognized image format'):
    decode(eps)


_CAPPED_DECODE = (
    'import resource, sys\n'
    'from transforms.decode import decode_record\n'
    'from schemas.records import ImageRecord\n'
    'vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024\n'
    'resource.setrlimit(resource.RLIMIT_AS, (vm + 200 * 2**20, resource.RLIM_INFINITY))\n'
    'data = open(sys.argv[1], "rb").read()\n'
    'result = decode_record(ImageRecord("k", "u", data), [(224, 224)])\n'
    'print(getattr(result, "message", None) or "%dx%d" % (result.width, result.height))\n')


def _decode_with_200_mb_to_spare(path):
  """Decodes the file in a process with 200 MB of address space to spare; its output."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  from conftest import PROJECT  # pylint: disable=import-outside-toplevel
  result = subprocess.run([sys.executable, '-c', _CAPPED_DECODE, str(path)], cwd=str(PROJECT),
                          capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout.strip()


@pytest.mark.parametrize('image_format', ['PNG', 'GIF', 'TIFF', 'BMP'])
def test_bombs_in_every_format_are_refused_in_a_capped_process(tmp_path, image_format):
  """A 12000x12000 header (between Pillow's warning and error thresholds) is refused
  before its pixels are allocated: the decode runs with 200 MB of address space to spare,
  less than its 432 MB of RGB pixels."""
  bomb = tmp_path / 'bomb'
  bomb.write_bytes(_declared_size(image_format, 12000, 12000))
  assert 'decompression bomb' in _decode_with_200_mb_to_spare(bomb)


def test_a_108_megapixel_jpeg_is_embedded_from_its_reduced_size_decode(tmp_path):
  """A phone's 108 MP photo (12000x9000) declares more pixels than the limit, but decodes
  at 1/8 scale: embedded, in less memory than its 324 MB of full-size pixels."""
  photo = tmp_path / 'phone.jpg'
  photo.write_bytes(imagegen.encode(
      Image.radial_gradient('L').resize((12000, 9000)).convert('RGB'), quality=80))
  assert _decode_with_200_mb_to_spare(photo) == '12000x9000'


def test_a_jpeg_declaring_the_largest_size_is_a_failure_record(tmp_path):
  # 65535x65535 is the most a JPEG can declare: no limit refuses it (its 1/8-scale decode
  # is under the limit), and a tiny file behind it fails on its data.
  bomb = tmp_path / 'bomb.jpg'
  bomb.write_bytes(_declared_size('JPEG', 65535, 65535))
  assert 'broken data stream' in _decode_with_200_mb_to_spare(bomb)


def _declared_size(image_format, width, height):
  """A small file of the format whose header declares width x height pixels."""
  import struct  # pylint: disable=import-outside-toplevel
  if image_format == 'PNG':
    return imagegen.bomb_png(width, height)
  if image_format == 'TIFF':
    return _tiff_with_size(width, height)
  data = bytearray(imagegen.encode(Image.new('L' if image_format != 'GIF' else 'P', (1, 1)),
                                   image_format))
  if image_format == 'GIF':
    data[6:10] = struct.pack('<HH', width, height)  # logical screen
    start = data.index(b',')  # image descriptor
    data[start + 5:start + 9] = struct.pack('<HH', width, height)
  elif image_format == 'BMP':
    data[18:26] = struct.pack('<ii', width, height)
  elif image_format == 'JPEG':
    start = data.index(b'\xff\xc0')  # start of frame: precision, height, width
    data[start + 5:start + 9] = struct.pack('>HH', height, width)
  return bytes(data)


def _tiff_with_size(width, height):
  """A minimal little-endian TIFF header whose only IFD declares width x height, 8-bit gray."""
  import struct  # pylint: disable=import-outside-toplevel
  entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1),
             (262, 3, 1, 1), (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height),
             (279, 4, 1, 1)]
  ifd = struct.pack('<H', len(entries)) + b''.join(
      struct.pack('<HHII', tag, kind, count, value) for tag, kind, count, value in entries)
  return b'II*\x00' + struct.pack('<I', 8 + 1) + b'\x00' + ifd + struct.pack('<I', 0)


def test_a_multi_picture_jpeg_is_decoded_at_reduced_size_like_a_jpeg():
  # Phones write MPO files (a JPEG followed by more pictures); Pillow opens them as 'MPO'.
  first, second = imagegen.photo(11, 1000, 800), imagegen.photo(12, 1000, 800)
  mpo = imagegen.encode(first, 'MPO', save_all=True, append_images=[second], quality=90)
  assert Image.open(io.BytesIO(mpo)).format == 'MPO'
  np.testing.assert_array_equal(decode(mpo)[2][SIZE],
                                decode(imagegen.encode(first, 'JPEG', quality=90))[2][SIZE])
