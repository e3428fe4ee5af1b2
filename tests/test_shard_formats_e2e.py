"""End-to-end runs over TFRecord and WebDataset shards: keys, labels, metadata, failures."""

import json

import pyarrow.parquet as pq
import pytest

import imagegen
import run_pipeline
from conftest import IN_PROCESS
from test_read import example, write_tar, write_tfrecord


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
  root = tmp_path_factory.mktemp('shards')
  write_tfrecord(root / 'train-00000.tfrecord',
                 [example(imagegen.encode(imagegen.photo(i)), 'img%d.jpg' % i, i % 2)
                  for i in range(4)] + [example(b'not an image', 'bad.jpg', 1)])
  write_tar(root / '00000.tar', [
      ('%09d.%s' % (i, extension), data) for i in range(3)
      for extension, data in (('jpg', imagegen.encode(imagegen.photo(10 + i))),
                              ('json', json.dumps({'url': 'http://x/%d' % i}).encode()),
                              ('txt', b'caption %d' % i), ('cls', b'%d' % (i % 2)))])
  return root


def test_tfrecord_and_webdataset_in_one_run(tmp_path, shards, test_models):
  out = tmp_path / 'out'
  run_pipeline.main(['--input', str(shards / '*.tfrecord'), '--input', str(shards / '*.tar'),
                     '--output', str(out), '--model', 'v1=' + test_models['v1_tf1'],
                     *IN_PROCESS])
  rows = {r['key']: r for r in pq.read_table(str(out / 'v1' / 'embeddings')).to_pylist()}
  assert sorted(rows) == ['000000000', '000000001', '000000002'] + [
      'train-00000.tfrecord#%d' % i for i in range(4)]
  assert rows['train-00000.tfrecord#3']['label'] == '1'
  assert json.loads(rows['train-00000.tfrecord#3']['metadata']) == {'image/filename': 'img3.jpg'}
  assert rows['000000002']['label'] == '0'
  assert json.loads(rows['000000002']['metadata']) == {'url': 'http://x/2',
                                                        'caption': 'caption 2'}
  assert rows['000000002']['uri'] == str(shards / '00000.tar') + '#000000002.jpg'
  # A shard's records have no file of their own: no size or time to resume by.
  assert {(r['file_size'], r['file_modified']) for r in rows.values()} == {(None, None)}
  failures = pq.read_table(str(out / 'failures')).to_pylist()
  assert [(f['key'], f['stage']) for f in failures] == [('train-00000.tfrecord#4', 'decode')]
  counts = json.loads((out / 'manifest.json').read_text())['counts']
  assert counts['read'] == 8 and counts['models']['v1'] == {
      'embedded': 7, 'failed': 1, 'embed_failed': 0}


def _img2dataset_shard(path, seed, samples=2):
  """A tar as img2dataset writes one: samples numbered from 000000000."""
  path.parent.mkdir(parents=True, exist_ok=True)
  write_tar(path, [('%09d.jpg' % i, imagegen.encode(imagegen.photo(seed + i)))
                   for i in range(samples)])


def test_two_img2dataset_folders_keep_their_samples_apart(tmp_path, test_models, capsys):
  # Both downloads number their samples from 000000000: keyed by the sample key alone,
  # the second folder's rows collided with the first's, and every resume embedded them
  # all again.
  library = tmp_path / 'library'
  _img2dataset_shard(library / 'cc3m' / '00000.tar', 20)
  _img2dataset_shard(library / 'laion' / '00000.tar', 30)
  out = tmp_path / 'out'
  args = ['--input', str(library / 'cc3m'), '--input', str(library / 'laion'),
          '--output', str(out), '--model', 'v1=' + test_models['v1_tf1'], '--no_report',
          *IN_PROCESS]
  run_pipeline.main(args)
  rows = {r['key']: r for r in pq.read_table(str(out / 'v1' / 'embeddings')).to_pylist()}
  assert sorted(rows) == ['cc3m/000000000', 'cc3m/000000001', 'laion/000000000',
                          'laion/000000001']
  assert rows['laion/000000001']['uri'] == str(library / 'laion' / '00000.tar') + '#000000001.jpg'
  assert json.loads((out / 'v1' / 'index_info.json').read_text())['repeated_key_rows'] == 0

  run_pipeline.main(args + ['--resume'])
  counts = json.loads((out / 'manifest.json').read_text())['counts']['models']['v1']
  assert (counts['resumed'], counts['changed'], counts['removed']) == (4, 0, 0)
  assert sorted(r['key'] for r in pq.read_table(str(out / 'v1' / 'embeddings')).to_pylist()) == (
      sorted(rows))
  assert 'warning' not in capsys.readouterr().out


