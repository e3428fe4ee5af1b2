"""Read stage: input patterns -> ImageRecords (files, TFRecord shards, WebDataset tars)."""

import io
import itertools
import json
import os
import posixpath
import re
import stat
import struct
import tarfile
from typing import NamedTuple, Optional

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes, FileMetadata, FileSystem
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.tfrecordio import _TFRecordUtil

from schemas.outputs import GLOB_CHARS
from schemas.records import (FAILURES_TAG, STAGE_READ, FailureRecord, ImageRecord, as_utf8,
                             utf8_text)
from transforms.decode import IDENTIFYING_BYTES, may_be_decodable
from transforms.failures import route_failures
from transforms.metrics import INPUT_FILES_READ, RunMetrics

INPUT_FORMATS = ('auto', 'files', 'tfrecord', 'webdataset')
TFRECORD_SUFFIXES = ('.tfrecord', '.tfrecords', '.tfrec', '.tfrecord.gz', '.tfrecords.gz')
WEBDATASET_SUFFIXES = ('.tar',)
WEBDATASET_IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'gif', 'tif', 'tiff')

# Beam's glob has no quoting, but a one-character class quotes: '[[]' matches '[', '[*]'
# a '*', '[?]' a '?'.
_QUOTED_OR_GLOB = re.compile(r'\[([*?\[])\]|[*?\[]')
_FOLDER_GLOBSTAR = '/**/'

# Matched paths travel to the readers in chunks: small beside any worker's share of a
# run, large enough that the shuffle handles few elements. A chunk holds up to this many
# units, a file weighing one unit per started BYTES_PER_CHUNK_UNIT: 32 small photos, or a
# single camera-sized JPEG. Chunks of 32 files whatever their size left a local worker
# idle while the other read a chunk more: 480 JPEGs of 3000x2000 made 15 chunks, 256
# images for one worker and 224 for the other (200 make 7, as unequal as 128 and 72).
CHUNK_UNITS = 32
BYTES_PER_CHUNK_UNIT = 64 * 1024


def normalize_pattern(pattern):
  """Makes local patterns absolute, so keys and URIs do not depend on a worker's cwd."""
  if '://' in pattern:
    return pattern
  return os.path.abspath(os.path.expanduser(pattern))


def _first_glob(pattern):
  """Where the pattern's first glob character that is not quoted is, or None."""
  for match in _QUOTED_OR_GLOB.finditer(pattern):
    if match.group(1) is None:
      return match.start()
  return None


def is_glob(pattern):
  return _first_glob(pattern) is not None


def quote_glob(path):
  """A path -> the pattern that matches exactly it, whatever characters its names hold."""
  return GLOB_CHARS.sub(lambda match: '[%s]' % match.group(0), path)


def unquote_glob(literal):
  """The path a pattern without glob characters names (quote_glob undone)."""
  return _QUOTED_OR_GLOB.sub(lambda match: match.group(1) or match.group(0), literal)


def folder_as_pattern(pattern):
  """An --input -> the pattern the job matches: a folder becomes every file below it.
  A local file or folder that exists is taken as it is even when its name holds glob
  characters ('photos [2019]/', 'IMG_1 (copy?).jpg'): it is quoted."""
  if is_glob(pattern):
    if '://' in pattern or not os.path.lexists(pattern):
      return pattern
    pattern = quote_glob(pattern)
  path = unquote_glob(pattern)
  if '://' in pattern:
    is_folder = path.endswith('/') or not FileSystems.exists(path)
  else:
    is_folder = os.path.isdir(path)
  return pattern.rstrip('/') + '/**' if is_folder else pattern


