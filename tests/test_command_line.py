"""Command-line mistakes stop run_pipeline.py before any work, with one line and status 2."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import PROJECT
from schemas.records import utf8_text


def run_cli(*argv, cwd=PROJECT):
  return subprocess.run([sys.executable, str(PROJECT / 'run_pipeline.py'), *argv],
                        cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


def error_line(result):
  lines = [l for l in result.stderr.strip().splitlines() if l.startswith('run_pipeline.py:')]
  assert len(lines) == 1, result.stderr
  return lines[0]


@pytest.fixture
def one_photo(tmp_path):
  import imagegen  # pylint: disable=import-outside-toplevel
  (tmp_path / 'a.jpg').write_bytes(imagegen.encode(imagegen.photo(1)))
  return tmp_path


@pytest.mark.parametrize('argv,missing', [((), '--input, --output'),
                                           (('--input', 'photos/'), '--output'),
                                           (('--output', 'out/'), '--input')])
def test_every_missing_required_flag_is_named_at_once(tmp_path, argv, missing):
  result = run_cli(*argv, cwd=tmp_path)
  assert result.returncode == 2
  assert error_line(result) == (
      "run_pipeline.py: error: the following arguments are required: %s (example: "
      "--input 'photos/**/*.jpg' --output out/; --help lists every flag)" % missing)
  assert not (tmp_path / 'out').exists()


def test_unknown_model_name(one_photo):
  result = run_cli('--input', str(one_photo / '*.jpg'), '--output', str(one_photo / 'out'),
                   '--model', 'mobilenet_v9')
  assert result.returncode == 2
  assert "unknown model 'mobilenet_v9'" in error_line(result)
  assert 'Traceback' not in result.stderr
  assert not (one_photo / 'out').exists()


@pytest.mark.parametrize('spec,expected', [
    ('manifest.json=/models/m.tflite', "model name 'manifest.json' is the name of a file or "
     "folder the run writes beside the model folders (manifest.json, failures, report.html); "
     "choose another"),
    ('failures=/models/m.tflite', "model name 'failures' is the name of a file or folder"),
    ('report.html=/models/m.tflite', "model name 'report.html' is the name of a file"),
    ('m.tmp-writing=/models/m.tflite', "model name 'm.tmp-writing' is the name of a file"),
    ('/models/m.tflite', '--model /models/m.tflite: give the model a name for its output '
     'folder, as NAME=HANDLE (for example --model mine=/models/m.tflite)'),
    ('m=/models/m.tflite#', "model 'm' has an empty tensor name after \"#\""),
])
def test_model_specs_that_would_break_the_output(spec, expected):
  from pipeline.registry import ModelSpecError, parse_model_spec  # pylint: disable=import-outside-toplevel
  with pytest.raises(ModelSpecError) as error:
    parse_model_spec(spec)
  assert str(error.value).startswith(expected)


def test_a_model_named_like_the_manifest_stops_at_launch(one_photo):
  """It used to run: its folder replaced the manifest, and the run was lost."""
  result = run_cli('--input', str(one_photo / '*.jpg'), '--output', str(one_photo / 'out'),
                   '--model', 'manifest.json=' + str(one_photo / 'm.tflite'))
  assert result.returncode == 2
  assert "model name 'manifest.json' is the name of a file" in error_line(result)
  assert not (one_photo / 'out').exists()


def test_hub_download_failure_says_how_to_use_a_local_copy(one_photo):
  # The seed model's default handle is a tfhub.dev URL, unreachable from here.
  result = run_cli('--input', str(one_photo / '*.jpg'), '--output', str(one_photo / 'out'),
                   '--model', 'mobilenet_v3_small_100_224')
  assert result.returncode == 2
  line = error_line(result)
  assert 'cannot download model https://tfhub.dev/' in line
  assert '--model NAME=/path/to/unpacked_dir' in line
  assert not (one_photo / 'out').exists()


def test_a_classifier_model_is_noted_before_the_run(one_photo, tmp_path):
  import model_factory  # pylint: disable=import-outside-toplevel
  handle = model_factory.save_tflite_classifier(str(tmp_path / 'classifier.tflite'))
  result = run_cli('--input', str(one_photo / '*.jpg'), '--output', str(one_photo / 'out'),
                   '--model', 'c=%s' % handle, '--no_report',
                   '--direct_running_mode', 'in_memory', '--progress_seconds', '0')
  assert result.returncode == 0, result.stderr
  notes = [l for l in result.stderr.splitlines() if l.startswith('run_pipeline.py: note:')]
  assert len(notes) == 1 and "class probabilities" in notes[0], result.stderr
  assert "--model 'c=%s#" % handle in notes[0]
  assert (one_photo / 'out' / 'manifest.json').exists()  # a note, not a stop


def test_pattern_matching_nothing(one_photo):
  result = run_cli('--input', str(one_photo / '*.png'), '--output', str(one_photo / 'out'))
  assert result.returncode == 2
  assert 'matches no files' in error_line(result)


def test_missing_local_model(one_photo):
  result = run_cli('--input', str(one_photo / '*.jpg'), '--output', str(one_photo / 'out'),
                   '--model', 'x=%s' % (one_photo / 'nothing-here'))
  assert result.returncode == 2
  assert 'no SavedModel at' in error_line(result)


def run_in_process(argv, capsys):
  """run_pipeline.main in this process: -> (exit status, stderr lines)."""
  import run_pipeline  # pylint: disable=import-outside-toplevel
  with pytest.raises(SystemExit) as exit_info:
    run_pipeline.main(argv)
  return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize('flags,expected', [
    (['--batch_size', '0'], 'argument --batch_size: expected a whole number of at least 1, '
                            "got '0' (example: --batch_size 32)"),
    (['--batch_size', 'many'], "got 'many'"),
    (['--intra_op_threads', '-1'], 'example: --intra_op_threads 1'),
    (['--progress_seconds', 'soon'], 'example: --progress_seconds 10'),
    (['--max_image_pixels', '90M'], 'example: --max_image_pixels 300000000'),
    (['--input_format', 'zip'], "invalid choice: 'zip'"),
    (['--direct_num_worker', '2'], 'unknown flag --direct_num_worker: did you mean '
                                   '--direct_num_workers?'),
    (['--batch', '8'], 'unknown flag --batch: did you mean --batch_size?'),
    (['--k', '3'], 'unknown flag --k (run_pipeline.py --help lists ours'),  # nothing close
    (['--direct_running_mode', 'fast'], "argument --direct_running_mode: invalid choice: "
                                        "'fast'"),
    (['--direct_num_workers', 'two'], "argument --direct_num_workers: invalid int value"),
    (['--runner', 'SpeedyRunner'], '--runner SpeedyRunner: Unexpected pipeline runner'),
    (['--resume_checksum'], '--resume_checksum applies to --resume only'),
])
def test_bad_flag_values_stop_with_one_line(one_photo, capsys, flags, expected):
  out = one_photo / 'out'
  status, lines = run_in_process(
      ['--input', str(one_photo / '*.jpg'), '--output', str(out)] + flags, capsys)
  assert status == 2
  assert len(lines) == 1 and lines[0].startswith('run_pipeline.py: error: '), lines
  assert expected in lines[0]
  assert not out.exists()


@pytest.mark.parametrize('flag', ['--input', '--output'])
def test_a_folder_named_in_latin1_is_one_line(one_photo, capsys, flag):
  latin1 = one_photo / os.fsdecode(b'caf\xe9')
  latin1.mkdir()
  shutil.copy(one_photo / 'a.jpg', latin1 / 'a.jpg')
  args = {'--input': str(one_photo / '*.jpg'), '--output': str(one_photo / 'out')}
  args[flag] = str(latin1 if flag == '--input' else latin1 / 'out')
  status, lines = run_in_process([item for pair in args.items() for item in pair], capsys)
  assert status == 2 and len(lines) == 1, lines
  assert lines[0].startswith('run_pipeline.py: error: %s %s: a name that is not UTF-8 '
                             'cannot be handed to Beam' % (flag, utf8_text(args[flag])))
  assert not (latin1 / 'out').exists() and not (one_photo / 'out').exists()


def test_unquoted_glob_expanded_by_the_shell(one_photo, capsys):
  (one_photo / 'b.jpg').write_bytes((one_photo / 'a.jpg').read_bytes())
  status, lines = run_in_process(['--input', str(one_photo / 'a.jpg'), str(one_photo / 'b.jpg'),
                                  '--output', str(one_photo / 'out')], capsys)
  assert status == 2 and len(lines) == 1
  assert 'quote glob patterns' in lines[0] and 'b.jpg' in lines[0]


def test_output_blocked_by_a_file(one_photo, capsys):
  status, lines = run_in_process(['--input', str(one_photo / '*.jpg'),
                                  '--output', str(one_photo / 'a.jpg' / 'out')], capsys)
  assert status == 2 and len(lines) == 1
  assert lines[0].endswith('cannot be created: %s is a file' % (one_photo / 'a.jpg'))
  status, lines = run_in_process(['--input', str(one_photo / '*.jpg'),
                                  '--output', str(one_photo / 'a.jpg')], capsys)
  assert status == 2 and 'is a file, not a directory' in lines[0]


def test_output_named_with_glob_characters(one_photo, capsys):
  # Beam's file sink finds the parts it wrote by pattern: in 'out [v1]' it found none
  # and failed the run at its very end.
  for flags in (['--input', str(one_photo / '*.jpg')], ['--index_only']):
    status, lines = run_in_process(flags + ['--output', str(one_photo / 'out [v1]')], capsys)
    assert status == 2 and len(lines) == 1
    assert "out [v1]: an output folder whose name holds '[' cannot be used" in lines[0]
  assert not (one_photo / 'out [v1]').exists()


@pytest.mark.parametrize('flag,value', [('--temp_location', 'gs://b/tmp'),
                                        ('--temp_location', 'gs://My_Bucket/tmp'),
                                        ('--staging_location', '/tmp/staging')])
def test_dataflow_scratch_location_that_is_no_cloud_storage_path(one_photo, capsys, flag,
                                                                 value):
  # Beam only warns, then tries to create a default bucket of its own: two minutes of
  # retries on a machine without network, instead of the bucket the user named.
  status, lines = run_in_process(
      ['--input', str(one_photo / '*.jpg'), '--output', str(one_photo / 'out'),
       '--runner', 'DataflowRunner', '--project', 'my-project', '--region', 'europe-west4',
       '--temp_location', 'gs://my-bucket/tmp', flag, value, '--dry_run', '--no_auth'], capsys)
  assert status == 2 and len(lines) == 1
  assert lines[0].startswith('run_pipeline.py: error: %s %s is not a Cloud Storage path '
                             'Dataflow can use: gs://BUCKET/FOLDER' % (flag, value)), lines


def test_help_lists_our_flags_with_default_and_example(capsys):
  from pipeline.options import build_parser  # pylint: disable=import-outside-toplevel
  parser = build_parser()
  with pytest.raises(SystemExit) as exit_info:
    parser.parse_args(['--help'])
  assert exit_info.value.code == 0
  text = ' '.join(capsys.readouterr().out.split())
  assert 'image-embedding options:' in text
  group = next(g for g in parser._action_groups  # pylint: disable=protected-access
               if g.title == 'image-embedding options')
  flags = [a.option_strings[0] for a in group._group_actions]  # pylint: disable=protected-access
  assert {'--input', '--output', '--model', '--batch_size', '--progress_seconds',
          '--no_report'} <= set(flags)
  for action in group._group_actions:  # pylint: disable=protected-access
    help_text = ' '.join(action.help.split())
    assert 'Example: %s' % action.option_strings[0] in help_text, action.option_strings
    assert 'default' in help_text, action.option_strings


def test_bad_index_type_stops_before_work(one_photo, test_models):
  result = run_cli('--input', str(one_photo / '*.jpg'), '--output', str(one_photo / 'out'),
                   '--model', 'v3=' + test_models['v3_tf2'], '--index_type', 'IVF10,PQ7')
  assert result.returncode == 2
  line = error_line(result)
  assert "--index_type 'IVF10,PQ7' is not a FAISS factory string for dimension 1024" in line
  assert not (one_photo / 'out').exists()


def test_an_index_type_needing_more_vectors_than_files_stops_before_work(one_photo,
                                                                         test_models):
  """One file gives one vector at most: eight inverted lists cannot be trained on it
  (this used to fail after every image was embedded, in a Beam traceback)."""
  result = run_cli('--input', str(one_photo / '*.jpg'), '--output', str(one_photo / 'out'),
                   '--model', 'v3=' + test_models['v3_tf2'], '--index_type', 'IVF8,Flat')
  assert result.returncode == 2
  assert error_line(result) == (
      'run_pipeline.py: error: --index_type IVF8,Flat needs at least 8 vectors to train, and '
      'model v3 can have 1 (the files --input matches); use --index_type auto, or fewer '
      'lists, codes or PCA dimensions')
  assert not (one_photo / 'out').exists()


@pytest.mark.parametrize('flags,message', [
    (['--index_memory_budget', 'lots'], "not a size: 'lots'"),
    (['--index_memory_budget', '1MB'], 'must be at least 64MB'),
    ([], 'holds no finished run'),
    (['--resume'], 'changing nothing else; it takes no --resume'),
    (['--overwrite'], 'it takes no --overwrite')])
def test_index_only_mistakes(one_photo, capsys, flags, message):
  status, lines = run_in_process(['--output', str(one_photo / 'nothing'), '--index_only']
                                 + flags, capsys)
  assert status == 2 and len(lines) == 1 and message in lines[0], lines
  assert not (one_photo / 'nothing').exists()


def test_index_flags_documented_with_default_and_example():
  from pipeline.options import build_parser  # pylint: disable=import-outside-toplevel
  group = next(g for g in build_parser()._action_groups  # pylint: disable=protected-access
               if g.title == 'index options')
  for action in group._group_actions:  # pylint: disable=protected-access
    help_text = ' '.join(action.help.split())
    assert 'Example: %s' % action.option_strings[0] in help_text, action.option_strings
    assert 'default' in help_text, action.option_strings
