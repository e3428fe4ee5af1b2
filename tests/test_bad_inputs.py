"""One run over every kind of bad input: each key is embedded or failed with its reason,
the job finishes, and read = embedded + failed for every model."""

import io
import json
import os
import socket
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import imagegen
import query_index
import run_pipeline
from conftest import IN_PROCESS
from test_read import example, write_tar, write_tfrecord

EMBEDDED = 'embedded'
MODELS = ('v1', 'v3')


def _photo(seed=1, width=120, height=80):
  return imagegen.photo(seed, width, height)


def _gray16_png():
  values = np.asarray(_photo().convert('L'), dtype=np.uint16) * 257
  return imagegen.encode(Image.fromarray(values), 'PNG')


def _animated_gif():
  return imagegen.encode(_photo(), 'GIF', save_all=True, append_images=[_photo(7), _photo(8)])


def _rotated_by_exif():
  exif = Image.Exif()
  exif[0x0112] = 6  # display rotated 90 degrees clockwise
  return imagegen.encode(_photo(2).transpose(Image.ROTATE_90), 'JPEG', exif=exif.tobytes(),
                         quality=95)


def _upright_copy():
  """The picture of _rotated_by_exif as a viewer shows it, stored losslessly upright."""
  stored = Image.open(io.BytesIO(_rotated_by_exif()))
  return imagegen.encode(stored.transpose(Image.ROTATE_270).convert('RGB'), 'PNG')


def _heic():
  # An ISO media file with the HEIF brand: Pillow has no decoder for it.
  return b'\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic' + bytes(200)


# file name -> (bytes, expected outcome: EMBEDDED or (stage, fragment of the message))
FILE_CASES = {
    'zero.jpg': (lambda: b'', ('decode', 'empty file')),
    'truncated.jpg': (lambda: imagegen.encode(_photo())[:400], ('decode', 'truncated')),
    'random.jpg': (lambda: np.random.default_rng(0).bytes(3000),
                   ('decode', 'unsupported or unrecognized image format')),
    'notes.txt': (lambda: b'not an image, just some text\n' * 20,
                  ('decode', 'unsupported or unrecognized image format')),
    'alpha.png': (lambda: imagegen.encode(_photo().convert('RGBA'), 'PNG'), EMBEDDED),
    'palette.png': (lambda: imagegen.encode(_photo().convert('P'), 'PNG'), EMBEDDED),
    'palette.gif': (lambda: imagegen.encode(_photo(3), 'GIF'), EMBEDDED),
    'animated.gif': (_animated_gif, EMBEDDED),
    'first_frame.gif': (lambda: imagegen.encode(_photo(), 'GIF'), EMBEDDED),
    'gray16.png': (_gray16_png, EMBEDDED),
    'gray.jpg': (lambda: imagegen.encode(_photo(4).convert('L')), EMBEDDED),
    'cmyk.jpg': (lambda: imagegen.encode(_photo(5).convert('CMYK')), EMBEDDED),
    'rotated6.jpg': (_rotated_by_exif, EMBEDDED),
    'upright.png': (_upright_copy, EMBEDDED),
    'one_pixel.png': (lambda: imagegen.encode(Image.new('RGB', (1, 1), (200, 30, 30)), 'PNG'),
                      EMBEDDED),
    'panorama.jpg': (lambda: imagegen.encode(imagegen.photo(6, 10000, 50)), EMBEDDED),
    'photo.tiff': (lambda: imagegen.encode(_photo(9), 'TIFF'), EMBEDDED),
    'photo.webp': (lambda: imagegen.encode(_photo(10), 'WEBP'), EMBEDDED),
    'photo.heic': (_heic, ('decode', 'unsupported or unrecognized image format')),
    # PostScript is a program: Pillow would hand it to Ghostscript.
    'drawing.eps': (lambda: b'%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n',
                    ('decode', 'unsupported or unrecognized image format')),
    # Between Pillow's warning (89 Mpx) and error (179 Mpx) thresholds: only our check
    # stops it before the 144 MB of pixels are allocated.
    'bomb.png': (lambda: imagegen.bomb_png(12000, 12000), ('decode', 'decompression bomb')),
}
OTHER_CASES = {
    # Listed like a file, but not one: refused before it is opened.
    'files/socket.jpg': ('read', 'is a socket, not a regular file'),
    'shards/s.tfrecord#0': EMBEDDED,
    'shards/s.tfrecord#1': ('read', 'checksum'),
    'shards/s.tfrecord#2': EMBEDDED,
    'shards/000000000': EMBEDDED,  # a WebDataset sample, keyed below its shard's folder
    'shards/000000001': EMBEDDED,
    'shards/000000002': ('read', ''),  # the tar ends inside this sample's image
}
EXPECTED = dict({'files/' + name: outcome for name, (_, outcome) in FILE_CASES.items()},
                **OTHER_CASES)


