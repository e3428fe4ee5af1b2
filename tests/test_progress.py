"""Progress figures, the progress line, progress files, failure reasons and the summary."""

import io
import json

import pytest

import query_index
from pipeline import progress, summary
from pipeline.graph import JobConfig
from schemas.records import FailureRecord
from transforms import metrics
from transforms.failures import FailureReasons
from transforms.models import ModelSpec


def totals(read_ok=0, read_failed=0, decode_failed=0, files_read=0, **models):
  counts = {metrics.IMAGES_READ: read_ok, metrics.READ_FAILED: read_failed,
            metrics.DECODE_FAILED: decode_failed, metrics.INPUT_FILES_READ: files_read}
  for name, (embedded, failed) in models.items():
    counts[metrics.embedded_metric(name)] = embedded
    counts[metrics.embed_failed_metric(name)] = failed
  return counts


def test_image_files_give_a_total_and_an_estimate():
  figures = progress.progress_figures(
      totals(read_ok=90, decode_failed=2, files_read=92, v1=(40, 0), v3=(30, 1)),
      ['v1', 'v3'], input_files=100, files_are_images=True)
  # v3 is the slower model: 30 embedded + 1 failed + 2 decode failures are done.
  assert figures['done'] == 33 and figures['total'] == 100 and figures['failed'] == 3
  line = progress.format_progress(figures, elapsed=75, rate=5.0)
  assert line == ('1:15 | read 90/100 | embedded v1 40, v3 30 | failed 3 | 5.0 images/s | '
                  'about 0:13 left')


def test_shards_give_a_total_once_every_shard_is_read():
  reading = progress.progress_figures(totals(read_ok=500, files_read=3, m=(0, 0)), ['m'],
                                      input_files=4, files_are_images=False)
  assert reading['total'] is None
  assert progress.format_progress(reading, 5, 0.0) == (
      '0:05 | read 500 (3/4 files) | embedded 0 | failed 0 | 0.0 images/s')
  read = progress.progress_figures(totals(read_ok=600, read_failed=1, files_read=4,
                                          m=(300, 0)), ['m'], 4, False)
  assert read['total'] == 601 and read['done'] == 301
  assert progress.format_progress(read, 3700, 10.0).endswith('about 0:30 left')
  assert progress.format_progress(read, 3700, 10.0).startswith('1:01:40 | ')
  assert progress.format_progress(read, 3700, 10.0, ending='done').endswith('| done')


def test_progress_files_of_several_processes_add_up(tmp_path):
  (tmp_path / 'host-1.progress.json').write_text(json.dumps({'images_read': 5, 'x': 1}))
  (tmp_path / 'host-2.progress.json').write_text(json.dumps({'images_read': 7}))
  (tmp_path / 'host-3.progress.json.tmp-writing').write_text('{"images_read": 100')
  assert metrics.read_progress(str(tmp_path)) == {'images_read': 12, 'x': 1}


def test_run_metrics_write_this_process_file(tmp_path):
  run_metrics = metrics.RunMetrics(str(tmp_path))
  run_metrics.inc(metrics.IMAGES_READ)
  run_metrics.inc(metrics.IMAGES_READ, 2)
  run_metrics.flush()
  assert metrics.read_progress(str(tmp_path)) == {metrics.IMAGES_READ: 3}
  assert len(list(tmp_path.glob('*.progress.json'))) == 1


def write_progress(folder, **counts):
  (folder / 'a.progress.json').write_text(json.dumps(totals(**counts)))


def reporter_at(folder, times):
  """A reporter of model 'm' over `folder` whose clock reads `times` in turn, and the
  stream it writes to (not a terminal)."""
  stream = io.StringIO()
  return progress.ProgressReporter(str(folder), ['m'], [], 'auto', 30, stream,
                                   iter(times).__next__), stream


def test_reporter_writes_one_line_per_poll_when_not_a_terminal(tmp_path):
  write_progress(tmp_path, read_ok=2, files_read=2, m=(1, 0))
  reporter, stream = reporter_at(tmp_path, [0.0, 10.0, 20.0])
  first = reporter.line()
  write_progress(tmp_path, read_ok=2, files_read=2, m=(2, 0))
  reporter.stop()
  lines = stream.getvalue().splitlines()
  assert first.startswith('0:10 | read 2 | embedded 1 |')
  assert lines == ['0:20 | read 2 | embedded 2 | failed 0 | 0.1 images/s | done']


def test_last_line_gives_the_rate_of_the_whole_run(tmp_path):
  write_progress(tmp_path, read_ok=300, files_read=300, m=(300, 0))
  # Everything was embedded in the first 50 s; index and manifest took the next 100 s.
  reporter, stream = reporter_at(tmp_path, [0.0, 50.0, 150.0])
  assert reporter.line().endswith('| 0.0 images/s')  # no rate from one reading yet
  reporter.stop()
  assert stream.getvalue().splitlines() == [
      '2:30 | read 300 | embedded 300 | failed 0 | 2.0 images/s | done']


def failure(key, stage='decode', error='ImageDecodeError', model=None):
  return FailureRecord(key=key, uri='/in/' + key, stage=stage, error=error,
                       message='bad ' + key, model=model)


