"""Read stage: keys, formats, TFRecord and WebDataset shards, including damaged ones."""

import io
import json
import os
import tarfile

import pytest
import tensorflow as tf

import imagegen
from schemas.records import FailureRecord, ImageRecord, utf8_text
from transforms import read


@pytest.mark.parametrize('patterns,root', [
    (['/data/photos/**/*.jpg'], '/data/photos/'),
    (['/data/photos/a/*.jpg', '/data/photos/b/*.png'], '/data/photos/'),
    (['/data/photos/a/x.jpg'], '/data/photos/a/'),
    (['/data/ph*/a.jpg', '/data/photos/b.jpg'], '/data/'),
    (['gs://bucket/shards/train-*.tar'], 'gs://bucket/shards/'),
    (['/a/b/*', '/c/d/*'], '/'),
])
def test_common_root(patterns, root):
  assert read.common_root(patterns) == root


def test_relative_key_and_label():
  assert read.relative_key('/data/photos/cats/1.jpg', '/data/photos/') == 'cats/1.jpg'
  assert read.folder_label('cats/1.jpg') == 'cats'
  assert read.folder_label('1.jpg') is None


@pytest.mark.parametrize('path,expected', [
    ('x/a.jpg', 'files'), ('x/train-0.tfrecord', 'tfrecord'), ('x/t.tfrec', 'tfrecord'),
    ('x/t.tfrecord.gz', 'tfrecord'), ('x/00001.tar', 'webdataset'), ('x/A.TAR', 'webdataset')])
def test_format_by_extension(path, expected):
  assert read.format_of(path, 'auto') == expected
  assert read.format_of(path, 'files') == 'files'


def example(image_bytes, filename=None, label=None):
  feature = {'image/encoded': tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes]))}
  if filename:
    feature['image/filename'] = tf.train.Feature(
        bytes_list=tf.train.BytesList(value=[filename.encode()]))
  if label is not None:
    feature['image/class/label'] = tf.train.Feature(int64_list=tf.train.Int64List(value=[label]))
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_tfrecord(path, payloads):
  with tf.io.TFRecordWriter(str(path)) as writer:
    for payload in payloads:
      writer.write(payload)


def test_tfrecord_records_keep_label_and_filename(tmp_path):
  shard = tmp_path / 'train-00000.tfrecord'
  write_tfrecord(shard, [example(b'one', 'a.jpg', 3), example(b'two')])
  records = list(read.read_tfrecord_shard(str(shard), str(tmp_path) + '/'))
  assert [r.key for r in records] == ['train-00000.tfrecord#0', 'train-00000.tfrecord#1']
  assert records[0].data == b'one' and records[0].label == '3'
  assert json.loads(records[0].metadata) == {'image/filename': 'a.jpg'}
  assert records[1].label is None and records[1].metadata is None


def test_tfrecord_corrupt_payload_is_a_failure_and_reading_goes_on(tmp_path):
  shard = tmp_path / 's.tfrecord'
  write_tfrecord(shard, [example(b'first-image'), example(b'second-image'), example(b'third')])
  data = bytearray(shard.read_bytes())
  data[data.find(b'second-image')] ^= 0xFF  # flip a payload byte: checksum mismatch
  shard.write_bytes(bytes(data))
  records = list(read.read_tfrecord_shard(str(shard), str(tmp_path) + '/'))
  assert [type(r) for r in records] == [ImageRecord, FailureRecord, ImageRecord]
  assert 'checksum' in records[1].message and records[1].stage == 'read'
  assert records[2].data == b'third'


def test_tfrecord_truncated_and_non_example(tmp_path):
  shard = tmp_path / 's.tfrecord'
  write_tfrecord(shard, [b'not an example proto', example(b'x')])
  shard.write_bytes(shard.read_bytes()[:-5])
  records = list(read.read_tfrecord_shard(str(shard), str(tmp_path) + '/'))
  assert all(isinstance(r, FailureRecord) for r in records)
  assert len(records) == 2
  assert 'truncated' in records[1].message


