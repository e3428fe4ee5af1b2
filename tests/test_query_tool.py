"""query_index.py over a real run: image lists, the HTML page in Chromium, near-duplicates."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import imagegen
import query_index
import run_pipeline
from schemas import outputs
from browser import screenshot
from conftest import IN_PROCESS

ODD_NAME = '<b>odd & "name".jpg'


@pytest.fixture(scope='module')
def query_run(tmp_path_factory, photo_tree, test_models):
  """A run of the v3 test model over the photo tree plus an exact copy, a re-encoded copy
  and a file whose name is HTML markup; its weights not frozen (the other runs' are)."""
  root, paths, _ = photo_tree
  shutil.copy(paths[0], root / 'boats' / 'copy_of_000.jpg')
  (root / 'boats' / 'requality_000.jpg').write_bytes(
      imagegen.encode(imagegen.photo(0, 320, 240), quality=60))
  (root / 'dogs' / ODD_NAME).write_bytes(imagegen.encode(imagegen.photo(50)))
  out = tmp_path_factory.mktemp('query_run') / 'out'
  run_pipeline.main(['--input', str(root / '**' / '*.jpg'), '--input', str(root / '**' / '*.png'),
                     '--output', str(out), '--batch_size', '4',
                     '--model', 'v3=' + test_models['v3_tf2'], '--no_report', '--no_freeze_weights',
                     *IN_PROCESS])
  return out, root, paths


def test_queries_load_the_model_as_the_run_did(query_run):
  out, _, _ = query_run
  entry = json.loads((out / 'manifest.json').read_text())['models'][0]
  assert entry['freeze_weights'] is False
  assert query_index.spec_of(entry).freeze_weights is False


def test_images_from_file_equals_image_flags(query_run, tmp_path, capsys):
  out, root, paths = query_run
  listing = tmp_path / 'queries.txt'
  listing.write_text('%s\n\n%s\n' % (paths[1], root / 'dogs' / ODD_NAME))
  from_file = query_index.main(['--run', str(out), '--images_from', str(listing), '--k', '3',
                                '--format', 'json'])
  direct = query_index.main(['--run', str(out), '--image', str(paths[1]),
                             '--image', str(root / 'dogs' / ODD_NAME), '--k', '3'])
  capsys.readouterr()
  assert from_file == direct
  assert [r['neighbors'][0]['key'] for r in from_file] == ['dogs/001.jpg', 'dogs/' + ODD_NAME]


def test_many_query_images_are_embedded_a_batch_at_a_time(query_run, monkeypatch):
  out, _, paths = query_run
  paths = [str(path) for path in paths[:5]]
  import transforms.models  # pylint: disable=import-outside-toplevel
  batch_sizes = []
  real_load = transforms.models.load_embedder

  def recording_load(spec):
    embedder = real_load(spec)

    def embed(pixels):
      batch_sizes.append(len(pixels))
      return embedder(pixels)
    embed.input_size = embedder.input_size
    return embed
  one_by_one = [query_index.run_queries(str(out), images=[path], k=3)[0] for path in paths]
  monkeypatch.setattr(query_index, 'load_embedder', recording_load)
  monkeypatch.setattr(query_index, 'QUERY_BATCH_IMAGES', 2)

  together = query_index.run_queries(str(out), images=paths, k=3)
  # A model check's picture, then the five images two at a time (memory stays bounded).
  assert batch_sizes == [1, 2, 2, 1]
  assert [r['query'] for r in together] == paths
  for alone, batched in zip(one_by_one, together):
    assert [n['key'] for n in alone['neighbors']] == [n['key'] for n in batched['neighbors']]
    assert [n['score'] for n in alone['neighbors']] == pytest.approx(
        [n['score'] for n in batched['neighbors']], abs=1e-5)


def test_a_folder_or_pattern_queries_every_image_it_names(query_run, tmp_path, capsys):
  out, _, paths = query_run
  folder = tmp_path / 'queries [new]'  # taken as it is, as --input takes it
  (folder / 'more').mkdir(parents=True)
  for path, name in zip(paths[:3], ('b.jpg', 'a.jpg', 'more/c.jpg')):
    shutil.copy(path, folder / name)
  named = [str(folder / name) for name in ('a.jpg', 'b.jpg', 'more/c.jpg')]
  one_by_one = query_index.main(['--run', str(out), '--k', '2', '--format', 'json']
                                + [flag for path in named for flag in ('--image', path)])
  by_folder = query_index.main(['--run', str(out), '--k', '2', '--format', 'json',
                                '--image', str(folder)])
  by_pattern = query_index.main(['--run', str(out), '--k', '2', '--format', 'json',
                                 '--image', str(folder).replace('[', '[[]') + '/**/*.jpg'])
  capsys.readouterr()
  assert [r['query'] for r in by_folder] == named
  assert by_folder == one_by_one == by_pattern

  with pytest.raises(SystemExit) as exit_info:
    query_index.main(['--run', str(out), '--image', str(tmp_path / '*.png')])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.strip().splitlines() == [
      'query_index.py: error: --image %s matches no files' % (tmp_path / '*.png')]


def test_a_query_folder_leaves_out_files_that_are_not_images(query_run, tmp_path, capsys):
  """Sidecar files in a folder of query images are left out with a note; a corrupt
  image, or a file named on its own, still stops the query (it was meant as an image)."""
  out, _, paths = query_run
  folder = tmp_path / 'queries'
  folder.mkdir()
  shutil.copy(paths[0], folder / 'a.jpg')
  (folder / 'a.txt').write_text('a caption')
  (folder / 'Thumbs.db').write_bytes(b'\xd0\xcf\x11\xe0' + bytes(60))
  results = query_index.main(['--run', str(out), '--k', '1', '--format', 'json',
                              '--image', str(folder)])
  assert [r['query'] for r in results] == [str(folder / 'a.jpg')]
  assert capsys.readouterr().err.strip().splitlines() == [
      'query_index.py: note: --image %s: left out 2 files that are not images (%s, %s)' % (
          folder, folder / 'Thumbs.db', folder / 'a.txt')]
  for flags in (['--image', str(folder / 'a.txt')], ['--image', str(folder / '*.txt')]):
    with pytest.raises(SystemExit) as exit_info:
      query_index.main(['--run', str(out), *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1
  assert error == ['query_index.py: error: --image %s matches no image files (1 other files, '
                   'such as %s)' % (folder / '*.txt', folder / 'a.txt')]
  (folder / 'b.jpg').write_bytes(paths[0].read_bytes()[:300])  # a JPEG cut short
  with pytest.raises(SystemExit) as exit_info:
    query_index.main(['--run', str(out), '--image', str(folder)])
  assert exit_info.value.code == 2
  assert 'cannot use query image %s' % (folder / 'b.jpg') in capsys.readouterr().err


def test_an_image_list_from_a_windows_editor_or_empty(query_run, tmp_path, capsys):
  out, _, paths = query_run
  listing = tmp_path / 'queries.txt'
  listing.write_bytes(('\ufeff%s\r\n%s\r\n' % (paths[1], paths[2])).encode('utf-8'))
  results = query_index.main(['--run', str(out), '--images_from', str(listing), '--k', '1'])
  assert [r['query'] for r in results] == [str(paths[1]), str(paths[2])]
  capsys.readouterr()
  listing.write_text('\n  \n')
  with pytest.raises(SystemExit) as exit_info:
    query_index.main(['--run', str(out), '--images_from', str(listing)])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.strip().splitlines() == [
      'query_index.py: error: --images_from %s lists no image (it holds only blank lines)'
      % listing]


def test_a_path_given_as_a_key_is_told_its_key(query_run, capsys):
  out, root, paths = query_run
  with pytest.raises(SystemExit) as exit_info:
    query_index.main(['--run', str(out), '--key', str(paths[1])])
  assert exit_info.value.code == 2
  key = str(paths[1].relative_to(root))
  assert capsys.readouterr().err.strip().splitlines() == [
      'query_index.py: error: no embedding with key %s in model v3 (%s is the key of %s; '
      'keys are paths relative to %s/)' % (paths[1], key, paths[1], root)]
  assert query_index.main(['--run', str(out), '--key', key, '--k', '1'])[0]['neighbors'][0][
      'key'] == key


def test_the_key_of_a_failed_input_is_told_why(query_run, capsys):
  out, _, _ = query_run
  with pytest.raises(SystemExit) as exit_info:
    query_index.main(['--run', str(out), '--key', 'cats/corrupt.jpg', '--key', 'cats/none.jpg'])
  assert exit_info.value.code == 2
  error = capsys.readouterr().err.strip().splitlines()
  assert len(error) == 1 and error[0].startswith(
      'query_index.py: error: no embedding with key cats/corrupt.jpg, cats/none.jpg in model '
      'v3 (cats/corrupt.jpg failed at decode: ')


def test_missing_image_list_is_one_line(query_run, tmp_path, capsys):
  out, _, _ = query_run
  with pytest.raises(SystemExit) as exit_info:
    query_index.main(['--run', str(out), '--images_from', str(tmp_path / 'none.txt')])
  assert exit_info.value.code == 2
  assert 'cannot read --images_from' in capsys.readouterr().err


@pytest.mark.parametrize('trailing_slash', ['', '/'])
def test_out_naming_a_folder_is_refused_and_the_folder_kept(query_run, tmp_path, capsys,
                                                           trailing_slash):
  out, _, _ = query_run
  folder = tmp_path / 'results'
  (folder / 'sub').mkdir(parents=True)
  (folder / 'keep.txt').write_text('mine')
  with pytest.raises(SystemExit) as exit_info:
    query_index.main(['--run', str(out), '--key', 'dogs/001.jpg', '--format', 'json',
                      '--out', str(folder) + trailing_slash])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.strip().splitlines() == [
      'query_index.py: error: --out %s%s is a folder; give the name of a file to write, for '
      'example --out %s/results.json' % (folder, trailing_slash, folder)]
  assert sorted(path.name for path in folder.iterdir()) == ['keep.txt', 'sub']
  assert (folder / 'keep.txt').read_text() == 'mine'


def test_replacing_a_file_never_deletes_a_folder(tmp_path):
  folder = tmp_path / 'target'
  folder.mkdir()
  (folder / 'keep.txt').write_text('mine')
  with pytest.raises(Exception):
    outputs.write_bytes_atomically(str(folder), b'results')
  assert (folder / 'keep.txt').read_text() == 'mine'


def test_a_run_being_rebuilt_is_refused_until_it_ends(query_run, tmp_path, capsys):
  """An --index_only rebuild keeps the manifest while it replaces the index files one by
  one; a query meanwhile is refused, as a second run would be (here this test is the
  live writer)."""
  from pipeline import resume  # pylint: disable=import-outside-toplevel
  out, _, _ = query_run
  copy = tmp_path / 'run'
  shutil.copytree(out, copy)
  resume.mark_being_written(str(copy))
  for flags in (['--key', 'dogs/001.jpg'], ['--duplicates']):
    with pytest.raises(SystemExit) as exit_info:
      query_index.main(['--run', str(copy), *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(
        'query_index.py: error: --run %s is being written by another run (process %d, '
        % (copy, os.getpid()))
  resume.unmark_being_written(str(copy))
  assert query_index.main(['--run', str(copy), '--key', 'dogs/001.jpg', '--k', '1'])[0][
      'neighbors'][0]['key'] == 'dogs/001.jpg'


def test_an_index_left_half_rebuilt_is_one_line(query_run, tmp_path, capsys):
  """A rebuild killed between its files: the search parameters of another index type."""
  out, _, _ = query_run
  copy = tmp_path / 'run'
  shutil.copytree(out, copy)
  info_path = copy / 'v3' / 'index_info.json'
  info = json.loads(info_path.read_text())
  info_path.write_text(json.dumps(dict(info, search_parameters={'nprobe': 8})))
  with pytest.raises(SystemExit) as exit_info:
    query_index.main(['--run', str(copy), '--key', 'dogs/001.jpg'])
  assert exit_info.value.code == 2
  error = capsys.readouterr().err.strip().splitlines()
  assert len(error) == 1 and error[0].startswith(
      'query_index.py: error: cannot read the index of model v3 in %s (could not set '
      'parameter nprobe); ' % copy)
  assert error[0].endswith('rebuild it with run_pipeline.py --output %s --index_only '
                           '--model v3' % copy)


def test_a_run_folder_renamed_with_brackets_is_one_line(query_run, tmp_path, capsys):
  out, _, _ = query_run
  renamed = tmp_path / 'run [old]'
  shutil.copytree(out, renamed)
  with pytest.raises(SystemExit) as exit_info:
    query_index.main(['--run', str(renamed), '--key', 'dogs/001.jpg'])
  assert exit_info.value.code == 2
  error = capsys.readouterr().err.strip().splitlines()
  assert len(error) == 1
  assert error[0].startswith('query_index.py: error: --run ') and "holds '['" in error[0]


def test_html_page_shows_queries_beside_neighbours(query_run, tmp_path):
  out, root, paths = query_run
  page = tmp_path / 'results.html'
  query_index.main(['--run', str(out), '--image', str(root / 'dogs' / ODD_NAME),
                    '--key', 'cats/000.jpg', '--k', '3', '--format', 'html',
                    '--out', str(page)])
  text = page.read_text()
  assert ODD_NAME not in text and '&lt;b&gt;odd &amp; &quot;name&quot;.jpg' in text
  assert text.count('<img src="data:image/jpeg;base64,') == 2 * (1 + 3)  # self-contained
  assert '#1  score 1.0000' in text and 'boats/copy_of_000.jpg' in text
  png = screenshot(page, tmp_path / 'results.png', 1000, 700)
  pixels = Image.open(png).convert('RGB')
  # Two rows of four 160 px thumbnails cover about half of this area with the photos'
  # saturated colours; captions alone would cover almost none of it.
  grid = [(x, y) for x in range(20, 720, 8) for y in range(100, 500, 8)]
  coloured = [p for p in grid if max(pixels.getpixel(p)) - min(pixels.getpixel(p)) > 60]
  assert len(coloured) > 0.3 * len(grid)


def test_a_query_reads_the_manifest_once(query_run, tmp_path, monkeypatch):
  # Each read is a request on Cloud Storage, and a run replaced between two reads would
  # give the page another run's image limit than the one its queries used.
  out, root, _ = query_run
  manifests_read = []
  read_json = outputs.read_json

  def counting_read_json(path):
    if path.endswith(outputs.MANIFEST_FILE):
      manifests_read.append(path)
    return read_json(path)

  monkeypatch.setattr(outputs, 'read_json', counting_read_json)
  for flags in (['--image', str(root / 'dogs' / ODD_NAME)], ['--duplicates']):
    manifests_read.clear()
    query_index.main(['--run', str(out), *flags, '--k', '2', '--format', 'html',
                      '--out', str(tmp_path / 'page.html')])
    assert len(manifests_read) == 1, flags
    assert '<img src="data:image/jpeg;base64,' in (tmp_path / 'page.html').read_text()


def test_duplicates_groups_copies_only(query_run, tmp_path, capsys):
  out, _, _ = query_run
  groups = query_index.main(['--run', str(out), '--duplicates', '--threshold', '0.98',
                             '--format', 'json'])
  assert json.loads(capsys.readouterr().out) == groups
  assert [sorted(i['key'] for i in g['images']) for g in groups] == [
      ['boats/copy_of_000.jpg', 'boats/requality_000.jpg', 'cats/000.jpg']]
  pairs = {tuple(sorted(p['keys'])): p['score'] for p in groups[0]['pairs']}
  assert pairs[('boats/copy_of_000.jpg', 'cats/000.jpg')] > 0.9999
  assert groups[0]['max_score'] == max(pairs.values())
  page = tmp_path / 'duplicates.html'
  query_index.main(['--run', str(out), '--duplicates', '--threshold', '0.98', '--format',
                    'html', '--out', str(page)])
  assert page.read_text().count('<img src="data:image/jpeg') == 3
  # A low threshold joins unrelated photos into one group.
  loose = query_index.main(['--run', str(out), '--duplicates', '--threshold', '-1',
                            '--format', 'json'])
  capsys.readouterr()
  embedded = json.loads((out / 'manifest.json').read_text())['counts']['models']['v3']
  assert len(loose) == 1 and len(loose[0]['images']) == embedded['embedded'] == 15


def test_duplicates_take_no_queries(query_run, capsys):
  out, _, paths = query_run
  with pytest.raises(SystemExit):
    query_index.main(['--run', str(out), '--duplicates', '--image', str(paths[0])])
  assert 'takes no --image' in capsys.readouterr().err


@pytest.mark.parametrize('flags,expected', [
    (['--key', 'dogs/001.jpg', '--threshold', '0.9'], '--threshold applies to --duplicates only'),
    (['--duplicates', '--threshold', '1.5'],
     '--threshold is a cosine similarity, from -1 to 1 (got 1.5)'),
])
def test_threshold_mistakes_are_one_line(query_run, capsys, flags, expected):
  out, _, _ = query_run
  with pytest.raises(SystemExit) as exit_info:
    query_index.main(['--run', str(out), *flags])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.strip().splitlines() == ['query_index.py: error: ' + expected]


def test_scores_stay_cosines(query_run):
  out, _, _ = query_run
  keys = ['dogs/001.jpg', 'boats/copy_of_000.jpg', 'cats/000.jpg']
  for result in query_index.main(['--run', str(out), '--k', '20'] +
                                 [flag for key in keys for flag in ('--key', key)]):
    scores = [n['score'] for n in result['neighbors']]
    assert all(-1.0 <= score <= 1.0 for score in scores)
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.9999


def test_a_replaced_model_is_not_used_for_queries(tmp_path, photo_tree, capsys):
  import model_factory  # pylint: disable=import-outside-toplevel
  root, paths, _ = photo_tree
  model = tmp_path / 'model'
  model_factory.save_projection(16, 224, str(model), seed=0)
  out = tmp_path / 'out'
  run_pipeline.main(['--input', str(root / '**' / '*.jpg'), '--output', str(out),
                     '--model', 'tiny=%s' % model, '--no_report', *IN_PROCESS])
  query = ['--run', str(out), '--image', str(paths[1]), '--k', '1', '--format', 'json']
  assert query_index.main(query)[0]['neighbors'][0]['score'] > 0.999
  shutil.rmtree(model)
  model_factory.save_projection(16, 224, str(model), seed=1)  # other weights, same place
  capsys.readouterr()

  with pytest.raises(SystemExit) as exit_info:
    query_index.main(query)

  assert exit_info.value.code == 2
  error = capsys.readouterr().err
  assert 'is not the one that made' in error and 'query with --key' in error
  # Stored vectors need no model.
  key = str(paths[1].relative_to(root))
  by_key = query_index.main(['--run', str(out), '--key', key, '--k', '1', '--format', 'json'])
  assert by_key[0]['neighbors'][0]['key'] == key


def test_a_query_image_gets_the_pixels_the_run_embedded_beside_a_larger_model(
    tmp_path, test_models):
  """A 400x360 JPEG decodes at half size for a 160x160 model alone, but in full when a
  224x224 model runs beside it: the query must decode as the run did."""
  photos = tmp_path / 'photos'
  photos.mkdir()
  for seed in range(3):
    (photos / ('%d.jpg' % seed)).write_bytes(imagegen.encode(imagegen.photo(seed, 400, 360)))
  out = tmp_path / 'out'
  run_pipeline.main(['--input', str(photos), '--output', str(out), '--no_report',
                     '--model', 'v1=' + test_models['v1_tf1'],
                     '--model', 'v3=' + test_models['v3_tf2'], *IN_PROCESS])
  manifest = json.loads((out / 'manifest.json').read_text())
  spec = query_index.spec_of(query_index.choose_model(manifest, 'v1'))
  paths = [str(photos / ('%d.jpg' % seed)) for seed in range(3)]
  stored = query_index.stored_vectors(str(out), 'v1', ['0.jpg', '1.jpg', '2.jpg'])
  queried = query_index.embed_query_images(paths, spec, manifest, str(out))
  np.testing.assert_allclose(queried, stored, rtol=1e-5, atol=1e-5 * np.abs(stored).max())
  v1_alone = {'models': [model for model in manifest['models'] if model['name'] == 'v1']}
  alone = query_index.embed_query_images(paths, spec, v1_alone, str(out))
  assert not np.allclose(alone, stored, rtol=1e-3, atol=1e-3 * np.abs(stored).max())
  results = query_index.main(['--run', str(out), '--model', 'v1', '--image', paths[1],
                              '--k', '1', '--format', 'json'])
  assert results[0]['neighbors'][0]['key'] == '1.jpg'
  assert results[0]['neighbors'][0]['score'] > 0.99999
