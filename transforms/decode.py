"""Decode stage: encoded bytes -> RGB uint8 pixels at every model input size, decoded once."""

import io
import re
import warnings

import apache_beam as beam
import numpy as np
from PIL import Image, ImageOps, JpegImagePlugin

from schemas.records import (FAILURES_TAG, STAGE_DECODE, DecodedImage, FailureRecord, ImageRecord,
                             content_sha256)
from transforms.failures import route_failures

# By default, an image that would decode to more pixels than this is refused before its
# pixels are decoded: a small file can declare enormous dimensions (a "decompression
# bomb"). A JPEG counts the pixels of its reduced-size decode, so a 200-megapixel phone
# photo (3 million pixels at 1/8 scale) is embedded; other formats decode in full.
# --max_image_pixels changes it for a run (big scans), recorded in the manifest.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS  # Pillow's warning threshold, about 89 million
_JPEG_START = b'\xff\xd8\xff'
# JPEG draft (DCT-domain downscaling) keeps at least this multiple of the target size.
# libjpeg's scaled IDCT is itself a proper low-pass (1/8 scale averages each 8x8 block),
# so decoding straight to between 1x and 2x the target loses nothing the final
# antialiased resize would keep, and a smooth 3000x2000 JPEG decodes a third faster than
# at 2x (less on detailed files, where the entropy decoding, the same at every scale,
# dominates).
DRAFT_MARGIN = 1
_ROTATING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_ALPHA_MODES = ('RGBA', 'LA', 'PA', 'RGBa', 'La')
# The only formats Pillow may open. Others are refused as unsupported: some of Pillow's
# plugins hand the bytes to external programs (EPS is run by Ghostscript), and rarely
# used decoders are attack surface that photo collections do not need.
DECODABLE_FORMATS = ('JPEG', 'PNG', 'GIF', 'BMP', 'TIFF', 'WEBP', 'AVIF', 'PPM')

# Pillow chooses a file's format from its first 16 bytes (Image.open reads no more for it).
IDENTIFYING_BYTES = 16

# Recorded in the manifest, so a query embeds its images exactly as the run did.
PREPROCESSING = {
    'decoder': 'Pillow',
    'exif_orientation': 'applied',
    'formats': ', '.join(DECODABLE_FORMATS),
    'color': 'converted to RGB; alpha composited onto white; 16-bit scaled to 8-bit',
    'jpeg_draft': 'DCT downscaling to no less than %dx the input size' % DRAFT_MARGIN,
    'resize': 'whole image to the model input size (aspect ratio not kept), '
              'Pillow BILINEAR with antialiasing',
    'transport': 'uint8 RGB to the model call, which scales it to float32 [0, 1] '
                 '(SavedModels, float TFLite inputs) or feeds the codes as they are '
                 '(quantized TFLite inputs; int8 ones less 128)',
}


def preprocessing_record(max_pixels=MAX_IMAGE_PIXELS):
  """The manifest's preprocessing entry of a run with this pixel limit."""
  return dict(PREPROCESSING, max_image_pixels=max_pixels)


def max_pixels_of_run(manifest):
  """The pixel limit a finished run decoded with (runs made before the limit was
  recorded used the default)."""
  return manifest.get('preprocessing', {}).get('max_image_pixels', MAX_IMAGE_PIXELS)


def decode_sizes_of_run(manifest):
  """The input sizes a finished run decoded every image to at once. A JPEG's reduced-size
  decode follows the largest of them, so one model's pixels depend on the others': a
  query must decode to all of them to get the pixels the run embedded."""
  return sorted({tuple(model['input_size']) for model in manifest['models']})


def may_be_decodable(prefix):
  """Whether a file beginning with these IDENTIFYING_BYTES may be an image of a format
  this stage decodes. When not, decoding the prefix alone fails exactly as decoding the
  whole file would: Pillow finds no format that accepts it."""
  Image.init()
  for name in DECODABLE_FORMATS:
    if name in Image.OPEN:
      accept = Image.OPEN[name][1]
      if accept is None or accept(prefix):
        return True
  return False


class ImageDecodeError(ValueError):
  """An input that is not an image this pipeline can decode."""