def write_tar(path, members):
  with tarfile.open(path, 'w') as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_webdataset_samples_group_members(tmp_path):
  shard = tmp_path / '00000.tar'
  write_tar(shard, [('000000001.jpg', b'img1'), ('000000001.json', b'{"url": "http://x"}'),
                    ('000000001.txt', b'a cat'), ('000000001.cls', b'7'),
                    ('000000002.png', b'img2'), ('000000003.json', b'{}')])
  records = list(read.read_webdataset_shard(str(shard), str(tmp_path) + '/'))
  assert [r.key for r in records] == ['000000001', '000000002', '000000003']
  assert records[0].data == b'img1' and records[0].label == '7'
  assert json.loads(records[0].metadata) == {'url': 'http://x', 'caption': 'a cat'}
  assert records[0].uri.endswith('00000.tar#000000001.jpg')
  assert records[1].data == b'img2'
  assert isinstance(records[2], FailureRecord) and 'no image' in records[2].message


def test_webdataset_json_that_is_no_object_is_kept_as_text(tmp_path):
  # A .json member holding a list cost the rest of its shard (every later sample lost).
  shard = tmp_path / '00000.tar'
  metadata = [b'[1, 2]', b'"text"', b'{"url": "http://x"}', b'[' * 100000, b'{not json']
  write_tar(shard, [member for n, data in enumerate(metadata)
                    for member in (('%09d.jpg' % n, b'img%d' % n), ('%09d.json' % n, data))])
  records = list(read.read_webdataset_shard(str(shard), str(tmp_path) + '/'))
  assert [(type(r).__name__, r.key, r.data) for r in records] == [
      ('ImageRecord', '%09d' % n, b'img%d' % n) for n in range(5)]
  assert [json.loads(r.metadata) for r in records] == [
      {'json': '[1, 2]'}, {'json': '"text"'}, {'url': 'http://x'}, {'json': '[' * 100000},
      {'json': '{not json'}]


def test_a_sample_that_cannot_be_made_costs_only_itself(tmp_path, monkeypatch):
  shard = tmp_path / '00000.tar'
  write_tar(shard, [('%09d.jpg' % n, b'img%d' % n) for n in range(3)])
  real_sample = read._webdataset_sample  # pylint: disable=protected-access

  def failing_on_the_second(shard_path, folder_key, key, members):
    if key == '000000001':
      raise RuntimeError('cannot make this sample')
    return real_sample(shard_path, folder_key, key, members)
  monkeypatch.setattr(read, '_webdataset_sample', failing_on_the_second)
  records = list(read.read_webdataset_shard(str(shard), str(tmp_path) + '/'))
  assert [(type(r).__name__, r.key) for r in records] == [
      ('ImageRecord', '000000000'), ('FailureRecord', '000000001'), ('ImageRecord', '000000002')]
  assert (records[1].stage, records[1].error, records[1].uri) == (
      'read', 'RuntimeError', str(shard) + '#000000001')


def test_webdataset_truncated_tar_reports_failure(tmp_path):
  shard = tmp_path / '00000.tar'
  write_tar(shard, [('a.jpg', b'x' * 600), ('b.jpg', b'y' * 5000)])
  shard.write_bytes(shard.read_bytes()[:2000])
  records = list(read.read_webdataset_shard(str(shard), str(tmp_path) + '/'))
  assert [r.key for r in records] == ['a', '00000.tar#end']
  assert records[0].data == b'x' * 600
  assert isinstance(records[1], FailureRecord) and 'truncated' in records[1].message
  # Cut inside a member's data: that sample is the failure.
  write_tar(shard, [('a.jpg', b'x' * 600), ('b.jpg', b'y' * 5000)])
  shard.write_bytes(shard.read_bytes()[:3000])
  records = list(read.read_webdataset_shard(str(shard), str(tmp_path) + '/'))
  assert [r.key for r in records] == ['a', 'b']
  assert isinstance(records[1], FailureRecord) and records[1].stage == 'read'


def test_missing_file_is_a_read_failure(tmp_path):
  record = read.read_image_file(str(tmp_path / 'gone.jpg'), str(tmp_path) + '/')
  assert isinstance(record, FailureRecord)
  assert record.key == 'gone.jpg' and record.stage == 'read'