def pattern_regex(pattern):
  """Beam's glob syntax ('*' within a name, '**' across folders), except that a whole
  '**' path segment also matches no folder at all, as in bash's globstar and Python's
  glob: 'photos/**/*.jpg' matches photos/a.jpg, which Beam's own match leaves out."""
  bodies = []
  for piece in pattern.split(_FOLDER_GLOBSTAR):
    translated = FileSystem.translate_pattern(piece)  # '(?ms)' + body + '\Z'
    # A quoted '[' comes out as the class '[[]', which Python's re warns about.
    bodies.append(translated[len('(?ms)'):-len('\\Z')].replace('[[]', '\\['))
  return re.compile('(?ms)' + '/(?:.*/)?'.join(bodies) + '\\Z')


class SourceMatcher:
  """Whether an output row's uri comes from a file that the patterns match: the uri
  itself, or, for an image of a shard (a uri with '#record' after the shard's path), the
  part before a '#'. Tells a resumed run which earlier rows its inputs cover."""

  def __init__(self, patterns):
    self._literal = {unquote_glob(p) for p in patterns if not is_glob(p)}
    self._regexes = [pattern_regex(p) for p in patterns if is_glob(p)]

  def __call__(self, uri):
    sources = [uri] + [uri[:at] for at, char in enumerate(uri) if char == '#']
    return any(source in self._literal or any(r.match(source) for r in self._regexes)
               for source in sources)


def _raise(error):
  raise error


def _walk_files(top):
  """Every path below the folder top that is not a folder, following symbolic links to
  folders and listing each folder once (a link loop ends). Real folders come first, so a
  folder reachable both ways is listed under its own path."""
  seen, starts = set(), [top]
  while starts:
    # An unreadable folder stops the listing: its files would otherwise vanish unnoticed.
    for folder, subfolders, names in os.walk(starts.pop(0), onerror=_raise):
      status = os.stat(folder)
      if (status.st_dev, status.st_ino) in seen:
        subfolders[:] = []
        continue
      seen.add((status.st_dev, status.st_ino))
      subfolders.sort()
      starts.extend(os.path.join(folder, name) for name in subfolders
                    if os.path.islink(os.path.join(folder, name)))
      for name in sorted(names):
        yield os.path.join(folder, name)


def _walk_matching(pattern, predicate):
  """Local paths under a glob pattern's literal folder for which predicate holds."""
  top = literal_folder(pattern).rstrip('/') or '/'
  return filter(predicate, _walk_files(top)) if os.path.isdir(top) else iter(())


def _local_metadata(path):
  """FileMetadata of a listed path; a dangling link is kept (size 0) so that reading it
  fails with its reason; None for a file that vanished since it was listed."""
  try:
    status = os.stat(path)
  except OSError:
    return FileMetadata(path, 0, 0.0) if os.path.lexists(path) else None
  return FileMetadata(path, status.st_size, status.st_mtime)


def iter_matches(pattern, limit=None, excluded=None):
  """One input pattern -> FileMetadata of every file it matches, in listing order,
  except files under the folder `excluded` (the run's own output, which a pattern over
  a parent folder would otherwise read back as input).

  The launcher's check, the progress total and the read stage all list through here.
  Local folders are walked lazily, following symbolic links; other filesystems are
  listed by Beam (up to limit matches, when given) with '**/' widened to '**', then
  filtered.
  """
  excluded_prefix = excluded.rstrip('/') + '/' if excluded else None

  def wanted(path, regex=None):
    return ((regex is None or regex.match(path)) and
            not (excluded_prefix and path.startswith(excluded_prefix)))

  remote = '://' in pattern
  if not remote and not is_glob(pattern):
    metadata = _local_metadata(unquote_glob(pattern))
    if metadata is not None and wanted(metadata.path):
      yield metadata
    return
  if remote and not GLOB_CHARS.search(pattern):
    yield from (metadata for metadata in FileSystems.match([pattern])[0].metadata_list
                if wanted(metadata.path))
    return
  regex = pattern_regex(pattern)
  if remote:
    # Beam lists a looser pattern, then the listing is filtered: '**/' widened to '**',
    # and quoted characters to '?' (Beam would compile '[[]' into a class that Python's
    # re warns about).
    widened = _QUOTED_OR_GLOB.sub(lambda match: '?' if match.group(1) else match.group(0),
                                  pattern.replace(_FOLDER_GLOBSTAR, '/**'))
    listed = FileSystems.match([widened], [limit])[0].metadata_list
    found = [metadata for metadata in listed if wanted(metadata.path, regex)]
    if not found and limit is not None and len(listed) >= limit:
      # The widened pattern's first matches were all left out: list it all.
      found = [metadata for metadata in FileSystems.match([widened])[0].metadata_list
               if wanted(metadata.path, regex)]
    yield from found
    return
  for metadata in map(_local_metadata, _walk_matching(pattern, lambda p: wanted(p, regex))):
    if metadata is not None:
      yield metadata