def _plant_socket(path):
  server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  server.bind(str(path))
  server.close()  # the socket file stays


def _plant_shards(shards):
  shards.mkdir()
  write_tfrecord(shards / 's.tfrecord', [example(imagegen.encode(_photo(20 + i)), '%d.jpg' % i)
                                         for i in range(3)])
  data = bytearray((shards / 's.tfrecord').read_bytes())
  marker = imagegen.encode(_photo(21))
  data[data.find(marker) + 100] ^= 0xFF  # record 1's payload no longer matches its CRC
  (shards / 's.tfrecord').write_bytes(bytes(data))
  write_tar(shards / 'w.tar', [('%09d.jpg' % i, imagegen.encode(_photo(30 + i)))
                               for i in range(3)])
  with tarfile.open(shards / 'w.tar') as tar:
    cut = tar.getmember('000000002.jpg').offset_data + 100  # inside sample 2's image
  (shards / 'w.tar').write_bytes((shards / 'w.tar').read_bytes()[:cut])


@pytest.fixture(scope='module')
def bad_input_run(tmp_path_factory, test_models):
  root = tmp_path_factory.mktemp('bad_inputs')
  files = root / 'files'
  files.mkdir()
  for name, (make, _) in FILE_CASES.items():
    (files / name).write_bytes(make())
  _plant_socket(files / 'socket.jpg')
  _plant_shards(root / 'shards')
  out = root / 'out'
  run_pipeline.main(['--input', str(files / '*'), '--input', str(root / 'shards' / '*'),
                     '--output', str(out), '--batch_size', '8',
                     '--model', 'v1=' + test_models['v1_tf1'],
                     '--model', 'v3=' + test_models['v3_tf2'], *IN_PROCESS])
  rows = {model: {r['key']: r for r in pq.read_table(str(out / model / 'embeddings')).to_pylist()}
          for model in MODELS}
  failures = pq.read_table(str(out / 'failures')).to_pylist()
  return out, rows, failures


@pytest.mark.parametrize('key', sorted(EXPECTED))
def test_each_bad_input_has_its_outcome(bad_input_run, key):
  _, rows, failures = bad_input_run
  expected = EXPECTED[key]
  failed = [f for f in failures if f['key'] == key]
  for model in MODELS:
    assert (key in rows[model]) == (expected == EMBEDDED), (key, model, failed)
  if expected == EMBEDDED:
    assert not failed
  else:
    stage, fragment = expected
    assert len(failed) == 1, failed
    assert failed[0]['stage'] == stage and failed[0]['model'] is None
    assert fragment.lower() in failed[0]['message'].lower(), failed[0]
    assert failed[0]['error']


def test_counts_reconcile_per_model(bad_input_run):
  out, rows, failures = bad_input_run
  counts = json.loads((out / 'manifest.json').read_text())['counts']
  embedded = sorted(k for k, v in EXPECTED.items() if v == EMBEDDED)
  assert counts['read'] == len(EXPECTED)
  assert counts['reconciled'] is True
  for model in MODELS:
    assert sorted(rows[model]) == embedded
    assert counts['models'][model]['embedded'] == len(embedded)
    assert counts['models'][model]['failed'] == len(failures) == len(EXPECTED) - len(embedded)


def _vector(rows, key):
  return np.asarray(rows[key]['embedding'], dtype=np.float64)


