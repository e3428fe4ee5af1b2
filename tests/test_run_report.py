"""One multi-process run observed from outside: its progress lines, summary, manifest figures
and HTML report (rendered in Chromium), and the report command for an existing run."""

import colorsys
import json
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import imagegen
import run_pipeline
from browser import screenshot
from views import projection, run_report
from views.projection import pca_2d, tsne_2d

HOSTILE = 'x"><img src=y onerror=alert(1)>'
PROGRESS_LINE = re.compile(r'^\d+:\d\d \| read (\d+)/(\d+) \| embedded (\d+) \| failed (\d+) '
                           r'\| \d+\.\d images/s( \| .*)?$')


@pytest.fixture(scope='module')
def observed_run(tmp_path_factory, test_models):
  """Two worker processes over three labelled folders (one with a hostile name), one
  corrupt and one empty file; -> (out, root, stderr lines, stdout)."""
  root = tmp_path_factory.mktemp('observed') / 'photos'
  paths = imagegen.write_photo_tree(root, count=9, classes=('red', 'blue', HOSTILE))
  (root / 'red' / 'corrupt.jpg').write_bytes(imagegen.encode(imagegen.photo(50))[:200])
  (root / 'blue' / 'empty.jpg').write_bytes(b'')
  out = root.parent / 'out'
  capture = pytest.MonkeyPatch()
  import io  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  stderr, stdout = io.StringIO(), io.StringIO()
  capture.setattr(sys, 'stderr', stderr)
  capture.setattr(sys, 'stdout', stdout)
  try:
    run_pipeline.main(['--input', str(root / '**' / '*.*'), '--output', str(out),
                       '--model', 'v3=' + test_models['v3_tf2'], '--batch_size', '4',
                       '--progress_seconds', '1', '--direct_num_workers', '2',
                       '--direct_running_mode', 'multi_processing'])
  finally:
    capture.undo()
  return out, root, paths, stderr.getvalue().splitlines(), stdout.getvalue()


def manifest_of(out):
  return json.loads((out / 'manifest.json').read_text())


def test_progress_lines_reach_the_final_counts(observed_run):
  out, _, paths, stderr, _ = observed_run
  lines = [PROGRESS_LINE.match(line) for line in stderr]
  lines = [m for m in lines if m]
  assert lines, stderr
  read, total, embedded, failed = (int(g) for g in lines[-1].groups()[:4])
  counts = manifest_of(out)['counts']
  # The last line is written after the run: the workers' files hold every image.
  assert (read, total) == (counts['read'], len(paths) + 2)
  assert (embedded, failed) == (counts['models']['v3']['embedded'],
                                counts['models']['v3']['failed'])
  assert lines[-1].group(5) == ' | done'


def test_manifest_and_summary_hold_the_same_figures(observed_run):
  out, _, paths, _, stdout = observed_run
  manifest = manifest_of(out)
  reasons = {(r['stage'], r['error']): r for r in manifest['failures_by_reason']}
  # Pillow reports the empty file as unrecognized and the cut-off JPEG as truncated.
  assert sorted(reasons) == [('decode', 'ImageDecodeError'), ('decode', 'OSError')]
  assert [e['key'] for e in reasons[('decode', 'ImageDecodeError')]['examples']] == [
      'blue/empty.jpg']
  assert [e['key'] for e in reasons[('decode', 'OSError')]['examples']] == ['red/corrupt.jpg']
  assert all(r['count'] == 1 and r['model'] is None for r in reasons.values())
  failures = pq.read_table(str(out / 'failures')).num_rows
  assert failures == 2 == manifest['counts']['models']['v3']['failed']
  timing = manifest['throughput']
  assert timing['wall_seconds'] > 0
  assert timing['images_per_second'] == pytest.approx(
      manifest['counts']['read'] / timing['wall_seconds'], rel=1e-2)
  row = next(line.split() for line in stdout.splitlines() if line.startswith('  v3 '))
  assert row == ['v3', str(len(paths)), '2', '%.1f' % timing['models']['v3']]
  assert '      1  decode ImageDecodeError  all models  blue/empty.jpg: empty file' in stdout
  assert '      1  decode OSError           all models  red/corrupt.jpg: ' in stdout
  assert 'outputs in %s:' % out in stdout