def test_a_tar_of_a_folder_with_scattered_samples(tmp_path):
  """tar -C folder . writes './' before every name and the files in directory order,
  which can put one sample's files apart: the key has no './', and the late members
  are one failure that says why, not a sample without an image."""
  jpeg = imagegen.encode(imagegen.photo(1))
  write_tar(tmp_path / 'w.tar', [('./000.jpg', jpeg), ('./001.cls', b'1'),
                                 ('./001.jpg', jpeg), ('./000.cls', b'0')])
  found = list(read.read_webdataset_shard(str(tmp_path / 'w.tar'), str(tmp_path) + '/'))
  assert [(type(r).__name__, r.key) for r in found] == [
      ('ImageRecord', '000'), ('ImageRecord', '001'), ('FailureRecord', '000')]
  assert (found[0].label, found[1].label) == (None, '1')
  assert found[2].error == 'ScatteredSample' and found[2].message.startswith(
      'members .cls of sample 000 come after other samples in the shard')
  assert read.read_uri_bytes(found[0].uri) == jpeg


def test_read_uri_bytes_finds_files_records_and_members(tmp_path):
  (tmp_path / 'a#b.jpg').write_bytes(b'hash in name')
  assert read.read_uri_bytes(str(tmp_path / 'a#b.jpg')) == b'hash in name'
  write_tfrecord(tmp_path / 's.tfrecord', [example(b'zero'), example(b'one')])
  assert read.read_uri_bytes(str(tmp_path / 's.tfrecord') + '#1') == b'one'
  write_tar(tmp_path / 'w.tar', [('k1.json', b'{}'), ('k1.jpg', b'jpeg')])
  assert read.read_uri_bytes(str(tmp_path / 'w.tar') + '#k1.jpg') == b'jpeg'
  with pytest.raises(FileNotFoundError):
    read.read_uri_bytes(str(tmp_path / 'w.tar') + '#k2.jpg')


def test_file_gone_after_listing_is_a_read_failure(tmp_path):
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  (tmp_path / 'a.jpg').write_bytes(b'soon gone')
  listed = [read.InputFile.listed(m)
            for m in FileSystems.match([str(tmp_path / '*.jpg')])[0].metadata_list]
  (tmp_path / 'a.jpg').unlink()
  records = list(read.read_path(listed[0], str(tmp_path) + '/', 'auto'))
  assert len(records) == 1 and isinstance(records[0], FailureRecord)
  assert (records[0].key, records[0].stage, records[0].error) == (
      'a.jpg', 'read', 'FileNotFoundError')


def test_unreadable_file_is_a_read_failure(tmp_path):
  import socket  # pylint: disable=import-outside-toplevel
  server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  server.bind(str(tmp_path / 'sock.jpg'))  # open() fails on it, even for root
  server.close()
  record = read.read_image_file(str(tmp_path / 'sock.jpg'), str(tmp_path) + '/')
  assert isinstance(record, FailureRecord) and record.stage == 'read'


@pytest.mark.parametrize('name,key', [('pipe.jpg', 'pipe.jpg'),
                                      ('pipe.tfrecord', 'pipe.tfrecord#0'),
                                      ('pipe.tar', 'pipe.tar#shard')])
def test_a_named_pipe_among_the_inputs_is_a_read_failure_not_a_wait(tmp_path, name, key):
  # Opening a named pipe waits for a writer: one left in an input folder hung the job.
  import threading  # pylint: disable=import-outside-toplevel
  os.mkfifo(tmp_path / name)
  listed = read.InputFile(str(tmp_path / name), 0, 1.0)
  records = []
  reader = threading.Thread(target=lambda: records.extend(
      read.read_path(listed, str(tmp_path) + '/', 'auto')), daemon=True)
  reader.start()
  reader.join(60)
  if reader.is_alive():  # release the reader, then fail
    os.close(os.open(tmp_path / name, os.O_WRONLY | os.O_NONBLOCK))
    pytest.fail('reading a named pipe waited for a writer')
  assert len(records) == 1 and isinstance(records[0], FailureRecord), records
  assert (records[0].key, records[0].stage, records[0].error) == (
      key, 'read', 'NotARegularFile')
  assert records[0].uri == str(tmp_path / key)
  assert 'is a named pipe, not a regular file' in records[0].message