@pytest.mark.parametrize('model', MODELS)
def test_exif_rotation_and_animation_embed_like_their_plain_pictures(bad_input_run, model):
  _, rows, _ = bad_input_run
  rows = rows[model]
  assert (rows['files/rotated6.jpg']['width'], rows['files/rotated6.jpg']['height']) == (120, 80)
  np.testing.assert_allclose(_vector(rows, 'files/rotated6.jpg'),
                             _vector(rows, 'files/upright.png'), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_vector(rows, 'files/animated.gif'),
                             _vector(rows, 'files/first_frame.gif'), rtol=1e-5, atol=1e-6)


def test_sizes_of_extreme_shapes(bad_input_run):
  _, rows, _ = bad_input_run
  for model in MODELS:
    got = rows[model]
    assert (got['files/one_pixel.png']['width'], got['files/one_pixel.png']['height']) == (1, 1)
    assert (got['files/panorama.jpg']['width'], got['files/panorama.jpg']['height']) == (
        10000, 50)
    assert np.isfinite(_vector(got, 'files/panorama.jpg')).all()


def test_a_run_where_every_image_fails_finishes(tmp_path, test_models, capsys):
  # Nothing to index must not stop the job after the failures are written.
  for name in ('random.jpg', 'notes.txt', 'zero.jpg'):
    (tmp_path / name).write_bytes(FILE_CASES[name][0]())
  out = tmp_path / 'out'
  run_pipeline.main(['--input', str(tmp_path / '*.*'), '--output', str(out),
                     '--model', 'v3=' + test_models['v3_tf2'], '--no_report', *IN_PROCESS])
  manifest = json.loads((out / 'manifest.json').read_text())
  assert manifest['counts']['models']['v3'] == {'embedded': 0, 'embed_failed': 0, 'failed': 3}
  assert manifest['counts']['reconciled'] is True
  assert sorted(f['key'] for f in pq.read_table(str(out / 'failures')).to_pylist()) == [
      'notes.txt', 'random.jpg', 'zero.jpg']
  assert 'v3/  (embeddings/, no index: nothing embedded)' in capsys.readouterr().out
  with pytest.raises(SystemExit) as stopped:
    query_index.main(['--run', str(out), '--image', str(tmp_path / 'random.jpg')])
  assert stopped.value.code == 2
  assert 'embedded no image in this run' in capsys.readouterr().err


@pytest.mark.parametrize('name', sorted(FILE_CASES))
def test_a_file_is_judged_by_its_first_bytes_as_the_decoder_judges_it(tmp_path, name):
  from transforms.decode import decode_record  # pylint: disable=import-outside-toplevel
  from transforms.read import read_image_file  # pylint: disable=import-outside-toplevel
  data = FILE_CASES[name][0]()
  (tmp_path / name).write_bytes(data)
  record = read_image_file(str(tmp_path / name), str(tmp_path) + '/')
  # Read in full unless decoding the whole file fails for its format alone, and then
  # with the same reason.
  if FILE_CASES[name][1] == EMBEDDED:
    assert record.data == data
  else:
    assert record.data == data or len(record.data) == 16
    whole = decode_record(record._replace(data=data), [(32, 32)])
    read = decode_record(record, [(32, 32)])
    assert (read.stage, read.message) == (whole.stage, whole.message)


def test_a_large_file_that_is_no_image_is_not_read_in_full(tmp_path):
  import tracemalloc  # pylint: disable=import-outside-toplevel
  from transforms.decode import decode_record  # pylint: disable=import-outside-toplevel
  from transforms.read import read_image_file  # pylint: disable=import-outside-toplevel
  video = tmp_path / 'clip.mov'
  with open(video, 'wb') as handle:  # a QuickTime header, then 2 GB (sparse on disk)
    handle.write(b'\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00')
    handle.truncate(2 * 2**30)
  tracemalloc.start()
  try:
    record = read_image_file(str(video), str(tmp_path) + '/')
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 2**20
  failure = decode_record(record, [(32, 32)])
  assert (failure.stage, failure.message) == ('decode', 'unsupported or unrecognized image format')