def test_report_escapes_every_input_name(observed_run):
  out, _, _, _, _ = observed_run
  text = (out / 'report.html').read_text()
  assert HOSTILE not in text
  assert run_report.escape(HOSTILE) in text
  # Self-contained: nothing is fetched from elsewhere.
  assert not re.search(r'(src|href)="(https?:)?//', text)
  for section in ('Counts', 'Failures by reason', 'Embedding norms', 'Maps of the embeddings',
                  'Nearest neighbours', 'Models', 'Preprocessing', 'Options', 'Versions'):
    assert '<h2>%s</h2>' % section in text
  assert 'red/corrupt.jpg: ' in text and 'ImageDecodeError' in text and 'OSError' in text


def label_rgb(css_hsl, opacity=0.8):
  hue, saturation, lightness = (float(v) for v in re.findall(r'[\d.]+', css_hsl))
  rgb = colorsys.hls_to_rgb(hue / 360, lightness / 100, saturation / 100)
  return tuple(255 * (opacity * c + (1 - opacity)) for c in rgb)  # over a white map


def test_report_renders_in_chromium(observed_run, tmp_path):
  out, _, _, _, _ = observed_run
  png = screenshot(out / 'report.html', tmp_path / 'report.png', 1200, 2600)
  pixels = Image.open(png).convert('RGB')
  colours = list(pixels.getdata())
  histogram_bars = sum(1 for c in colours if c == (74, 122, 184))
  assert histogram_bars > 300
  for label in ('red', 'blue', HOSTILE):
    target = label_rgb(run_report.label_colours(['red', 'blue', HOSTILE])[label])
    dots = sum(1 for c in colours if sum(abs(a - b) for a, b in zip(c, target)) < 12)
    assert dots > 20, label


def test_report_command_for_an_existing_run(observed_run, tmp_path, capsys):
  out, _, _, _, _ = observed_run
  copy = tmp_path / 'copy'
  shutil.copytree(out, copy)
  (copy / 'report.html').unlink()
  run_report.main(['--run', str(copy)])
  assert capsys.readouterr().out.strip() == str(copy / 'report.html')
  assert '<h2>Nearest neighbours</h2>' in (copy / 'report.html').read_text()
  with pytest.raises(SystemExit) as exit_info:
    run_report.main(['--run', str(tmp_path / 'nothing')])
  assert exit_info.value.code == 2
  assert 'holds no finished run' in capsys.readouterr().err


def test_projections_separate_two_groups():
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(1)
  direction = rng.normal(size=64)
  group_a = rng.normal(size=(30, 64)) * 0.1 + direction
  group_b = rng.normal(size=(30, 64)) * 0.1 - direction
  vectors = np.concatenate([group_a, group_b])
  coordinates, shares = pca_2d(vectors)
  assert shares[0] > 0.9 and shares[0] >= shares[1]
  assert np.all(np.sign(coordinates[:30, 0]) == -np.sign(coordinates[30:, 0]))
  points = tsne_2d(vectors, iterations=300)
  distances = ((points[:, None] - points[None]) ** 2).sum(-1)
  np.fill_diagonal(distances, np.inf)
  nearest = distances.argmin(axis=1)
  assert np.all((nearest < 30) == (np.arange(60) < 30))


def test_planar_distances_match_the_general_ones():
  # The t-SNE loop's own distance routine must agree with the general one it replaced.
  points = np.random.default_rng(4).normal(0, 30, (300, 2)).astype(np.float32)
  kernel, scratch = np.empty((300, 300), np.float32), np.empty((300, 300), np.float32)
  planar = projection._planar_squared_distances(points, kernel, scratch)
  assert planar is kernel and (planar >= 0).all() and (np.diag(planar) == 0).all()
  np.testing.assert_allclose(planar, projection._squared_distances(points.astype(np.float64)),
                             rtol=1e-4, atol=1e-2)
