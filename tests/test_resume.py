"""Interrupted and repeated runs: refusing a finished output, --overwrite, --resume, and a
run killed with SIGKILL then resumed, equal to an uninterrupted run."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

import imagegen
import run_pipeline
from conftest import IN_PROCESS, PROJECT
from pipeline import resume, runners
from schemas import outputs
from schemas.records import content_sha256
from transforms import decode

IMAGES = 24
MODELS = ('v1', 'v3')
BAD_KEY = 'broken.jpg'


def job_args(inputs, out, test_models, *extra):
  return ['--input', str(inputs / '*'), '--output', str(out), '--batch_size', '8',
          '--model', 'v1=' + test_models['v1_tf1'], '--model', 'v3=' + test_models['v3_tf2'],
          *IN_PROCESS, *extra]


def write_images(folder, first, count):
  folder.mkdir(parents=True, exist_ok=True)
  for n in range(first, first + count):
    (folder / ('%04d.jpg' % n)).write_bytes(imagegen.encode(imagegen.photo(n, 96, 72)))


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  folder = tmp_path_factory.mktemp('resume') / 'images'
  write_images(folder, 0, IMAGES)
  (folder / BAD_KEY).write_bytes(b'\xff\xd8\xff' + bytes(50))
  return folder


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, inputs, test_models):
  out = tmp_path_factory.mktemp('uninterrupted') / 'out'
  run_pipeline.main(job_args(inputs, out, test_models))
  return out


def embeddings(out, model):
  """key -> vector, checking that no key is there twice."""
  table = pq.read_table(str(out / model / 'embeddings'))
  keys = table.column('key').to_pylist()
  assert len(keys) == len(set(keys)), 'a key was written twice'
  return dict(zip(keys, np.stack(table.column('embedding').to_numpy(zero_copy_only=False))))


def failure_keys(out):
  keys = pq.read_table(str(out / 'failures')).column('key').to_pylist()
  assert len(keys) == len(set(keys))
  return sorted(keys)


def manifest_counts(out):
  return json.loads((out / 'manifest.json').read_text())['counts']


def assert_same_output(got, expected):
  for model in MODELS:
    got_rows, expected_rows = embeddings(got, model), embeddings(expected, model)
    assert sorted(got_rows) == sorted(expected_rows)
    for key, vector in expected_rows.items():
      np.testing.assert_allclose(got_rows[key], vector, rtol=1e-5, atol=1e-5)
    ids = pq.read_table(str(got / model / outputs.INDEX_IDS_FILE)).column('key').to_pylist()
    assert ids == sorted(expected_rows)  # the index covers every part, old and new
    assert sorted(p.name for p in (got / model / 'embeddings').iterdir()) == sorted(
        p.name for p in (got / model / 'embeddings').glob('part-*.parquet'))
  assert failure_keys(got) == failure_keys(expected) == [BAD_KEY]
  got_counts, expected_counts = manifest_counts(got), manifest_counts(expected)
  assert got_counts['reconciled'] is True
  for model in MODELS:
    assert got_counts['models'][model]['embedded'] == expected_counts['models'][model]['embedded']
    assert got_counts['models'][model]['failed'] == expected_counts['models'][model]['failed']
  assert got_counts['read'] == expected_counts['read'] == IMAGES + 1


def test_completed_run_is_refused_without_resume_or_overwrite(uninterrupted, inputs,
                                                             test_models, capsys):
  before = (uninterrupted / 'manifest.json').read_bytes()
  with pytest.raises(SystemExit) as exit_info:
    run_pipeline.main(job_args(inputs, uninterrupted, test_models))
  assert exit_info.value.code == 2
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert 'holds a completed run' in error and '--resume' in error and '--overwrite' in error
  assert (uninterrupted / 'manifest.json').read_bytes() == before
  with pytest.raises(SystemExit):
    run_pipeline.main(job_args(inputs, uninterrupted, test_models, '--resume', '--overwrite'))


def test_unfinished_run_is_refused_and_overwrite_starts_again(tmp_path, uninterrupted, inputs,
                                                              test_models, capsys):
  out = tmp_path / 'out'
  shutil.copytree(uninterrupted, out)
  (out / 'manifest.json').unlink()
  stray = out / 'v1' / 'embeddings' / 'part-00007-of-00009.parquet'
  shutil.copy(next((out / 'v1' / 'embeddings').glob('part-*')), stray)
  with pytest.raises(SystemExit):
    run_pipeline.main(job_args(inputs, out, test_models))
  assert 'unfinished run' in capsys.readouterr().err
  (out / 'notes.txt').write_text('not ours')
  run_pipeline.main(job_args(inputs, out, test_models, '--overwrite'))
  assert not stray.exists()  # it would have been read as a duplicate of every key
  assert (out / 'notes.txt').read_text() == 'not ours'
  assert_same_output(out, uninterrupted)


def test_a_run_without_a_report_leaves_no_old_one(tmp_path, uninterrupted, inputs,
                                                  test_models):
  """--no_report on a run that changes an output: its earlier report.html, whose figures
  no longer hold, is deleted with the manifest."""
  out = tmp_path / 'out'
  shutil.copytree(uninterrupted, out)
  report = out / 'report.html'
  for extra in (['--resume'], ['--overwrite']):
    report.write_text('12 images read')
    run_pipeline.main(job_args(inputs, out, test_models, '--no_report', *extra))
    assert not report.exists() and (out / 'manifest.json').exists()
  report.write_text('index: Flat')
  run_pipeline.main(['--output', str(out), '--index_only', '--index_type', 'HNSW8',
                     '--no_report', *IN_PROCESS])
  assert not report.exists()


def test_resume_embeds_only_what_is_missing_per_model(tmp_path, uninterrupted, inputs,
                                                      test_models, monkeypatch):
  hashed = []

  def counting_sha256(data):
    hashed.append(len(data))
    return content_sha256(data)

  for module in (resume, decode):
    monkeypatch.setattr(module, 'content_sha256', counting_sha256)
  out = tmp_path / 'out'
  shutil.copytree(uninterrupted, out)
  # As if the run was killed after v1's parts were final but before v3's: no manifest,
  # v3 has only Beam's temporary directory, half-written files lie around.
  (out / 'manifest.json').unlink()
  shutil.rmtree(out / 'v3' / 'embeddings')
  temporary = out / 'v3' / 'embeddings' / 'beam-temp-part-0123abcd'
  temporary.mkdir(parents=True)
  (temporary / 'x.part.parquet').write_bytes(b'PAR1 half written')
  (out / 'v1' / 'index.faiss.tmp-writing').write_bytes(b'half')
  # An index build killed after it filled a part this run's build will not write.
  build_part = out / 'v1' / (outputs.INDEX_BUILD_PREFIX + 'part-00007.faiss')
  build_part.write_bytes(b'a filled part')
  v1_parts = {p.name: p.read_bytes() for p in (out / 'v1' / 'embeddings').iterdir()}
  # A part being rewritten without the rows of changed inputs.
  rewritten = out / 'v1' / 'embeddings' / (sorted(v1_parts)[0] + '.tmp-writing')
  rewritten.write_bytes(b'PAR1 half written')

  run_pipeline.main(job_args(inputs, out, test_models, '--resume'))

  assert_same_output(out, uninterrupted)
  for name, data in v1_parts.items():  # completed parts are kept as they were
    assert (out / 'v1' / 'embeddings' / name).read_bytes() == data
  assert not temporary.exists() and not (out / 'v1' / 'index.faiss.tmp-writing').exists()
  assert not rewritten.exists() and not build_part.exists()
  counts = manifest_counts(out)['models']
  assert counts['v1']['resumed'] == IMAGES and counts['v3']['resumed'] == 0
  # Every input found embedded by v1 is hashed to compare, and that digest is reused
  # when v3 decodes it (the broken input has no row and fails to decode: no digest).
  assert len(hashed) == IMAGES


def test_resume_of_a_completed_run_adds_new_inputs(tmp_path, uninterrupted, inputs,
                                                   test_models):
  more = tmp_path / 'images'
  shutil.copytree(inputs, more)
  write_images(more, IMAGES, 3)
  out = tmp_path / 'out'
  shutil.copytree(uninterrupted, out)
  old_failures = sorted(p.name for p in (out / 'failures').iterdir())

  run_pipeline.main(job_args(more, out, test_models, '--resume'))

  counts = manifest_counts(out)
  assert counts['read'] == IMAGES + 4 and counts['reconciled'] is True
  old = embeddings(uninterrupted, 'v3')
  for model in MODELS:
    rows = embeddings(out, model)
    assert sorted(rows) == sorted(list(old) + ['%04d.jpg' % n for n in range(IMAGES, IMAGES + 3)])
    # The inputs were copied to another folder: the rows point there now.
    assert counts['models'][model] == {'embedded': IMAGES + 3, 'failed': 1, 'embed_failed': 0,
                                       'resumed': IMAGES, 'changed': 0, 'removed': 0,
                                       'moved': IMAGES}
  # The failed input was retried and failed again: one record, in this run's file.
  assert failure_keys(out) == [BAD_KEY]
  assert not set(old_failures) & {p.name for p in (out / 'failures').iterdir()}


def test_resume_embeds_files_changed_since_again(tmp_path, uninterrupted, inputs,
                                                 test_models):
  edited = tmp_path / 'images'
  shutil.copytree(inputs, edited)
  # 0003.jpg now holds the picture of 0010.jpg, 0005.jpg was cut short; 0007.jpg was
  # only touched (same bytes, a new time): it stays as it was.
  (edited / '0003.jpg').write_bytes((inputs / '0010.jpg').read_bytes())
  (edited / '0005.jpg').write_bytes((inputs / '0005.jpg').read_bytes()[:200])
  os.utime(edited / '0007.jpg', (time.time() + 60, time.time() + 60))
  out = tmp_path / 'out'
  shutil.copytree(uninterrupted, out)
  earlier_parts = sorted(p.name for p in (out / 'v1' / 'embeddings').iterdir())

  run_pipeline.main(job_args(edited, out, test_models, '--resume'))

  counts = manifest_counts(out)
  assert counts['read'] == IMAGES + 1 and counts['reconciled'] is True
  for model in MODELS:
    old, rows = embeddings(uninterrupted, model), embeddings(out, model)
    assert sorted(rows) == sorted(set(old) - {'0005.jpg'})  # each key once, cut file gone
    np.testing.assert_allclose(rows['0003.jpg'], old['0010.jpg'], rtol=1e-5, atol=1e-5)
    assert not np.allclose(rows['0003.jpg'], old['0003.jpg'], atol=1e-3)
    for key in set(rows) - {'0003.jpg'}:
      np.testing.assert_allclose(rows[key], old[key], rtol=1e-5, atol=1e-5)
    sha256 = dict(zip(*pq.read_table(str(out / model / 'embeddings'),
                                     columns=['key', 'sha256']).to_pydict().values()))
    assert sha256['0003.jpg'] == sha256['0010.jpg']
    ids = pq.read_table(str(out / model / outputs.INDEX_IDS_FILE)).column('key').to_pylist()
    assert ids == sorted(rows)
    assert counts['models'][model] == {'embedded': IMAGES - 1, 'failed': 2, 'embed_failed': 0,
                                       'resumed': IMAGES - 2, 'changed': 2, 'removed': 0,
                                       'moved': IMAGES - 2}  # a copy of the inputs
  assert failure_keys(out) == ['0005.jpg', BAD_KEY]
  # The earlier parts lost two rows in place; the re-embedded one is in this run's part.
  assert set(earlier_parts) < {p.name for p in (out / 'v1' / 'embeddings').iterdir()}


def test_resume_removes_the_rows_of_files_gone_that_its_inputs_cover(
    tmp_path, uninterrupted, inputs, test_models):
  pruned = tmp_path / 'images'
  shutil.copytree(inputs, pruned)
  for name in ('0002.jpg', '0014.jpg'):
    (pruned / name).unlink()
  out = tmp_path / 'out'
  shutil.copytree(uninterrupted, out)
  old = {model: embeddings(uninterrupted, model) for model in MODELS}

  # Narrower inputs cover only some files: the rows of the others stay, even of 0014.jpg.
  narrower = job_args(pruned, out, test_models, '--resume')
  narrower[narrower.index(str(pruned / '*'))] = str(pruned / '000*')
  run_pipeline.main(narrower)
  for model in MODELS:
    assert sorted(embeddings(out, model)) == sorted(set(old[model]) - {'0002.jpg'})
    assert manifest_counts(out)['models'][model]['removed'] == 1

  run_pipeline.main(job_args(pruned, out, test_models, '--resume'))

  counts = manifest_counts(out)
  assert counts['read'] == IMAGES - 1 and counts['reconciled'] is True
  for model in MODELS:
    rows = embeddings(out, model)
    assert sorted(rows) == sorted(set(old[model]) - {'0002.jpg', '0014.jpg'})
    for key, vector in rows.items():
      np.testing.assert_allclose(vector, old[model][key], rtol=1e-5, atol=1e-5)
    ids = pq.read_table(str(out / model / outputs.INDEX_IDS_FILE)).column('key').to_pylist()
    assert ids == sorted(rows)
    # The rows of a copy of the inputs: those of 0000-0009 moved in the first resume.
    assert counts['models'][model] == {'embedded': IMAGES - 2, 'failed': 1, 'embed_failed': 0,
                                       'resumed': IMAGES - 2, 'changed': 0, 'removed': 1,
                                       'moved': IMAGES - 2 - 9}


def test_resume_of_inputs_moved_elsewhere_points_the_rows_at_their_new_place(
    tmp_path, uninterrupted, inputs, test_models):
  moved = shutil.copytree(inputs, tmp_path / 'elsewhere' / 'images')
  (moved / '0001.jpg').write_bytes((inputs / '0009.jpg').read_bytes())  # and one edited
  out = tmp_path / 'out'
  shutil.copytree(uninterrupted, out)

  run_pipeline.main(job_args(moved, out, test_models, '--resume'))

  counts = manifest_counts(out)
  for model in MODELS:
    table = pq.read_table(str(out / model / 'embeddings'), columns=['key', 'uri'])
    assert sorted(table.column('uri').to_pylist()) == sorted(
        str(moved / key) for key in embeddings(uninterrupted, model))
    ids = pq.read_table(str(out / model / outputs.INDEX_IDS_FILE))
    assert ids.column('uri').to_pylist() == [str(moved / key)
                                             for key in ids.column('key').to_pylist()]
    assert counts['models'][model] == {'embedded': IMAGES, 'failed': 1, 'embed_failed': 0,
                                       'resumed': IMAGES - 1, 'changed': 1, 'removed': 0,
                                       'moved': IMAGES - 1}


def test_resume_with_another_model_under_the_same_name_is_refused(
    tmp_path, uninterrupted, inputs, test_models, capsys):
  import model_factory  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'out'
  shutil.copytree(uninterrupted, out)
  before = sorted(p.name for p in (out / 'v3' / 'embeddings').iterdir())
  other = model_factory.save_projection(1024, 224, str(tmp_path / 'other_v3'))
  args = job_args(inputs, out, test_models, '--resume')
  args[args.index('v3=' + test_models['v3_tf2'])] = 'v3=' + other

  with pytest.raises(SystemExit) as exit_info:
    run_pipeline.main(args)

  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and 'cannot resume' in lines[0] and 'v3=' + other in lines[0]
  assert (out / 'manifest.json').exists()  # refused before anything changed
  assert sorted(p.name for p in (out / 'v3' / 'embeddings').iterdir()) == before


def test_resume_without_a_model_of_the_run_is_refused(tmp_path, uninterrupted, inputs,
                                                     test_models, capsys):
  out = tmp_path / 'out'
  shutil.copytree(uninterrupted, out)
  only_v1 = ['--input', str(inputs / '*'), '--output', str(out), '--model',
             'v1=' + test_models['v1_tf1'], '--no_report', *IN_PROCESS, '--resume']

  with pytest.raises(SystemExit) as exit_info:
    run_pipeline.main(only_v1)

  assert exit_info.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines == ['run_pipeline.py: error: cannot resume: %s also holds the embeddings of '
                   'v3; resume with every model of the run (add --model v3=%s), or delete '
                   '%s to drop it' % (out, test_models['v3_tf2'], out / 'v3')]
  assert (out / 'manifest.json').read_bytes() == (uninterrupted / 'manifest.json').read_bytes()

  shutil.rmtree(out / 'v3')
  run_pipeline.main(only_v1)
  manifest = json.loads((out / 'manifest.json').read_text())
  assert [model['name'] for model in manifest['models']] == ['v1']
  assert manifest['counts']['models']['v1']['resumed'] == IMAGES


def test_the_model_left_out_is_named_with_its_tensor(tmp_path):
  """The flag the refusal suggests is the one that wrote the parts, #TENSOR included
  (without it, a TFLite model gives its logits, of another length)."""
  from pipeline import resume  # pylint: disable=import-outside-toplevel
  parts = tmp_path / 'out' / 'v1' / 'embeddings'
  parts.mkdir(parents=True)
  record = {'name': 'v1', 'handle': '/models/my model.tflite', 'tensor': 'Logits/AvgPool'}
  pq.write_table(outputs.embeddings_schema(512, record).empty_table(),
                 str(parts / 'part-00000-of-00001.parquet'))
  with pytest.raises(resume.OutputDirError) as error:
    resume.check_every_model_resumed(str(tmp_path / 'out'), ['v2'])
  assert "(add --model 'v1=/models/my model.tflite#Logits/AvgPool')" in str(error.value)


def test_resume_with_a_copy_of_the_same_model_goes_on(tmp_path, uninterrupted, inputs,
                                                      test_models):
  out = tmp_path / 'out'
  shutil.copytree(uninterrupted, out)
  copy = shutil.copytree(test_models['v3_tf2'], tmp_path / 'copied_v3')
  args = job_args(inputs, out, test_models, '--resume')
  args[args.index('v3=' + test_models['v3_tf2'])] = 'v3=%s' % copy

  run_pipeline.main(args)

  assert manifest_counts(out)['models']['v3']['resumed'] == IMAGES


def big_scan_png():
  """A real 10000x9000 grayscale PNG (90 million pixels, above the default limit; 0.4 MB,
  about 0.4 GB while decoded)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  shades = np.add.outer(np.arange(9000) // 40, np.arange(10000) // 40).astype(np.uint8)
  return imagegen.encode(Image.fromarray(shades, 'L'), 'PNG', compress_level=1)


def test_a_raised_pixel_limit_and_resume_embed_the_refused_scan(tmp_path, uninterrupted,
                                                                inputs, test_models, capsys):
  folder = tmp_path / 'images'
  shutil.copytree(inputs, folder)
  (folder / 'scan.png').write_bytes(big_scan_png())
  out = tmp_path / 'out'
  shutil.copytree(uninterrupted, out)
  run_pipeline.main(job_args(folder, out, test_models, '--resume'))
  failures = pq.read_table(str(out / 'failures')).to_pylist()
  assert sorted(f['key'] for f in failures) == [BAD_KEY, 'scan.png']
  refused = next(f for f in failures if f['key'] == 'scan.png')
  assert refused['stage'] == 'decode' and '--max_image_pixels' in refused['message']

  run_pipeline.main(job_args(folder, out, test_models, '--resume',
                             '--max_image_pixels', '100000000'))

  manifest = json.loads((out / 'manifest.json').read_text())
  assert manifest['preprocessing']['max_image_pixels'] == 100_000_000
  assert manifest['counts']['reconciled'] and manifest['counts']['read'] == IMAGES + 2
  assert failure_keys(out) == [BAD_KEY]
  assert 'scan.png' in embeddings(out, 'v1') and 'scan.png' in embeddings(out, 'v3')
  # The query script decodes, and shows, as the run did: with the run's limit.
  capsys.readouterr()
  import query_index  # pylint: disable=import-outside-toplevel
  query_index.main(['--run', str(out), '--model', 'v3', '--image', str(folder / 'scan.png'),
                    '--k', '1', '--format', 'html'])
  page = capsys.readouterr().out
  assert 'scan.png' in page and 'no preview' not in page
  assert page.count('<img src="data:image/jpeg') == 2  # the query and its neighbour


def _final_parts(out):
  return [os.path.join(folder, name)
          for folder in (out / 'v1' / 'embeddings', out / 'v3' / 'embeddings')
          if folder.is_dir() for name in os.listdir(folder) if name.startswith('part-')]


def test_killed_run_resumed_equals_uninterrupted_run(tmp_path, uninterrupted, inputs,
                                                     test_models):
  out = tmp_path / 'out'
  command = [sys.executable, str(PROJECT / 'run_pipeline.py'),
             *job_args(inputs, out, test_models)]
  process = subprocess.Popen(command, cwd=str(tmp_path), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 240
    # Kill as soon as the first part file is final: the other model's part, the
    # failures, the indexes and the manifest are still to come.
    while not _final_parts(out) and process.poll() is None and time.time() < deadline:
      time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
  finally:
    process.kill()
    process.wait()
  assert process.returncode == -signal.SIGKILL, 'the run ended before it could be killed'
  assert _final_parts(out), 'no part file appeared'
  assert not (out / 'manifest.json').exists()
  for part in _final_parts(out):  # a part under its final name is always whole
    assert pq.read_metadata(part).num_rows > 0
  # The killed run's running-file names a process that is gone: it does not block.
  assert json.loads((out / outputs.RUNNING_FILE).read_text())['pid'] == process.pid

  run_pipeline.main(job_args(inputs, out, test_models, '--resume'))

  assert_same_output(out, uninterrupted)
  assert not (out / outputs.RUNNING_FILE).exists()


@pytest.mark.parametrize('host,expected', [
    (None, 'is being written by another run (process'),
    ('elsewhere.example', 'may be being written by a run on elsewhere.example'),
])
def test_an_output_being_written_is_refused(tmp_path, uninterrupted, inputs, test_models,
                                            capsys, host, expected):
  """A second run (even with --overwrite or --resume) or an index rebuild into an output
  that a live run is writing stops at launch; here the live writer is this test."""
  import socket  # pylint: disable=import-outside-toplevel
  from pipeline import resume  # pylint: disable=import-outside-toplevel
  out = tmp_path / 'out'
  shutil.copytree(uninterrupted, out)
  resume.mark_being_written(str(out))
  if host:
    writer = json.loads((out / outputs.RUNNING_FILE).read_text())
    (out / outputs.RUNNING_FILE).write_text(json.dumps(dict(writer, host=host)))
  assert socket.gethostname() != 'elsewhere.example'
  before = (out / 'manifest.json').read_bytes()
  for extra in (['--overwrite'], ['--resume']):
    with pytest.raises(SystemExit) as exit_info:
      run_pipeline.main(job_args(inputs, out, test_models, *extra))
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err.strip().splitlines()[-1]
  with pytest.raises(SystemExit) as exit_info:
    run_pipeline.main(['--output', str(out), '--index_only', *IN_PROCESS])
  assert exit_info.value.code == 2 and expected in capsys.readouterr().err
  assert (out / 'manifest.json').read_bytes() == before
  # The one that wrote it clears it; then the output is free again.
  (out / outputs.RUNNING_FILE).unlink()
  resume.mark_being_written(str(out))
  resume.unmark_being_written(str(out))
  assert not (out / outputs.RUNNING_FILE).exists()
  resume.check_output_dir(str(out), resume=True)


def test_ctrl_c_stops_with_one_line_and_resume_finishes(tmp_path, uninterrupted, inputs,
                                                        test_models):
  out = tmp_path / 'out'
  command = [sys.executable, str(PROJECT / 'run_pipeline.py'),
             *job_args(inputs, out, test_models)]
  # SIGINT as a terminal's Ctrl-C sends it (a test runner may have it ignored).
  process = subprocess.Popen(command, cwd=str(tmp_path), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  try:
    deadline = time.time() + 240
    # Once the output is prepared: the job has begun and is far from done.
    while (not (out / outputs.RUNNING_FILE).exists() and process.poll() is None
           and time.time() < deadline):
      time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
  finally:
    process.kill()
  assert process.returncode == 130, stderr[-3000:]
  assert 'Traceback' not in stderr
  assert stderr.strip().splitlines()[-1] == (
      'run_pipeline.py: interrupted; %s holds an unfinished run: to finish it, run the same '
      'command with --resume (without --overwrite)' % out)
  assert not (out / outputs.RUNNING_FILE).exists() and not (out / 'manifest.json').exists()

  run_pipeline.main(job_args(inputs, out, test_models, '--resume'))

  assert_same_output(out, uninterrupted)


def _ignores_sigint(pid):
  try:
    with open('/proc/%d/status' % pid, encoding='ascii') as f:
      ignored = next(line for line in f if line.startswith('SigIgn:')).split()[1]
  except (OSError, StopIteration):
    return False
  return bool(int(ignored, 16) & (1 << (signal.SIGINT - 1)))


def test_ctrl_c_on_a_terminal_is_one_line_with_worker_processes(tmp_path, inputs,
                                                                test_models):
  """A terminal's Ctrl-C reaches the whole foreground process group, the local worker
  processes too: each printed a traceback. They leave it to the launcher, which stops
  them and says one line."""
  out = tmp_path / 'out'
  command = [sys.executable, str(PROJECT / 'run_pipeline.py'), '--no_report',
             *[arg for arg in job_args(inputs, out, test_models) if arg not in IN_PROCESS]]
  process = subprocess.Popen(command, cwd=str(tmp_path), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
  workers = []
  try:
    deadline = time.time() + 240
    # Once both workers are up and have set their handling of the signal.
    while process.poll() is None and time.time() < deadline:
      workers = runners.local_worker_pids(process.pid)
      if len(workers) == 2 and all(_ignores_sigint(pid) for pid in workers):
        break
      time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)  # what the terminal does
    _, stderr = process.communicate(timeout=120)
  finally:
    process.kill()
  assert len(workers) == 2, 'the run ended before its workers were seen'
  assert process.returncode == 130, stderr[-3000:]
  lines = [line for line in stderr.strip().splitlines() if ' | read ' not in line]
  assert lines == ['run_pipeline.py: interrupted; %s holds an unfinished run: to finish it, '
                   'run the same command with --resume (without --overwrite)' % out], stderr
  deadline = time.time() + 30
  while any(os.path.exists('/proc/%d' % pid) for pid in workers) and time.time() < deadline:
    time.sleep(0.1)
  assert not any(os.path.exists('/proc/%d' % pid) for pid in workers)


def test_a_worker_process_killed_at_start_ends_the_run_with_one_line(tmp_path, inputs,
                                                                     test_models):
  # What the system does to a worker when memory runs out. The DirectRunner alone would
  # wait forever for a worker that died before it connected.
  out = tmp_path / 'out'
  command = [sys.executable, str(PROJECT / 'run_pipeline.py'),
             *[arg for arg in job_args(inputs, out, test_models) if arg not in IN_PROCESS]]
  process = subprocess.Popen(command, cwd=str(tmp_path), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 240
    while process.poll() is None and time.time() < deadline:
      workers = runners.local_worker_pids(process.pid)
      if workers:
        os.kill(workers[0], signal.SIGKILL)
        break
      time.sleep(0.005)
    _, stderr = process.communicate(timeout=120)
  finally:
    process.kill()
  assert process.returncode == 1, stderr[-3000:]
  # The shells that ran the worker processes may still say 'Killed' after it.
  last = [line for line in stderr.splitlines() if line.startswith('run_pipeline.py:')][-1]
  assert last.startswith('run_pipeline.py: the run failed: a worker process ended '
                         'unexpectedly with exit status 137 (killed or crashed;'), last
  # What to change when the cause was memory: the batch's activations grow with its size.
  assert 'fewer --direct_num_workers or a smaller --batch_size use less' in last, last
  assert last.endswith('%s holds an unfinished run: once the cause is fixed, run the same '
                       'command with --resume (without --overwrite) to finish it' % out)
  assert not runners.local_worker_pids(process.pid)
  assert not (out / outputs.RUNNING_FILE).exists()


def test_an_index_type_too_big_for_the_run_fails_with_one_short_line(tmp_path, inputs,
                                                                      test_models):
  # In a worker process the error reaches the launcher as a RuntimeError whose message
  # is the worker's whole traceback; the last line says only what happened and where.
  # 256 files that are no images make the launch's count of files enough for 256 lists:
  # only the index finds out that too few of them became vectors.
  out = tmp_path / 'out'
  broken = tmp_path / 'broken'
  broken.mkdir()
  for number in range(256):
    (broken / ('%03d.jpg' % number)).write_bytes(b'not an image')
  more = ['--input', str(broken)]
  command = [sys.executable, str(PROJECT / 'run_pipeline.py'), '--index_type', 'IVF256,Flat',
             *[arg for arg in job_args(inputs, out, test_models) if arg not in IN_PROCESS],
             *more]
  result = subprocess.run(command, cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  # Either model's index may be the first to fail.
  assert re.match(r"run_pipeline\.py: the run failed: ValueError: cannot train index "
                  r"'IVF256,Flat' of model v[13] on %d vectors \(Number of training "
                  r"points \(%d\) should be at least" % (IMAGES, IMAGES), last), last
  assert "choose an --index_type that needs fewer" in last
  assert 'Traceback' not in last and len(last) < 1000
  assert not (out / 'manifest.json').exists()

  # Everything was embedded: the resumed run only builds the indexes.
  run_pipeline.main(job_args(inputs, out, test_models, '--resume', '--index_type', 'auto',
                              *more))
  manifest = json.loads((out / 'manifest.json').read_text())
  assert manifest['counts']['models']['v1']['resumed'] == IMAGES
  assert manifest['counts']['reconciled']


def _keys(out, model):
  table = pq.read_table([str(p) for p in (out / model / 'embeddings').glob('part-*.parquet')])
  return sorted(table.column('key').to_pylist())


def test_a_resumed_run_keeps_the_earlier_keys_or_refuses(tmp_path, test_models, capsys):
  library = tmp_path / 'library'
  write_images(library / '2019', 0, 3)
  write_images(library / '2020', 3, 2)

  def run(out, *folders, resume=()):
    run_pipeline.main([arg for folder in folders for arg in ('--input', str(library / folder))]
                      + ['--output', str(out), '--model', 'v1=' + test_models['v1_tf1'],
                         '--no_report', *IN_PROCESS, *resume])

  # Keys are relative to the inputs' common folder. A narrower --input on resume would
  # have keyed the same images anew (0000.jpg instead of 2019/0000.jpg), and embedded
  # them a second time.
  whole = tmp_path / 'whole'
  run(whole, '')
  run(whole, '2019', resume=['--resume'])
  assert _keys(whole, 'v1') == ['2019/%04d.jpg' % n for n in range(3)] + [
      '2020/%04d.jpg' % n for n in (3, 4)]
  manifest = json.loads((whole / 'manifest.json').read_text())
  assert manifest['input']['root'] == str(library) + '/'
  assert manifest['counts']['models']['v1']['resumed'] == 3

  # An input beside the first folder cannot be keyed below it: refused before any work.
  one_year = tmp_path / 'one_year'
  run(one_year, '2019')
  before = sorted(p.name for p in one_year.rglob('*'))
  with pytest.raises(SystemExit) as exit_info:
    run(one_year, '2019', '2020', resume=['--resume'])
  assert exit_info.value.code == 2
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert error == (
      'run_pipeline.py: error: cannot resume: the keys of the images already embedded are '
      'their paths below %s/, and --input %s lies outside it (its images could not be '
      'keyed the same way, and each earlier image would be embedded again under a second '
      'key); resume with inputs below %s/, or run all the inputs into a new --output'
      % (library / '2019', library / '2020', library / '2019'))
  assert sorted(p.name for p in one_year.rglob('*')) == before
  assert _keys(one_year, 'v1') == ['%04d.jpg' % n for n in range(3)]


@pytest.fixture
def run_in_place(tmp_path, test_models, monkeypatch):
  """A finished run over a small folder, and a resume of it over the same folder that
  returns the paths it read."""
  from transforms import read  # pylint: disable=import-outside-toplevel
  folder = tmp_path / 'images'
  write_images(folder, 0, 6)
  (folder / BAD_KEY).write_bytes(b'\xff\xd8\xff' + bytes(50))
  out = tmp_path / 'out'
  run_pipeline.main(job_args(folder, out, test_models, '--no_report'))
  real_read = read.read_image_file

  def resume_and_list_reads(*flags):
    read_paths = []

    def counting_read(path, *args):
      read_paths.append(os.path.basename(path))
      return real_read(path, *args)

    monkeypatch.setattr(read, 'read_image_file', counting_read)
    run_pipeline.main(job_args(folder, out, test_models, '--resume', '--no_report', *flags))
    monkeypatch.setattr(read, 'read_image_file', real_read)
    return sorted(read_paths)
  return folder, out, resume_and_list_reads


def test_resume_reads_only_files_new_or_changed_in_size_or_time(run_in_place):
  folder, out, resume_and_list_reads = run_in_place
  before = {model: embeddings(out, model) for model in MODELS}
  (folder / '0001.jpg').write_bytes((folder / '0004.jpg').read_bytes())  # another picture
  os.utime(folder / '0002.jpg', (time.time() + 60, time.time() + 60))  # touched only
  # Rewritten at the same size, its old time put back: trusted unchanged, as by rsync.
  status = os.stat(folder / '0003.jpg')
  data = bytearray((folder / '0003.jpg').read_bytes())
  data[-200] ^= 0x55
  (folder / '0003.jpg').write_bytes(bytes(data))
  os.utime(folder / '0003.jpg', ns=(status.st_atime_ns, status.st_mtime_ns))
  write_images(folder, 6, 1)  # a new file

  assert resume_and_list_reads() == ['0001.jpg', '0002.jpg', '0006.jpg', BAD_KEY]

  counts = manifest_counts(out)
  assert counts['read'] == 8 and counts['reconciled'] is True
  assert counts['unchanged_not_read'] == 4  # 0000, 0003 (not noticed), 0004, 0005
  for model in MODELS:
    rows = embeddings(out, model)
    assert sorted(rows) == ['%04d.jpg' % n for n in range(7)]
    np.testing.assert_allclose(rows['0001.jpg'], before[model]['0004.jpg'], rtol=1e-5,
                               atol=1e-5)
    for key in ('0000.jpg', '0002.jpg', '0003.jpg', '0005.jpg'):
      np.testing.assert_allclose(rows[key], before[model][key], rtol=1e-5, atol=1e-5)
    assert counts['models'][model] == {'embedded': 7, 'failed': 1, 'embed_failed': 0,
                                       'resumed': 5, 'changed': 1, 'removed': 0, 'moved': 0}
    table = pq.read_table(str(out / model / 'embeddings'),
                          columns=['key', 'file_size', 'file_modified'])
    listed = {row['key']: row for row in table.to_pylist()}
    for key in ('0001.jpg', '0006.jpg'):
      assert listed[key]['file_size'] == os.stat(folder / key).st_size
      assert listed[key]['file_modified'] == os.stat(folder / key).st_mtime

  # Nothing changed since: only the input that fails is read again (the touched file's
  # rows were given its new time).
  assert resume_and_list_reads() == [BAD_KEY]
  assert manifest_counts(out)['unchanged_not_read'] == 7


def test_resume_checksum_reads_every_file_and_finds_what_size_and_time_hide(run_in_place):
  folder, out, resume_and_list_reads = run_in_place
  before = {model: embeddings(out, model) for model in MODELS}
  # Rewritten with another picture at the same size (bytes after the JPEG's end are
  # ignored), its old time put back: only its bytes tell.
  status = os.stat(folder / '0003.jpg')
  other = (folder / '0000.jpg').read_bytes()
  assert len(other) < status.st_size
  (folder / '0003.jpg').write_bytes(other + bytes(status.st_size - len(other)))
  os.utime(folder / '0003.jpg', ns=(status.st_atime_ns, status.st_mtime_ns))

  assert resume_and_list_reads('--resume_checksum') == sorted(
      p.name for p in folder.iterdir())

  counts = manifest_counts(out)
  assert counts['reconciled'] is True and counts['unchanged_not_read'] == 0
  for model in MODELS:
    assert counts['models'][model]['changed'] == 1 and counts['models'][model]['resumed'] == 5
    np.testing.assert_allclose(embeddings(out, model)['0003.jpg'], before[model]['0000.jpg'],
                               rtol=1e-5, atol=1e-5)


def test_resume_over_parts_without_file_times_reads_every_file_once(run_in_place):
  folder, out, resume_and_list_reads = run_in_place
  for part in out.glob('*/embeddings/part-*.parquet'):  # as an earlier version wrote them
    table = pq.read_table(part)
    pq.write_table(table.drop_columns(['file_size', 'file_modified']), part)

  assert resume_and_list_reads() == sorted(p.name for p in folder.iterdir())

  counts = manifest_counts(out)
  assert counts['reconciled'] is True and counts['unchanged_not_read'] == 0
  for model in MODELS:
    assert counts['models'][model]['resumed'] == 6 and counts['models'][model]['changed'] == 0
    # The parts were given the columns and their files' sizes and times.
    for part in out.glob('%s/embeddings/part-*.parquet' % model):
      assert pq.read_schema(part).names == outputs.embeddings_schema(1).names
    listed = pq.read_table(str(out / model / 'embeddings')).to_pylist()
    assert {(row['file_size'], row['file_modified']) for row in listed} == {
        (os.stat(folder / row['key']).st_size, os.stat(folder / row['key']).st_mtime)
        for row in listed}

  # So the next resume reads only the input that fails.
  assert resume_and_list_reads() == [BAD_KEY]
  assert manifest_counts(out)['unchanged_not_read'] == 6


@pytest.mark.parametrize('rows,listed,expected', [
    ([('v1', 'a', '/in/x.jpg', 10, 5.0), ('v3', 'a', '/in/x.jpg', 10, 5.0)],
     ('/in/x.jpg', 10, 5.0), 'a'),
    ([('v1', 'a', '/in/x.jpg', 10, 5.0)], ('/in/x.jpg', 10, 5.0), None),  # v3 has none
    ([('v1', 'a', '/in/x.jpg', 10, 5.0), ('v3', 'b', '/in/x.jpg', 10, 5.0)],
     ('/in/x.jpg', 10, 5.0), None),  # embedded from other bytes
    ([('v1', 'a', '/in/x.jpg', 10, 5.0), ('v3', 'a', '/in/x.jpg', 10, 5.0)],
     ('/in/x.jpg', 11, 5.0), None),  # size
    ([('v1', 'a', '/in/x.jpg', 10, 5.0), ('v3', 'a', '/in/x.jpg', 10, 5.0)],
     ('/in/x.jpg', 10, 6.0), None),  # time
    ([('v1', 'a', '/old/x.jpg', 10, 5.0), ('v3', 'a', '/old/x.jpg', 10, 5.0)],
     ('/in/x.jpg', 10, 5.0), None),  # moved: read, to give the rows their new uri
    ([('v1', 'a', '/in/x.jpg', None, None), ('v3', 'a', '/in/x.jpg', None, None)],
     ('/in/x.jpg', 10, 5.0), None),  # rows of an earlier version
    ([('v1', 'a', '/in/x.jpg', 0, 0.0), ('v3', 'a', '/in/x.jpg', 0, 0.0)],
     ('/in/x.jpg', 0, 0.0), None),  # a filesystem that reports no time
])
def test_unchanged_sha256(rows, listed, expected):
  from transforms.read import InputFile, unread_file_record  # pylint: disable=import-outside-toplevel
  unread = unread_file_record(InputFile(*listed), '/in/')
  assert unread.key == 'x.jpg'
  assert resume.unchanged_sha256(unread, MODELS,
                                 [resume.EarlierRow(*row) for row in rows]) == expected