def test_file_names_that_are_not_utf8_are_embedded_and_found_again(tmp_path, test_models):
  # An old Latin-1 archive: os.listdir gives such a name with a lone surrogate per byte,
  # which no Parquet string can hold (it crashed the write stage).
  folder = tmp_path / 'photos'
  folder.mkdir()
  latin1 = os.fsdecode(b'caf\xe9.jpg')
  files = {latin1: 1, 'new\nline.jpg': 2, 'plain.jpg': 3}
  for name, seed in files.items():
    (folder / name).write_bytes(imagegen.encode(_photo(seed)))
  encoded = imagegen.encode(_photo(4))
  # A member name written the same way.
  write_tar(folder / 'w.tar', [(os.fsdecode(b'd\xfcsseldorf.jpg'), encoded)])
  out = tmp_path / 'out'
  args = ['--input', str(folder), '--output', str(out), '--model', 'v3=' + test_models['v3_tf2'],
          '--no_report', *IN_PROCESS]
  run_pipeline.main(args)

  rows = {row['key']: row for row in pq.read_table(str(out / 'v3' / 'embeddings')).to_pylist()}
  assert sorted(rows) == ['caf\\xe9.jpg', 'd\\xfcsseldorf', 'new\nline.jpg', 'plain.jpg']
  assert json.loads((out / 'manifest.json').read_text())['counts']['reconciled'] is True
  # The stored uris lead back to the files (previews, queries).
  from transforms.read import read_uri_bytes  # pylint: disable=import-outside-toplevel
  assert read_uri_bytes(rows['caf\\xe9.jpg']['uri']) == (folder / latin1).read_bytes()
  assert read_uri_bytes(rows['d\\xfcsseldorf']['uri']) == encoded
  found = query_index.run_queries(str(out), keys=['caf\\xe9.jpg'], k=1)
  assert found[0]['neighbors'][0]['key'] == 'caf\\xe9.jpg'
  by_image = query_index.run_queries(str(out), images=[str(folder / latin1)], k=1)
  assert by_image[0]['query'] == str(folder) + '/caf\\xe9.jpg'
  assert by_image[0]['neighbors'][0]['key'] == 'caf\\xe9.jpg'

  # A resume keys them as the run did: nothing changed, the files are not read again.
  run_pipeline.main(args + ['--resume'])
  counts = json.loads((out / 'manifest.json').read_text())['counts']
  assert counts['unchanged_not_read'] == 3
  assert counts['models']['v3']['resumed'] == 4 and counts['models']['v3']['removed'] == 0


def test_an_image_a_model_gives_nan_for_is_that_model_s_failure(tmp_path, test_models):
  import model_factory  # pylint: disable=import-outside-toplevel
  unstable = model_factory.save_dark_nan_projection(8, 32, str(tmp_path / 'unstable'))
  folder = tmp_path / 'photos'
  folder.mkdir()
  (folder / 'photo.jpg').write_bytes(imagegen.encode(_photo()))
  for name, colour in (('black.png', (0, 0, 0)), ('white.png', (255, 255, 255))):
    (folder / name).write_bytes(imagegen.encode(Image.new('RGB', (40, 30), colour), 'PNG'))
  out = tmp_path / 'out'
  run_pipeline.main(['--input', str(folder), '--output', str(out), '--no_report',
                     '--model', 'unstable=' + unstable, '--model', 'v3=' + test_models['v3_tf2'],
                     *IN_PROCESS])

  failures = pq.read_table(str(out / 'failures')).to_pylist()
  assert [(f['key'], f['stage'], f['error'], f['model']) for f in failures] == [
      ('black.png', 'embed', 'NonFiniteEmbedding', 'unstable')]
  assert failures[0]['message'] == (
      'the model gave 8 non-finite values (NaN or infinity) of 8 for this image')
  keys = {model: sorted(pq.read_table(str(out / model / 'embeddings')).column('key').to_pylist())
          for model in ('unstable', 'v3')}
  assert keys == {'unstable': ['photo.jpg', 'white.png'],
                  'v3': ['black.png', 'photo.jpg', 'white.png']}
  counts = json.loads((out / 'manifest.json').read_text())['counts']
  assert counts['reconciled'] is True
  assert counts['models']['unstable'] == {'embedded': 2, 'failed': 1, 'embed_failed': 1}
  found = query_index.run_queries(str(out), 'unstable', keys=['white.png'], k=5)
  assert [n['key'] for n in found[0]['neighbors']] == ['white.png', 'photo.jpg']
  with pytest.raises(query_index.QueryError, match='black.png: the model gave non-finite'):
    query_index.run_queries(str(out), 'unstable', images=[str(folder / 'black.png')])
