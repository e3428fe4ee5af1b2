"""A Beam filesystem kept in this process's memory (mem://), which only Beam can read.

Importing this module registers the scheme with Beam. Nothing under mem:// exists on the
local disk or for TensorFlow, so code that opens a user path with anything other than
Beam's FileSystems fails on it.
"""

import io
import posixpath
import threading
import time

from apache_beam.io.filesystem import (BeamIOError, CompressedFile, CompressionTypes,
                                       FileMetadata, FileSystem)

SCHEME = 'mem'
PREFIX = SCHEME + '://'

_FILES = {}  # path -> (bytes, time written)
_LOCK = threading.Lock()


def clear():
  with _LOCK:
    _FILES.clear()


def all_paths():
  with _LOCK:
    return sorted(_FILES)


class _Writer(io.BytesIO):
  """Stores its bytes under its path when closed, as a finished upload would."""

  def __init__(self, path):
    super().__init__()
    self._path = path

  def close(self):
    if not self.closed:
      with _LOCK:
        _FILES[self._path] = (self.getvalue(), time.time())
    super().close()


def _with_compression(raw, path, compression_type):
  if compression_type == CompressionTypes.AUTO:
    compression_type = CompressionTypes.detect_compression_type(path)
  if compression_type == CompressionTypes.UNCOMPRESSED:
    return raw
  return CompressedFile(raw, compression_type=compression_type)


def _each(paths, action):
  """Beam's contract: try every path, then raise one BeamIOError naming the failures."""
  failures = {}
  for path in paths:
    try:
      action(path)
    except Exception as e:  # pylint: disable=broad-except
      failures[path] = e
  if failures:
    raise BeamIOError('mem:// operation failed', failures)


class MemoryFileSystem(FileSystem):
  """Flat object store like gs://: no directories, only paths with a common prefix."""

  @classmethod
  def scheme(cls):
    return SCHEME

  def join(self, basepath, *paths):
    return posixpath.join(basepath, *[p.lstrip('/') for p in paths])

  def split(self, path):
    head, tail = posixpath.split(path)
    return head, tail

  def has_dirs(self):
    return False

  def mkdirs(self, path):
    pass  # object stores have no directories

  def _list(self, dir_or_prefix):
    with _LOCK:
      items = [(p, len(data), written) for p, (data, written) in _FILES.items()
               if p.startswith(dir_or_prefix)]
    for path, size, written in items:
      yield FileMetadata(path, size, written)

  def create(self, path, mime_type='application/octet-stream',
             compression_type=CompressionTypes.AUTO):
    return _with_compression(_Writer(path), path, compression_type)

  def open(self, path, mime_type='application/octet-stream',
           compression_type=CompressionTypes.AUTO):
    with _LOCK:
      if path not in _FILES:
        raise FileNotFoundError('no file %s' % path)
      data = _FILES[path][0]
    return _with_compression(io.BytesIO(data), path, compression_type)

  def copy(self, source_file_names, destination_file_names):
    def copy_one(pair):
      with _LOCK:
        _FILES[pair[1]] = _FILES[pair[0]]
    _each(list(zip(source_file_names, destination_file_names)), copy_one)

  def rename(self, source_file_names, destination_file_names):
    def rename_one(pair):
      with _LOCK:
        _FILES[pair[1]] = _FILES.pop(pair[0])
    _each(list(zip(source_file_names, destination_file_names)), rename_one)

  def exists(self, path):
    with _LOCK:
      return path in _FILES

  def size(self, path):
    with _LOCK:
      return len(_FILES[path][0])

  def last_updated(self, path):
    with _LOCK:
      return _FILES[path][1]

  def checksum(self, path):
    with _LOCK:
      return str(hash(_FILES[path][0]))

  def metadata(self, path):
    with _LOCK:
      data, written = _FILES[path]
    return FileMetadata(path, len(data), written)

  def delete(self, paths):
    def delete_one(path):
      with _LOCK:
        # As on gs://, a path that is a "directory" deletes everything under it.
        doomed = [p for p in _FILES if p == path or p.startswith(path.rstrip('/') + '/')]
        if not doomed:
          raise FileNotFoundError('no file %s' % path)
        for p in doomed:
          del _FILES[p]
    _each(paths, delete_one)
