"""Typed records that flow between the pipeline's stages."""

import hashlib
import re
from typing import NamedTuple, Optional

import numpy as np

# Failure stages, in the order an image passes through them.
STAGE_READ = 'read'
STAGE_DECODE = 'decode'
STAGE_EMBED = 'embed'

# Tag of the side output that carries FailureRecords out of a stage.
FAILURES_TAG = 'failures'


class ImageRecord(NamedTuple):
  """One encoded image as read from its source, before any decoding."""
  key: str
  uri: str
  data: bytes
  label: Optional[str] = None
  metadata: Optional[str] = None  # JSON text of whatever else the source carries
  sha256: Optional[str] = None  # content_sha256 of data, once a stage has computed it
  # An image file's size and modification time as listed (None for a shard's records),
  # by which a later resume finds it unchanged without reading it.
  file_size: Optional[int] = None
  file_modified: Optional[float] = None


class DecodedImage(NamedTuple):
  """One image decoded once and resized to every input size the models need."""
  key: str
  uri: str
  width: int  # of the original image, after EXIF orientation
  height: int
  sha256: str  # content_sha256 of the encoded bytes
  pixels: dict  # (height, width) -> uint8 array of shape (height, width, 3)
  label: Optional[str] = None
  metadata: Optional[str] = None
  file_size: Optional[int] = None
  file_modified: Optional[float] = None


def utf8_text(text):
  """Text as every output stores it (Parquet strings, JSON, the terminal): valid UTF-8.
  A file name holding bytes that are not UTF-8 (an old Latin-1 archive) comes from the
  operating system with each such byte as a lone surrogate; it is written \\xNN instead
  (caf\\xe9.jpg), which transforms.read.local_path_of turns back into the file's name."""
  try:
    text.encode('utf-8')
    return text
  except UnicodeEncodeError:
    try:
      return text.encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')
    except UnicodeEncodeError:  # a surrogate that stands for no byte
      return text.encode('utf-8', 'backslashreplace').decode('utf-8')


_CONTROL_CHARACTERS = re.compile('[\x00-\x1f\x7f-\x9f]')


def terminal_text(text):
  """Text for one line of a terminal: control characters that a file name may hold (a
  newline, the escape that starts a terminal's commands) written as \\n, \\x1b."""
  return _CONTROL_CHARACTERS.sub(
      lambda match: match.group().encode('unicode_escape').decode('ascii'), text)


def as_utf8(record):
  """A record with every text field made utf8_text (a no-op for almost every record)."""
  changed = {name: utf8_text(value) for name, value in zip(record._fields, record)
             if isinstance(value, str) and not value.isascii()}
  return record._replace(**changed) if changed else record


def content_sha256(data):
  """The sha256 column of an embedding row: hex SHA-256 of the image's encoded bytes, by
  which a resumed run tells an input changed since it was embedded."""
  return hashlib.sha256(data).hexdigest()


class Embedding(NamedTuple):
  """One image's feature vector from one model."""
  image: DecodedImage
  model: str
  vector: np.ndarray  # float32, shape (dim,)


class FailureRecord(NamedTuple):
  """Why an input did not become an embedding; written, never dropped."""
  key: str
  uri: str
  stage: str
  error: str  # exception type name
  message: str
  model: Optional[str] = None  # set only when one model failed (stage embed)

  @classmethod
  def from_exception(cls, key, uri, stage, exc, model=None):
    message = str(exc) or repr(exc)
    return cls(key=key, uri=uri, stage=stage, error=type(exc).__name__,
               message=message[:2000], model=model)