def test_a_stored_uri_names_its_file_even_when_the_name_is_not_utf8(tmp_path):
  latin1 = tmp_path / os.fsdecode(b'caf\xe9.jpg')
  literal = tmp_path / 'caf\\xe9.jpg'  # a name that holds a backslash itself
  latin1.write_bytes(b'latin-1 name')
  stored = utf8_text(str(latin1))
  assert stored == str(tmp_path) + '/caf\\xe9.jpg' and stored.encode('utf-8')
  assert read.local_path_of(stored) == str(latin1)
  assert read.read_uri_bytes(stored) == b'latin-1 name'
  literal.write_bytes(b'backslash in name')  # named as written: taken as it is
  assert read.local_path_of(stored) == str(literal)
  assert utf8_text('caf\u00e9.jpg') == 'caf\u00e9.jpg'  # UTF-8 names are left alone


def test_webdataset_links_are_failures_never_followed(tmp_path):
  secret = tmp_path / 'secret.jpg'
  secret.write_bytes(b'must not be read')
  shard = tmp_path / '00000.tar'
  with tarfile.open(shard, 'w') as tar:
    for name, target in (('a.jpg', str(secret)), ('b.jpg', '../../secret.jpg')):
      info = tarfile.TarInfo(name)
      info.type, info.linkname = tarfile.SYMTYPE, target
      tar.addfile(info)
    data = b'real image bytes'
    info = tarfile.TarInfo('c.jpg')
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
  records = list(read.read_webdataset_shard(str(shard), str(tmp_path) + '/'))
  assert [r.key for r in records] == ['a', 'b', 'c']
  for record in records[:2]:
    assert isinstance(record, FailureRecord) and record.error == 'NotARegularFile'
    assert 'not followed' in record.message
  assert records[2].data == data


@pytest.mark.parametrize('patterns,input_format,expected', [
    (['/p/**/*.jpg', '/p/*.PNG'], 'auto', False),
    (['/p/**/*.jpg', '/s/*.tar'], 'auto', True),
    (['/s/train-*.tfrecord.gz'], 'auto', True),
    (['/p/**/*'], 'auto', True),
    (['/p/**/*.*'], 'auto', True),
    (['/p/*.jp?'], 'auto', True),
    (['/p/*.jpg'], 'tfrecord', True),
    (['/s/*.tar'], 'files', False),
])
def test_shuffle_of_records_only_when_shards_may_be_read(patterns, input_format, expected):
  assert read.may_hold_shards(patterns, input_format) is expected


@pytest.mark.parametrize('patterns', [
    ['{d}/*.jpg'],  # one pattern: paths spread in chunks
    ['{d}/*.jpg', '{d}/a*.jpg', '{d}/*'],  # overlapping patterns: each file once
])
def test_every_matched_file_is_read_exactly_once(tmp_path, patterns):
  import apache_beam as beam  # pylint: disable=import-outside-toplevel
  from apache_beam.testing.util import assert_that, equal_to  # pylint: disable=import-outside-toplevel
  names = ['a%03d.jpg' % n for n in range(read.CHUNK_UNITS * 2 + 5)] + ['b.jpg']
  for name in names:
    (tmp_path / name).write_bytes(name.encode())
  root = str(tmp_path) + '/'
  with beam.Pipeline() as pipeline:
    images = (pipeline | read.ReadImages([p.format(d=tmp_path) for p in patterns], 'files',
                                         root)).images
    assert_that(images | beam.Map(lambda record: (record.key, record.data)),
                equal_to([(name, name.encode()) for name in names]))