def test_failure_reasons_count_and_keep_first_examples():
  combine = FailureReasons()
  left, right = combine.create_accumulator(), combine.create_accumulator()
  for key in ('e', 'c', 'a'):
    left = combine.add_input(left, failure(key))
  for record in (failure('b'), failure('d'), failure('z', 'embed', 'ValueError', 'v1')):
    right = combine.add_input(right, record)
  reasons = combine.extract_output(combine.merge_accumulators([left, right]))
  assert [(r['stage'], r['error'], r['model'], r['count']) for r in reasons] == [
      ('decode', 'ImageDecodeError', None, 5), ('embed', 'ValueError', 'v1', 1)]
  assert [e['key'] for e in reasons[0]['examples']] == ['a', 'b', 'c']
  assert reasons[0]['examples'][0] == {'key': 'a', 'uri': '/in/a', 'message': 'bad a'}
  assert combine.extract_output(combine.create_accumulator()) == []


def test_summary_shows_the_manifest_figures():
  manifest = {
      'counts': {'read': 10, 'models': {'v1': {'embedded': 8, 'failed': 2}}},
      'failures_by_reason': [{'stage': 'decode', 'error': 'ImageDecodeError', 'model': None,
                              'count': 2, 'examples': [{'key': 'x/1.jpg', 'uri': 'u',
                                                        'message': 'truncated'}]}],
      'throughput': {'wall_seconds': 65.0, 'images_per_second': 0.154,
                     'models': {'v1': 0.123}},
  }
  text = summary.format_summary(manifest, '/out')
  assert text.splitlines()[:6] == [
      'run summary',
      '  model  embedded  failed  images/s',
      '  v1            8       2       0.1',
      'failures by reason',
      '  count  reason                   model       first example',
      '      2  decode ImageDecodeError  all models  x/1.jpg: truncated',
  ]
  assert '10 images read in 1:05 (0.2 images/s)' in text
  assert 'outputs in /out:' in text and 'report.html' in text
  assert 'report.html' not in summary.format_summary(manifest, '/out', with_report=False)
  assert 'resumed' not in text


def test_keys_print_on_one_line_and_never_command_the_terminal():
  # A file name may hold a newline or the escape that starts a terminal's commands.
  hostile = 'a\nb\x1b[2J.jpg'
  manifest = {
      'counts': {'read': 1, 'models': {'v1': {'embedded': 0, 'failed': 1}}},
      'failures_by_reason': [{'stage': 'decode', 'error': 'ImageDecodeError', 'model': None,
                              'count': 1, 'examples': [{'key': hostile, 'uri': 'u',
                                                        'message': 'truncated'}]}],
      'models': [{'name': 'v1', 'index': {'repeated_key_rows': 1,
                                          'repeated_key_examples': [hostile]}}]}
  lines = summary.format_summary(manifest, '/out').splitlines()
  assert '      1  decode ImageDecodeError  all models  a\\nb\\x1b[2J.jpg: truncated' in lines
  assert any(line.startswith('  warning: v1: 1 rows repeat the key of another '
                             '(a\\nb\\x1b[2J.jpg)') for line in lines)
  table = query_index.format_table([{'query': hostile, 'neighbors': [
      {'rank': 1, 'score': 1.0, 'key': hostile}]}])
  assert table.splitlines() == ['query: a\\nb\\x1b[2J.jpg', '  rank   score  key',
                                '     1  1.0000  a\\nb\\x1b[2J.jpg']
  assert query_index.format_duplicates_table([{'images': [{'key': hostile}], 'max_score': 1.0}]
                                             ).splitlines()[1] == '  a\\nb\\x1b[2J.jpg'


def test_summary_of_a_resumed_run_says_what_became_of_the_earlier_rows():
  manifest = {'counts': {'read': 10, 'unchanged_not_read': 1150, 'models': {
      'v1': {'embedded': 9, 'failed': 1, 'resumed': 1200, 'changed': 2, 'removed': 0,
             'moved': 1198},
      'v3': {'embedded': 9, 'failed': 1, 'resumed': 0, 'changed': 0, 'removed': 3,
             'moved': 0}}}}
  lines = summary.format_summary(manifest, '/out').splitlines()
  assert lines[1:7] == [
      '  model  embedded  failed  images/s',
      '  v1            9       1         -',
      '  v3            9       1         -',
      '  resumed v1: 1,200 up to date; 2 changed since, read again; 1,198 found at a '
      'new place, uri updated',
      '  resumed v3: 0 up to date; 3 rows of inputs gone, removed',
      '  1,150 inputs unchanged in size and time since: not read again']


def test_a_run_that_stops_early_does_not_end_with_done(tmp_path, capsys):
  config = JobConfig(patterns=(str(tmp_path / '*.jpg'),), input_format='auto',
                     root=str(tmp_path), out_dir=str(tmp_path / 'out'),
                     models=(ModelSpec('m', 'handle'),), batch_size=8)
  with pytest.raises(KeyboardInterrupt):
    with progress.live_progress(config, None, 30):
      raise KeyboardInterrupt
  with progress.live_progress(config, None, 30):
    pass
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines[0].endswith('| stopped') and lines[1].endswith('| done')