def test_shards_of_one_folder_that_reuse_sample_keys_are_warned_of(tmp_path, test_models,
                                                                   capsys):
  folder = tmp_path / 'shards'
  _img2dataset_shard(folder / '00000.tar', 20, samples=3)
  _img2dataset_shard(folder / '00001.tar', 30, samples=2)  # numbered from 0 again
  out = tmp_path / 'out'
  run_pipeline.main(['--input', str(folder), '--output', str(out), '--no_report',
                     '--model', 'v1=' + test_models['v1_tf1'], *IN_PROCESS])
  info = json.loads((out / 'v1' / 'index_info.json').read_text())
  assert (info['repeated_key_rows'], info['repeated_key_examples']) == (
      2, ['000000000', '000000001'])
  manifest = json.loads((out / 'manifest.json').read_text())
  assert manifest['models'][0]['index']['repeated_key_rows'] == 2
  assert ('  warning: v1: 2 rows repeat the key of another (000000000, 000000001): a key '
          'should name one image' in capsys.readouterr().out)
  # A resume cannot tell the rows of a repeated key apart: it embeds them again, and
  # never loses one (it used to drop all of them and count them up to date).
  rows_before = sorted((row['key'], row['sha256']) for row in
                       pq.read_table(str(out / 'v1' / 'embeddings')).to_pylist())
  for _ in range(2):
    run_pipeline.main(['--input', str(folder), '--output', str(out), '--no_report',
                       '--model', 'v1=' + test_models['v1_tf1'], '--resume', *IN_PROCESS])
    rows = sorted((row['key'], row['sha256']) for row in
                  pq.read_table(str(out / 'v1' / 'embeddings')).to_pylist())
    assert rows == rows_before and len(rows) == 5
    manifest = json.loads((out / 'manifest.json').read_text())
    assert manifest['models'][0]['index']['count'] == 5
    assert manifest['counts']['reconciled']


def test_every_row_uri_finds_its_image_again(tmp_path, test_models):
  """Previews and queries read an image back from its row's uri: a member with an
  upper-case extension or a '#' in its name, and a TFRecord shard named without its
  format's extension, as TensorFlow's own tools name them."""
  from transforms.read import read_uri_bytes  # pylint: disable=import-outside-toplevel
  images = {name: imagegen.encode(imagegen.photo(seed))
            for seed, name in enumerate(['A.JPG', 'x y#1.jpg', 'plain.jpg'])}
  for folder in ('tars', 'records'):
    (tmp_path / folder).mkdir()
  write_tar(tmp_path / 'tars' / 'odd.tar', sorted(images.items()))
  records = [imagegen.encode(imagegen.photo(10 + i)) for i in range(2)]
  write_tfrecord(tmp_path / 'records' / 'train-00000-of-00001',
                 [example(data, 'r%d.jpg' % i, i) for i, data in enumerate(records)])
  expected = {'A': images['A.JPG'], 'x y#1': images['x y#1.jpg'],
              'plain': images['plain.jpg'],
              'train-00000-of-00001#0': records[0], 'train-00000-of-00001#1': records[1]}
  found = {}
  for folder, input_format in (('tars', 'webdataset'), ('records', 'tfrecord')):
    out = tmp_path / ('out-' + folder)
    run_pipeline.main(['--input', str(tmp_path / folder), '--input_format', input_format,
                       '--output', str(out), '--no_report',
                       '--model', 'v1=' + test_models['v1_tf1'], *IN_PROCESS])
    for row in pq.read_table(str(out / 'v1' / 'embeddings')).to_pylist():
      found[row['key']] = read_uri_bytes(row['uri'])
  assert found == expected