def other_case_matches(pattern, limit=3):
  """Up to `limit` local paths that the pattern would match but for letter case (a
  camera's IMG_0001.JPG under '*.jpg'): said when a pattern matches nothing."""
  if '://' in pattern or not is_glob(pattern):
    return []
  regex = re.compile(pattern_regex(pattern).pattern, re.IGNORECASE)
  return list(itertools.islice(_walk_matching(pattern, regex.match), limit))


def match_pattern(pattern, limit=None, excluded=None):
  """iter_matches as a list sorted by path; with a limit, at most that many (the first
  found: the listing stops there)."""
  return sorted(itertools.islice(iter_matches(pattern, limit, excluded), limit),
                key=lambda metadata: metadata.path)


def literal_folder(pattern):
  """The folder (ending in '/') that holds everything a pattern can match: that of its
  literal part, before the first glob character."""
  glob_at = _first_glob(pattern)
  literal = unquote_glob(pattern if glob_at is None else pattern[:glob_at])
  if glob_at is not None and literal.endswith('/'):
    return literal
  return posixpath.dirname(literal) + '/'


def common_root(patterns):
  """The longest common directory of the patterns' literal (non-glob) prefixes.

  Keys are paths relative to it, so the same files give the same keys wherever the
  job runs.
  """
  root = posixpath.commonprefix([literal_folder(pattern) for pattern in patterns])
  return root[:root.rfind('/') + 1]


def relative_key(path, root):
  if root and path.startswith(root):
    return path[len(root):]
  return path.lstrip('/')


def format_of(path, input_format):
  """Resolves --input_format auto by file name."""
  if input_format != 'auto':
    return input_format
  lower = path.lower()
  if lower.endswith(TFRECORD_SUFFIXES):
    return 'tfrecord'
  if lower.endswith(WEBDATASET_SUFFIXES):
    return 'webdataset'
  return 'files'


def holds_shards(paths, input_format):
  """Whether any of these matched paths is read as a TFRecord or WebDataset shard."""
  if input_format != 'auto':
    return input_format != 'files'
  return any(format_of(path, 'auto') != 'files' for path in paths)


def may_hold_shards(patterns, input_format):
  """Whether any pattern can match a TFRecord or WebDataset shard, judged from the
  patterns alone (when no listing is at hand). A pattern whose file name part ends in an
  image extension cannot; '*' or '**' may."""
  names = [posixpath.basename(pattern) for pattern in patterns]
  if input_format == 'auto' and any(is_glob(name.rsplit('.', 1)[-1])
                                    or '.' not in name for name in names):
    return True  # an extension that is itself a wildcard: anything may match
  return holds_shards(names, input_format)


class InputFile(NamedTuple):
  """A matched input file as listed: what the readers and a resume's check start from."""
  path: str
  size: Optional[int] = None  # bytes
  modified: Optional[float] = None  # seconds since the epoch; 0 or None: not known

  @classmethod
  def listed(cls, metadata):
    return cls(metadata.path, metadata.size_in_bytes, metadata.last_updated_in_seconds)


def folder_label(key):
  """A file's label is its folder's name, as in the common one-folder-per-class layout."""
  folder = posixpath.dirname(key)
  return posixpath.basename(folder) if folder else None