def _to_rgb(image):
  """Any Pillow mode -> RGB, without clipping 16-bit data or keeping random colours
  under transparent pixels."""
  if image.mode == 'RGB':
    return image
  if image.mode == 'P' and 'transparency' in image.info:
    image = image.convert('RGBA')
  if image.mode in _ALPHA_MODES:
    image = image.convert('RGBA')
    background = Image.new('RGBA', image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert('RGB')
  if image.mode.startswith('I') or image.mode == 'F':
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    # 16-bit data (mode I;16, or I holding 16-bit PNG samples) is scaled, not clipped;
    # floating-point samples within [0, 1] are scaled up, not rounded to black.
    if image.mode.startswith('I;16') or values.max(initial=0) > 255:
      values = values / 257.0
    elif image.mode == 'F' and values.max(initial=0) <= 1.0:
      values = values * 255.0
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert('RGB')
  return image.convert('RGB')


def _orientation(image):
  try:
    return int(image.getexif().get(0x0112, 1))
  except Exception:  # pylint: disable=broad-except
    return 1  # unreadable EXIF: the pixels are still good


_POSSIBLE_BOMB_PIXELS = re.compile(r'Image size \((\d+) pixels\)')


def _too_many_pixels(declared, max_pixels):
  return ('image declares %s pixels, more than the limit of %d (possible decompression '
          'bomb; --max_image_pixels raises the limit)' % (declared, max_pixels))


def load_image(data, draft_side, max_pixels=MAX_IMAGE_PIXELS):
  """Encoded image bytes -> (upright RGB Pillow image, width, height).

  A JPEG is decoded at reduced size, to no less than draft_side on each side when it is
  larger; width and height are the original image's, after EXIF orientation. Raises
  ImageDecodeError (or Pillow's own error) for anything that is not a decodable image,
  and for an image that would decode to more than max_pixels pixels.
  """
  if not data:
    raise ImageDecodeError('empty file (0 bytes)')
  try:
    if data.startswith(_JPEG_START):
      # Opened by the JPEG plugin itself: Image.open would refuse a JPEG by its declared
      # size, before the reduced-size decode that the check below counts. The factory
      # still tells an MPO (a phone's multi-picture JPEG) from a plain JPEG.
      image = JpegImagePlugin.jpeg_factory(io.BytesIO(data))
    else:
      # Pillow refuses from twice its process-wide limit, whatever the run's; raised
      # (never lowered, nor set when the program turned it off with None) to this
      # run's, the check below decides for every format.
      if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
      with warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)
        image = Image.open(io.BytesIO(data), formats=DECODABLE_FORMATS)
  except Image.UnidentifiedImageError as e:
    raise ImageDecodeError('unsupported or unrecognized image format') from e
  except Image.DecompressionBombError as e:
    # Pillow's own refusal, from twice its limit (which is at least this run's): said as
    # the check below says it, with the run's limit, not Pillow's doubled one.
    declared = _POSSIBLE_BOMB_PIXELS.search(str(e))
    raise ImageDecodeError(_too_many_pixels(declared.group(1) if declared else 'more',
                                            max_pixels)) from e
  width, height = image.size
  if isinstance(image, JpegImagePlugin.JpegImageFile):
    image.draft(None, (draft_side, draft_side))
  if image.size[0] * image.size[1] > max_pixels:
    raise ImageDecodeError(_too_many_pixels('%dx%d' % (width, height), max_pixels))
  orientation = _orientation(image)
  if orientation in _ROTATING_ORIENTATIONS:
    width, height = height, width
  image.load()  # animated formats: the first frame
  if orientation != 1:
    image = ImageOps.exif_transpose(image)
  return _to_rgb(image), width, height


def decode_image(data, sizes, max_pixels=MAX_IMAGE_PIXELS):
  """Encoded image bytes -> (width, height, {(h, w): uint8 array (h, w, 3)}), see
  load_image."""
  image, width, height = load_image(data, max(max(size) for size in sizes) * DRAFT_MARGIN,
                                    max_pixels)
  pixels = {}
  for size in sizes:
    target_height, target_width = size
    resized = image if image.size == (target_width, target_height) else image.resize(
        (target_width, target_height), Image.BILINEAR)
    pixels[size] = np.asarray(resized, dtype=np.uint8)
  return width, height, pixels


def decode_record(record: ImageRecord, sizes, max_pixels=MAX_IMAGE_PIXELS):
  """ImageRecord -> DecodedImage, or a FailureRecord (stage decode) saying why not."""
  try:
    width, height, pixels = decode_image(record.data, sizes, max_pixels)
  except Exception as e:  # pylint: disable=broad-except
    return FailureRecord.from_exception(record.key, record.uri, STAGE_DECODE, e)
  return DecodedImage(key=record.key, uri=record.uri, width=width, height=height,
                      sha256=record.sha256 or content_sha256(record.data), pixels=pixels,
                      label=record.label, metadata=record.metadata,
                      file_size=record.file_size, file_modified=record.file_modified)


class DecodeImages(beam.PTransform):
  """ImageRecords -> DecodedImages at the given (height, width) sizes, with tagged
  output 'failures'."""

  def __init__(self, sizes, max_pixels=MAX_IMAGE_PIXELS):
    super().__init__()
    self._sizes = tuple(sorted(set(tuple(s) for s in sizes)))
    self._max_pixels = max_pixels

  def expand(self, images):
    sizes, max_pixels = self._sizes, self._max_pixels

    return images | 'Decode' >> beam.FlatMap(
        lambda record: route_failures([decode_record(record, sizes, max_pixels)])).with_outputs(
            FAILURES_TAG, main='decoded')