def test_paths_are_chunked_by_weight():
  import apache_beam as beam  # pylint: disable=import-outside-toplevel
  from apache_beam.io.filesystem import FileMetadata  # pylint: disable=import-outside-toplevel
  from apache_beam.testing.util import assert_that  # pylint: disable=import-outside-toplevel
  unit = read.BYTES_PER_CHUNK_UNIT
  # 70 small photos, 8 of 4 units, 3 camera-sized JPEGs heavier than a whole chunk.
  sizes = ([unit // 4] * 70 + [4 * unit] * 8 + [read.CHUNK_UNITS * unit * 2] * 3)
  files = [FileMetadata('/in/%03d.jpg' % n, size) for n, size in enumerate(sizes)]
  weight_of = {f.path: read.chunk_weight(f) for f in files}
  assert (weight_of['/in/000.jpg'], weight_of['/in/070.jpg'], weight_of['/in/080.jpg']) == (
      1, 4, 2 * read.CHUNK_UNITS)

  def check(chunks):
    assert sorted(f.path for chunk in chunks for f in chunk) == [f.path for f in files]
    for chunk in chunks:
      assert chunk and (len(chunk) == 1
                        or sum(weight_of[f.path] for f in chunk) <= read.CHUNK_UNITS)
    assert max(len(chunk) for chunk in chunks) == read.CHUNK_UNITS  # small files, 32 a chunk
    assert sum(1 for chunk in chunks if weight_of[chunk[0].path] > read.CHUNK_UNITS) == 3

  with beam.Pipeline() as pipeline:
    chunks = pipeline | beam.Create(files) | read.ChunkPaths()
    assert_that(chunks | beam.combiners.ToList(), lambda lists: check(lists[0]))


@pytest.mark.parametrize('paths,input_format,expected', [
    (['/p/a.jpg', '/p/b'], 'auto', False),
    (['/p/a.jpg', '/s/train-0.tfrecord'], 'auto', True),
    (['/p/a.jpg', '/s/0.tar'], 'auto', True),
    (['/p/a.jpg'], 'webdataset', True),
    (['/s/0.tar'], 'files', False),
])
def test_holds_shards_from_matched_paths(paths, input_format, expected):
  assert read.holds_shards(paths, input_format) is expected


def test_launch_spreads_records_only_when_a_shard_was_matched(tmp_path, test_models):
  """A '*' pattern may match shards, but the launcher's listing knows whether it did:
  image bytes are shuffled only then."""
  from pipeline import options  # pylint: disable=import-outside-toplevel
  (tmp_path / 'a.jpg').write_bytes(b'not read at launch')

  def spread(*flags):
    args = options.build_parser().parse_args(
        ['--input', str(tmp_path / '*'), '--output', str(tmp_path / 'out'),
         '--model', 'v1=' + test_models['v1_tf1'], *flags])
    return options.make_config(args).spread_records

  assert spread() is False
  assert spread('--input_format', 'tfrecord') is True
  (tmp_path / 'b.tfrecord').write_bytes(b'')
  assert spread() is True


def _matched(pattern):
  return [metadata.path for metadata in read.match_pattern(pattern)]


def test_a_globstar_segment_also_matches_no_folder(tmp_path):
  for name in ('top.jpg', 'a/one.jpg', 'a/b/two.jpg', 'a/b/two.png', 'abc.jpg/x.txt'):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(b'x')
  d = str(tmp_path)
  # As bash's globstar and Python's glob have it; Beam's own match leaves out top.jpg.
  assert _matched(d + '/**/*.jpg') == [d + '/a/b/two.jpg', d + '/a/one.jpg', d + '/top.jpg']
  assert _matched(d + '/**/b/*.jpg') == [d + '/a/b/two.jpg']
  assert _matched(d + '/*.jpg') == [d + '/top.jpg']  # '*' stays within a folder
  assert _matched(d + '/**') == [d + '/a/b/two.jpg', d + '/a/b/two.png', d + '/a/one.jpg',
                                 d + '/abc.jpg/x.txt', d + '/top.jpg']
  assert _matched(d + '/a/one.jpg') == [d + '/a/one.jpg']
  assert _matched(d + '/nothing/**') == []


def test_links_to_folders_are_followed_once_and_dangling_links_kept(tmp_path):
  photos, elsewhere = tmp_path / 'photos', tmp_path / 'elsewhere'
  (elsewhere / 'sub').mkdir(parents=True)
  (elsewhere / 'sub' / 'far.jpg').write_bytes(b'x')
  photos.mkdir()
  (photos / 'near.jpg').write_bytes(b'x')
  (photos / 'linked').symlink_to(elsewhere)
  (photos / 'loop').symlink_to(photos)  # a link back up: listed once, not forever
  (photos / 'gone.jpg').symlink_to(tmp_path / 'deleted.jpg')
  matched = read.match_pattern(str(photos / '**' / '*.jpg'))
  assert [m.path for m in matched] == [str(photos / name) for name in (
      'gone.jpg', 'linked/sub/far.jpg', 'near.jpg')]
  assert [m.size_in_bytes for m in matched] == [0, 1, 1]
  # The dangling link is read, and fails with its reason instead of vanishing.
  failure = read.read_image_file(str(photos / 'gone.jpg'), str(photos) + '/')
  assert isinstance(failure, FailureRecord) and 'No such file' in failure.message


def test_a_folder_is_every_file_below_it(tmp_path):
  (tmp_path / 'f.jpg').write_bytes(b'x')
  d = str(tmp_path)
  assert read.folder_as_pattern(d) == d + '/**'
  assert read.folder_as_pattern(d + '/') == d + '/**'
  assert read.folder_as_pattern(d + '/f.jpg') == d + '/f.jpg'
  assert read.folder_as_pattern(d + '/*.jpg') == d + '/*.jpg'


def test_names_with_glob_characters_are_taken_as_they_are(tmp_path):
  folder = tmp_path / 'photos [2019]' / 'sub (1)'
  folder.mkdir(parents=True)
  names = ['img [1] *star?.jpg', 'plain.jpg']
  for name in names:
    (folder / name).write_bytes(b'x')
  (tmp_path / 'photos 2').mkdir()  # what '[2019]' would match as a class
  (tmp_path / 'photos 2' / 'other.jpg').write_bytes(b'x')
  top, d = str(tmp_path / 'photos [2019]'), str(folder)
  pattern = read.folder_as_pattern(top)
  assert pattern == str(tmp_path) + '/photos [[]2019]/**'
  assert _matched(pattern) == [d + '/' + name for name in names]
  # Keys are relative to the folder as it is named on disk.
  assert read.common_root([pattern]) == top + '/'
  one = read.folder_as_pattern(d + '/' + names[0])
  assert one == read.quote_glob(d) + '/img [[]1] [*]star[?].jpg' and not read.is_glob(one)
  assert _matched(one) == [d + '/' + names[0]]
  # Quoted by the user inside a pattern, and unquoted: a character class.
  assert _matched(str(tmp_path) + '/photos [[]2019]/**/*.jpg') == [
      d + '/' + name for name in names]
  assert _matched(str(tmp_path) + '/photos [2019]/**/*.jpg') == [
      str(tmp_path / 'photos 2' / 'other.jpg')]
  assert read.folder_as_pattern(str(tmp_path) + '/photos [2019]/**/*.jpg') == (
      str(tmp_path) + '/photos [2019]/**/*.jpg')  # a pattern, not an existing path
  assert read.unquote_glob(read.quote_glob('a[b]*c?')) == 'a[b]*c?'


def test_a_remote_name_with_glob_characters_can_be_quoted():
  import memory_filesystem  # pylint: disable=import-outside-toplevel
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  memory_filesystem.clear()
  base = memory_filesystem.PREFIX + 'bucket/photos [2019]'
  try:
    for name in ('a.jpg', 'b [1].jpg'):
      with FileSystems.create(base + '/' + name) as f:
        f.write(b'x')
    quoted = read.quote_glob(base)
    assert _matched(quoted + '/**/*.jpg') == [base + '/a.jpg', base + '/b [1].jpg']
    assert _matched(read.quote_glob(base + '/b [1].jpg')) == [base + '/b [1].jpg']
    assert read.common_root([quoted + '/**']) == base + '/'
  finally:
    memory_filesystem.clear()


def test_remote_patterns_follow_the_same_rules():
  import memory_filesystem  # pylint: disable=import-outside-toplevel
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  memory_filesystem.clear()
  base = memory_filesystem.PREFIX + 'bucket/photos'
  try:
    for name in ('top.jpg', 'a/one.jpg', 'a/one.png'):
      with FileSystems.create(base + '/' + name) as f:
        f.write(b'x')
    assert _matched(base + '/**/*.jpg') == [base + '/a/one.jpg', base + '/top.jpg']
    assert read.folder_as_pattern(base) == base + '/**'
    assert read.folder_as_pattern(base + '/top.jpg') == base + '/top.jpg'
    assert len(_matched(read.folder_as_pattern(base))) == 3
  finally:
    memory_filesystem.clear()


def test_a_limited_listing_stops_early_and_still_finds_a_match():
  import memory_filesystem  # pylint: disable=import-outside-toplevel
  from apache_beam.io.filesystems import FileSystems  # pylint: disable=import-outside-toplevel
  memory_filesystem.clear()
  base = memory_filesystem.PREFIX + 'bucket/photos'
  try:
    # Listed first, and matched by the widened 'photos/**IMG*.jpg' that Beam is given,
    # but not by the pattern itself.
    for name in ('aIMG1.jpg', 'aIMG2.jpg', 'd/IMG3.jpg', 'd/IMG4.jpg', 'd/IMG5.jpg'):
      with FileSystems.create(base + '/' + name) as f:
        f.write(b'x')
    pattern = base + '/**/IMG*.jpg'
    assert _matched(pattern) == [base + '/d/IMG%d.jpg' % n for n in (3, 4, 5)]
    assert len(read.match_pattern(pattern, limit=2)) == 2
    assert [m.path for m in read.match_pattern(pattern, limit=1)] == [base + '/d/IMG3.jpg']
  finally:
    memory_filesystem.clear()


def test_launch_lists_a_sample_of_each_pattern(tmp_path, test_models, monkeypatch):
  from pipeline import options  # pylint: disable=import-outside-toplevel
  for n in range(6):
    (tmp_path / ('%d.jpg' % n)).write_bytes(b'x')
  (tmp_path / 'z.tfrecord').write_bytes(b'')  # beyond the sample: judged by the first
  monkeypatch.setattr(options, 'LISTED_AT_LAUNCH', 3)
  args = options.build_parser().parse_args(
      ['--input', str(tmp_path / '*'), '--output', str(tmp_path / 'out'),
       '--model', 'v1=' + test_models['v1_tf1']])
  assert options.make_config(args).spread_records is False
  monkeypatch.setattr(options, 'LISTED_AT_LAUNCH', 10)
  assert options.make_config(args).spread_records is True


def test_a_run_over_a_folder_reads_everything_below_it(tmp_path, test_models):
  import imagegen  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  import run_pipeline  # pylint: disable=import-outside-toplevel
  from conftest import IN_PROCESS  # pylint: disable=import-outside-toplevel
  photos, elsewhere = tmp_path / 'photos', tmp_path / 'elsewhere'
  (photos / 'cats').mkdir(parents=True)
  elsewhere.mkdir()
  (photos / 'top.jpg').write_bytes(imagegen.encode(imagegen.photo(1, 64, 48)))
  (photos / 'cats' / 'cat.jpg').write_bytes(imagegen.encode(imagegen.photo(2, 64, 48)))
  (elsewhere / 'far.png').write_bytes(imagegen.encode(imagegen.photo(3, 64, 48), 'PNG'))
  (photos / 'linked').symlink_to(elsewhere)
  (photos / 'gone.jpg').symlink_to(tmp_path / 'deleted.jpg')
  out = tmp_path / 'out'
  run_pipeline.main(['--input', str(photos), '--output', str(out), '--no_report',
                     '--model', 'v3=' + test_models['v3_tf2'], *IN_PROCESS])
  keys = sorted(pq.read_table(str(out / 'v3' / 'embeddings')).column('key').to_pylist())
  assert keys == ['cats/cat.jpg', 'linked/far.png', 'top.jpg']
  failures = pq.read_table(str(out / 'failures')).to_pylist()
  assert [(f['key'], f['stage']) for f in failures] == [('gone.jpg', 'read')]
  manifest = json.loads((out / 'manifest.json').read_text())
  assert manifest['input']['patterns'] == [str(photos) + '/**']
  assert manifest['counts']['read'] == 4 and manifest['counts']['reconciled'] is True


def test_an_output_inside_the_input_folder_is_never_read_back(tmp_path, test_models, capsys):
  import imagegen  # pylint: disable=import-outside-toplevel
  import run_pipeline  # pylint: disable=import-outside-toplevel
  from conftest import IN_PROCESS  # pylint: disable=import-outside-toplevel
  photos = tmp_path / 'photos'
  photos.mkdir()
  for n in range(3):
    (photos / ('%d.jpg' % n)).write_bytes(imagegen.encode(imagegen.photo(n, 64, 48)))
  out = photos / 'embeddings-run'
  job = ['--input', str(photos), '--output', str(out), '--model', 'v3=' + test_models['v3_tf2'],
         *IN_PROCESS]
  run_pipeline.main(job)
  run_pipeline.main(job + ['--resume'])  # the first run's outputs now lie under photos/
  manifest = json.loads((out / 'manifest.json').read_text())
  assert manifest['counts']['read'] == 3 and manifest['counts']['decode_failed'] == 0
  assert [m.path for m in read.match_pattern(str(photos) + '/**', excluded=str(out))] == [
      str(photos / ('%d.jpg' % n)) for n in range(3)]
  with pytest.raises(SystemExit):
    run_pipeline.main(['--input', str(out), '--output', str(out), '--overwrite',
                       '--model', 'v3=' + test_models['v3_tf2'], *IN_PROCESS])
  assert 'matches no files outside --output' in capsys.readouterr().err


def test_a_pattern_matching_only_in_another_case_says_so(tmp_path, capsys):
  import run_pipeline  # pylint: disable=import-outside-toplevel
  for name in ('IMG_0001.JPG', 'IMG_0002.JPG'):
    (tmp_path / name).write_bytes(b'x')
  with pytest.raises(SystemExit) as exit_info:
    run_pipeline.main(['--input', str(tmp_path / '*.jpg'), '--output', str(tmp_path / 'out')])
  assert exit_info.value.code == 2
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert 'matches no files (patterns are case-sensitive: ' in error
  assert str(tmp_path / 'IMG_0001.JPG') in error


def test_a_bracket_pattern_matching_nothing_says_how_to_quote(tmp_path, capsys):
  import run_pipeline  # pylint: disable=import-outside-toplevel
  (tmp_path / 'photos [2019]').mkdir()
  (tmp_path / 'photos [2019]' / 'a.jpg').write_bytes(b'x')
  with pytest.raises(SystemExit) as exit_info:
    run_pipeline.main(['--input', str(tmp_path / 'photos [2019]' / '*.jpg'),
                       '--output', str(tmp_path / 'out')])
  assert exit_info.value.code == 2
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert "matches no files ('[...]' in a pattern matches one of the characters" in error
  assert "write '[[]'" in error


def test_source_matcher_covers_the_files_the_patterns_match_and_their_records():
  matcher = read.SourceMatcher([
      '/lib/photos [[]2019]/**',
      '/lib/**/*.jpg', '/shards/train-*.tfrecord', '/lib/notes #1.png'])
  covered = ['/lib/photos [2019]/a.png', '/lib/photos [2019]/sub/b.gif',
             '/lib/x/y/c.jpg', '/lib/c.jpg',
             '/lib/notes #1.png',  # a '#' in a file name
             '/shards/train-00001.tfrecord#17',  # a record of a shard
             '/lib/tars/a #2.jpg']
  outside = ['/lib/photos [2018]/a.png', '/lib/x/c.png', '/lib/notes #2.png',
             '/shards/test-00001.tfrecord#3', '/other/c.jpg']
  assert [uri for uri in covered + outside if matcher(uri)] == covered