def chunk_weight(metadata):
  """A matched file's weight in a chunk of paths (FileMetadata -> units, at least 1)."""
  size = metadata.size_in_bytes or 0
  return max(1, -(-size // BYTES_PER_CHUNK_UNIT))


class NotARegularFile(OSError):  # pylint: disable=invalid-name
  """A local input that is a named pipe, a socket or a device, not a file (named as the
  failure of a WebDataset member that is no file)."""


_SPECIAL_FILE_KINDS = ((stat.S_ISFIFO, 'a named pipe'), (stat.S_ISSOCK, 'a socket'),
                       (stat.S_ISCHR, 'a character device'), (stat.S_ISBLK, 'a block device'))


def open_input(path, compression_type=CompressionTypes.AUTO):
  """FileSystems.open of a matched input, refusing (NotARegularFile) a local one that
  is not a regular file: reading a named pipe in an input folder waits for a writer
  forever, and a device may never end."""
  if '://' not in path:
    try:
      mode = os.stat(path).st_mode
    except OSError:
      mode = None  # opening it says why
    if mode is not None and not stat.S_ISREG(mode):
      kind = next((name for is_kind, name in _SPECIAL_FILE_KINDS if is_kind(mode)),
                  'not a regular file')
      raise NotARegularFile('%s is %s, not a regular file: not read' % (path, kind))
  return FileSystems.open(path, compression_type=compression_type)


def _read_up_to(handle, size):
  """The first `size` bytes of a stream (fewer at its end), even from a stream whose
  reads may return less than asked."""
  data = b''
  while len(data) < size:
    more = handle.read(size - len(data))
    if not more:
      break
    data += more
  return data


def read_image_file(path, root, size=None, modified=None):
  """One image file -> ImageRecord (with its listed size and modification time, when
  given); any failure -> FailureRecord (stage read)."""
  key = relative_key(path, root)
  try:
    with open_input(path, CompressionTypes.UNCOMPRESSED) as f:
      data = _read_up_to(f, IDENTIFYING_BYTES)
      # A video, a document or a sidecar file under an input folder fails to decode on
      # its first bytes alone, with the same reason: a 2 GB video is not read for that.
      if may_be_decodable(data):
        if f.seekable():  # a big scan is not held twice while the two are joined
          f.seek(0)
          data = f.read()
        else:
          data += f.read()
  except Exception as e:  # pylint: disable=broad-except
    return FailureRecord.from_exception(key, path, STAGE_READ, e)
  return ImageRecord(key=key, uri=path, data=data, label=folder_label(key), file_size=size,
                     file_modified=modified)


def may_be_image_file(path):
  """Whether a file's first bytes may begin an image this project decodes (see
  read_image_file); an unreadable file may be one."""
  try:
    with open_input(path, CompressionTypes.UNCOMPRESSED) as f:
      return may_be_decodable(_read_up_to(f, IDENTIFYING_BYTES))
  except Exception:  # pylint: disable=broad-except
    return True  # reading it again says why it cannot be used


def unread_file_record(listed, root):
  """The ImageRecord that reading this image file (an InputFile) would give, without its
  bytes or digest: key, uri, size and time as read_path writes them."""
  return as_utf8(ImageRecord(key=relative_key(listed.path, root), uri=listed.path, data=None,
                             file_size=listed.size, file_modified=listed.modified))


def _iter_tfrecord_payloads(handle):
  """Yields (payload or ValueError) per record; stops after a corrupt length field.

  A corrupt payload is reported and skipped, since its length was intact and the next
  record can still be found; a corrupt length means nothing after it can be trusted.
  """
  while True:
    header = handle.read(12)
    if not header:
      return
    if len(header) != 12:
      yield ValueError('truncated record header (%d of 12 bytes)' % len(header))
      return
    length, length_crc = struct.unpack('<QI', header)
    if _TFRecordUtil._masked_crc32c(header[:8]) != length_crc:  # pylint: disable=protected-access
      yield ValueError('corrupt record length; the rest of the shard is unreadable')
      return
    body = handle.read(length + 4)
    if len(body) != length + 4:
      yield ValueError('truncated record (%d of %d bytes)' % (len(body), length + 4))
      return
    payload, payload_crc = body[:length], struct.unpack('<I', body[length:])[0]
    if _TFRecordUtil._masked_crc32c(payload) != payload_crc:  # pylint: disable=protected-access
      yield ValueError('corrupt record data (checksum mismatch)')
      continue
    yield payload


def _feature_value(feature):
  kind = feature.WhichOneof('kind')
  values = list(getattr(feature, kind).value) if kind else []
  if not values:
    return None
  value = values[0]
  return value.decode('utf-8', 'replace') if isinstance(value, bytes) else value


def parse_tf_example(payload):
  """A serialized tf.train.Example -> (encoded image, label, metadata dict)."""
  # Imported here: TensorFlow's protos are only needed for TFRecord inputs.
  from tensorflow.core.example import example_pb2  # pylint: disable=import-outside-toplevel
  example = example_pb2.Example.FromString(payload)
  features = example.features.feature
  if 'image/encoded' not in features:
    raise ValueError('tf.train.Example has no image/encoded feature')
  encoded = features['image/encoded'].bytes_list.value
  if not encoded:
    raise ValueError('image/encoded is empty')
  metadata = {}
  for name in ('image/filename', 'image/class/text'):
    if name in features:
      metadata[name] = _feature_value(features[name])
  label = None
  if 'image/class/label' in features:
    value = _feature_value(features['image/class/label'])
    label = None if value is None else str(value)
  return encoded[0], label, metadata


def read_tfrecord_shard(path, root):
  """Yields an ImageRecord or a FailureRecord for every record of a TFRecord shard."""
  shard_key = relative_key(path, root)
  index = 0
  try:
    with open_input(path) as handle:  # AUTO compression: .gz shards work too
      for payload in _iter_tfrecord_payloads(handle):
        key, uri = '%s#%d' % (shard_key, index), '%s#%d' % (path, index)
        index += 1
        if isinstance(payload, Exception):
          yield FailureRecord.from_exception(key, uri, STAGE_READ, payload)
          continue
        try:
          data, label, metadata = parse_tf_example(payload)
        except Exception as e:  # pylint: disable=broad-except
          yield FailureRecord.from_exception(key, uri, STAGE_READ, e)
          continue
        yield ImageRecord(key=key, uri=uri, data=data, label=label,
                          metadata=json.dumps(metadata, sort_keys=True) if metadata else None)
  except Exception as e:  # pylint: disable=broad-except
    yield FailureRecord.from_exception('%s#%d' % (shard_key, index),
                                       '%s#%d' % (path, index), STAGE_READ, e)


def _sample_key_and_uri(shard_path, folder_key, key):
  """A WebDataset sample's record key (its own key below its shard's folder, folder_key:
  see read_webdataset_shard) and uri (the shard's path, '#', its own key)."""
  return folder_key + key, '%s#%s' % (shard_path, key)


def _webdataset_sample(shard_path, folder_key, key, members):
  """Members of one WebDataset sample ({extension: bytes}) -> ImageRecord or FailureRecord,
  keyed by its shard's folder (folder_key, see read_webdataset_shard) and its own key."""
  key, uri = _sample_key_and_uri(shard_path, folder_key, key)
  image_ext = next((e for e in WEBDATASET_IMAGE_EXTENSIONS if e in members), None)
  if image_ext is not None and isinstance(members[image_ext], tarfile.TarInfo):
    link = members[image_ext]
    return FailureRecord(key=key, uri=uri + '.' + image_ext, stage=STAGE_READ,
                         error='NotARegularFile',
                         message='tar member %s is not a regular file (link to %r); links '
                         'are not followed' % (link.name, link.linkname))
  members = {e: data for e, data in members.items() if isinstance(data, bytes)}
  if image_ext is None:
    return FailureRecord(key=key, uri=uri, stage=STAGE_READ, error='MissingImage',
                         message='sample has no image member (found: %s)'
                         % ', '.join(sorted(members)))
  metadata = {}
  if 'json' in members:
    text = members['json'].decode('utf-8', 'replace')
    try:
      parsed = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or nested too deep to parse
      parsed = None
    # Its fields when it is an object (img2dataset's), else the text as it is.
    if isinstance(parsed, dict):
      metadata.update(parsed)
    else:
      metadata['json'] = text
  if 'txt' in members:
    metadata['caption'] = members['txt'].decode('utf-8', 'replace')
  label = members['cls'].decode('utf-8', 'replace').strip() if 'cls' in members else None
  return ImageRecord(key=key, uri=uri + '.' + image_ext, data=members[image_ext],
                     label=label,
                     metadata=json.dumps(metadata, sort_keys=True, default=str)
                     if metadata else None)


def _sample_or_failure(shard_path, folder_key, key, members):
  """_webdataset_sample, with anything it raises a failure of that sample alone: the
  shard's other samples are still read."""
  try:
    return _webdataset_sample(shard_path, folder_key, key, members)
  except Exception as e:  # pylint: disable=broad-except
    return FailureRecord.from_exception(*_sample_key_and_uri(shard_path, folder_key, key),
                                        STAGE_READ, e)


def _scattered_sample(shard_path, folder_key, key, members):
  """The failure of the members of a sample found after another sample's: a shard is
  read in one pass, so a sample must be whole where it starts (tar --sort=name, or
  WebDataset's and img2dataset's writers, keep each sample's files together)."""
  key, uri = _sample_key_and_uri(shard_path, folder_key, key)
  return FailureRecord(
      key=key, uri=uri, stage=STAGE_READ, error='ScatteredSample',
      message='members %s of sample %s come after other samples in the shard, not next '
              'to its first members: they are not used (a WebDataset shard keeps each '
              "sample's files together; tar --sort=name writes it so)" % (
                  ', '.join(sorted('.' + extension for extension in members)), key))


def split_member_name(name):
  """'dir/000123.jpg' -> ('dir/000123', 'jpg'), the WebDataset convention: the key ends
  at the first dot of the file name. A leading './' (tar -C folder . writes one) is no
  part of the key."""
  while name.startswith('./'):
    name = name[2:]
  directory, base = posixpath.split(name)
  stem, _, extension = base.partition('.')
  return posixpath.join(directory, stem), extension.lower()


_TAR_BLOCK = 512


def _tar_properly_ended(handle, offset):
  """A tar ends with zero blocks; tarfile silently stops at a truncated or damaged
  header instead of raising, so the end marker is checked here."""
  handle.seek(offset)
  end = handle.read(_TAR_BLOCK)
  return len(end) == _TAR_BLOCK and not end.strip(b'\0')


def read_webdataset_shard(path, root):
  """Yields an ImageRecord or FailureRecord for every sample of a WebDataset tar shard.
  A sample's key is its own below the folder of its shard, relative to root: the sample
  key alone for the shards of one folder (img2dataset numbers its samples across all
  the shards it writes), 'cc3m/000000000' beside 'laion/000000000' for two such folders,
  whose numbers both start at 0."""
  folder_key = relative_key(posixpath.dirname(path) + '/', root)
  key, members, last_member = None, {}, None
  finished = set()  # keys of the samples yielded
  try:
    with open_input(path, CompressionTypes.UNCOMPRESSED) as handle:
      with tarfile.open(fileobj=handle, mode='r:') as tar:
        for member in tar:
          if member.isdir():
            continue
          member_key, extension = split_member_name(member.name)
          if member_key != key and key is not None:
            yield (_scattered_sample(path, folder_key, key, members) if key in finished
                   else _sample_or_failure(path, folder_key, key, members))
            finished.add(key)
            members = {}
          key = member_key
          # Links and special files are kept as their TarInfo, never followed: member
          # names and link targets are data, not paths of this machine.
          members[extension] = tar.extractfile(member).read() if member.isfile() else member
          last_member = member.name
        ended = _tar_properly_ended(handle, tar.offset)
  except Exception as e:  # pylint: disable=broad-except
    # The sample being read is lost; WebDataset samples carry their own keys, and the
    # shard's path names a failure before the first one.
    if key is None:
      failed_key = relative_key(path, root) + '#shard'
      failed_uri = path + '#shard'  # as the '#end' of a truncated one
    else:
      failed_key, failed_uri = _sample_key_and_uri(path, folder_key, key)
    yield FailureRecord.from_exception(failed_key, failed_uri, STAGE_READ, e)
    return
  if key is not None:
    yield (_scattered_sample(path, folder_key, key, members) if key in finished
           else _sample_or_failure(path, folder_key, key, members))
  if not ended:
    shard_key = relative_key(path, root) + '#end'
    yield FailureRecord(
        key=shard_key, uri='%s#end' % path, stage=STAGE_READ, error='TruncatedTar',
        message='tar shard is truncated or damaged after member %s: any samples after '
                'it are lost' % last_member)


_READERS = {
    'files': lambda listed, root: iter([read_image_file(listed.path, root, listed.size,
                                                         listed.modified)]),
    'tfrecord': lambda listed, root: read_tfrecord_shard(listed.path, root),
    'webdataset': lambda listed, root: read_webdataset_shard(listed.path, root),
}


def read_path(listed, root, input_format):
  """Every ImageRecord or FailureRecord of one matched input file (an InputFile), its
  keys, uris and labels as UTF-8 text (see utf8_text)."""
  return map(as_utf8, _READERS[format_of(listed.path, input_format)](listed, root))


class _ReadDoFn(beam.DoFn):

  def __init__(self, root, input_format, metrics=None):
    self._root = root
    self._input_format = input_format
    self._metrics = metrics or RunMetrics()

  def process(self, listed):
    yield from route_failures(read_path(listed, self._root, self._input_format))
    # Once every matched file is read, the progress line knows the total image count.
    self._metrics.inc(INPUT_FILES_READ)


class ChunkPaths(beam.PTransform):
  """Matched FileMetadata -> lists of InputFiles weighing up to CHUNK_UNITS (a heavier
  file alone)."""

  def expand(self, matched):
    return (matched
            | 'Batch' >> beam.BatchElements(min_batch_size=CHUNK_UNITS,
                                            max_batch_size=CHUNK_UNITS,
                                            element_size_fn=chunk_weight)
            # A file heavier than a chunk closes the chunk before it, even an empty one.
            | 'Paths' >> beam.FlatMap(
                lambda batch: [[InputFile.listed(m) for m in batch]] if batch else []))


class ReadOutputs(NamedTuple):
  images: beam.PCollection  # of ImageRecord
  failures: beam.PCollection  # of FailureRecord
  # ImageRecords without data of the files found unchanged and not read (also among
  # images); None unless the stage was given skip_unchanged.
  unread: Optional[beam.PCollection] = None


class ReadImages(beam.PTransform):
  """Input patterns -> ReadOutputs: ImageRecords and FailureRecords (stage read)."""

  def __init__(self, patterns, input_format='auto', root=None, metrics=None,
               spread_records=None, excluded=None, skip_unchanged=None):
    """spread_records: whether to shuffle the image records across workers (for shards);
    None decides from the patterns alone (may_hold_shards). excluded: a folder whose
    files are never input (the run's output). skip_unchanged: a PTransform of InputFiles
    -> (InputFiles to read, ImageRecords without data of files known unchanged, which
    are not read), as a resumed run finds them."""
    super().__init__()
    self._patterns = list(patterns)
    self._excluded = excluded
    self._input_format = input_format
    self._root = common_root(self._patterns) if root is None else root
    self._metrics = metrics
    self._spread_records = (may_hold_shards(self._patterns, input_format)
                            if spread_records is None else spread_records)
    self._skip_unchanged = skip_unchanged

  def expand(self, pbegin):
    matched = (pbegin
               | 'Patterns' >> beam.Create(self._patterns)
               | 'Match' >> beam.FlatMap(iter_matches, excluded=self._excluded))
    if len(self._patterns) > 1:
      # Drops files matched by two patterns, and spreads the files across workers.
      files = (matched
               | 'ByPath' >> beam.Map(lambda metadata: (metadata.path,
                                                        InputFile.listed(metadata)))
               | 'Distinct' >> beam.CombinePerKey(lambda listed: next(iter(listed)))
               | 'Files' >> beam.Values())
    else:
      # One pattern matches each file once. The files are spread across workers in
      # chunks: a shuffle per path cost the local runner's launcher 0.1 ms per image.
      files = (matched
               | 'ChunkPaths' >> ChunkPaths()
               | 'SpreadChunks' >> beam.Reshuffle()
               | 'Unchunk' >> beam.FlatMap(lambda chunk: chunk))
    known = None
    if self._skip_unchanged is not None:
      files, known = files | 'SkipUnchanged' >> self._skip_unchanged
    read = files | 'Read' >> beam.ParDo(
        _ReadDoFn(self._root, self._input_format, self._metrics)).with_outputs(
            FAILURES_TAG, main='images')
    images = read.images
    if self._spread_records:
      # A shard holds many images: they are spread across workers before decoding.
      # Image files need no such step (their paths were spread above), which spares
      # sending every image's bytes through a shuffle.
      images = images | 'SpreadShardImages' >> beam.Reshuffle()
    if known is not None:
      images = (images, known) | 'ReadOrKnown' >> beam.Flatten()
    return ReadOutputs(images=images, failures=read[FAILURES_TAG], unread=known)


_ESCAPED_BYTE = re.compile(r'\\x([89a-f][0-9a-f])')


def local_path_of(uri):
  """The path of this machine that a stored uri names: utf8_text undone, when the uri as
  written names no file and a name escaped by it does."""
  if '://' in uri or os.path.lexists(uri) or not _ESCAPED_BYTE.search(uri):
    return uri
  named = _ESCAPED_BYTE.sub(lambda match: chr(0xDC00 + int(match.group(1), 16)), uri)
  return named if os.path.lexists(named) or os.path.lexists(named.rpartition('#')[0]) else uri


def read_uri_bytes(uri):
  """The encoded image behind a uri that this stage wrote (a file, 'shard.tfrecord#N' or
  'shard.tar#KEY.ext'), for previews and queries of a finished run."""
  uri = local_path_of(uri)
  if FileSystems.exists(uri) or '#' not in uri:
    with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
      return f.read()
  path, fragment = _shard_and_fragment(uri)
  shard_format = format_of(path, 'auto')
  if shard_format == 'files':  # a shard named without its format's extension
    # A record's fragment is its number; a tar member's, KEY.ext.
    shard_format = 'tfrecord' if fragment.isdigit() else 'webdataset'
  if shard_format == 'tfrecord':
    with FileSystems.open(path) as handle:
      for index, payload in enumerate(_iter_tfrecord_payloads(handle)):
        if index == int(fragment):
          if isinstance(payload, Exception):
            raise payload
          return parse_tf_example(payload)[0]
  else:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
      with tarfile.open(fileobj=handle, mode='r:') as tar:
        # The uri writes the extension in lower case, as samples are grouped by it.
        wanted = split_member_name(fragment)
        for member in tar:
          if member.isfile() and split_member_name(member.name) == wanted:
            return tar.extractfile(member).read()
  raise FileNotFoundError('no image at %s' % uri)


def _shard_and_fragment(uri):
  """'shard#fragment' -> (shard, fragment), split at the first '#' after which the shard
  exists: a tar member's name may hold '#' too."""
  for position in (i for i, character in enumerate(uri) if character == '#'):
    if FileSystems.exists(uri[:position]):
      return uri[:position], uri[position + 1:]
  path, _, fragment = uri.rpartition('#')
  return path, fragment
