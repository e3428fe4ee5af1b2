"""The whole job on a filesystem only Beam knows (mem://): inputs, models and outputs."""

import json
import os
import pathlib

import numpy as np
import pyarrow as pa
import pytest
from apache_beam.io.filesystems import FileSystems

import memory_filesystem
import query_index
import run_pipeline
from pipeline.resume import OutputDirError, check_output_dir, delete_paths, run_outputs
from schemas import outputs
from transforms.models import ModelUnavailableError, saved_model_directory
from test_pipeline_e2e import assert_rows_equal_direct_call, direct_tf2, direct_tflite

IN = memory_filesystem.PREFIX + 'bucket/in/'
OUT = memory_filesystem.PREFIX + 'bucket/out'
MODELS = memory_filesystem.PREFIX + 'bucket/models/'


def upload(local, remote):
  with FileSystems.create(remote) as f:
    f.write(pathlib.Path(local).read_bytes())


def upload_tree(local_dir, remote_dir):
  for path in sorted(pathlib.Path(local_dir).rglob('*')):
    if path.is_file():
      upload(path, remote_dir + path.relative_to(local_dir).as_posix())


@pytest.fixture(scope='module')
def memory_run(tmp_path_factory, photo_tree, test_models):
  root, paths, corrupt = photo_tree
  memory_filesystem.clear()
  upload_tree(root, IN + 'photos/')
  upload_tree(test_models['v3_tf2'], MODELS + 'v3/')
  upload(test_models['v2_tflite'], MODELS + 'v2.tflite')
  # A stray local write to a mem:// path would create a 'mem:' folder in the working
  # directory; an empty one shows there was none.
  workdir = tmp_path_factory.mktemp('memory_run_cwd')
  previous = os.getcwd()
  os.chdir(workdir)
  try:
    run_pipeline.main([
        '--input', IN + 'photos/**', '--output', OUT, '--batch_size', '4',
        '--model', 'v3=' + MODELS + 'v3', '--model', 'v2=' + MODELS + 'v2.tflite',
        # The store lives in this process, so the workers must too.
        '--direct_running_mode', 'in_memory'])
  finally:
    os.chdir(previous)
  yield root, paths, corrupt, workdir
  memory_filesystem.clear()


def test_nothing_was_written_locally(memory_run):
  *_, workdir = memory_run
  assert list(workdir.iterdir()) == []


def test_outputs_are_on_the_remote_filesystem(memory_run):
  _, paths, corrupt, _ = memory_run
  manifest = outputs.read_json(outputs.output_path(OUT, outputs.MANIFEST_FILE))
  assert manifest['counts']['read'] == len(paths) + 1
  assert manifest['counts']['reconciled'] is True
  assert {m['name']: m['handle'] for m in manifest['models']} == {
      'v3': MODELS + 'v3', 'v2': MODELS + 'v2.tflite'}
  failures = outputs.read_parquet(outputs.matching_paths(outputs.failures_glob(OUT)))
  assert failures.column('uri').to_pylist() == [IN + 'photos/' + corrupt.relative_to(
      corrupt.parent.parent).as_posix()]
  for name in ('v3', 'v2'):
    model_dir = outputs.model_dir(OUT, name)
    for filename in (outputs.INDEX_FILE, outputs.INDEX_IDS_FILE, outputs.INDEX_INFO_FILE):
      assert FileSystems.exists(outputs.output_path(model_dir, filename))
  # Beam's temporary shard files were all renamed or removed.
  assert not [p for p in memory_filesystem.all_paths() if 'beam-temp' in p or '.tmp-' in p]


@pytest.mark.parametrize('name,direct,handle', [('v3', direct_tf2, 'v3_tf2'),
                                                ('v2', direct_tflite, 'v2_tflite')])
def test_rows_equal_direct_model_calls(memory_run, test_models, name, direct, handle):
  root, paths, _, _ = memory_run
  table = outputs.read_parquet(outputs.matching_paths(outputs.embeddings_glob(OUT, name)))
  table = table.sort_by('key')
  assert table.column('key').to_pylist() == sorted(
      p.relative_to(root).as_posix() for p in paths)
  assert all(uri.startswith(IN) for uri in table.column('uri').to_pylist())
  assert_rows_equal_direct_call(table, root, direct, test_models[handle], 224)


def test_query_reads_the_remote_run(memory_run, capsys):
  root, paths, _, _ = memory_run
  key = paths[2].relative_to(root).as_posix()
  query_index.main(['--run', OUT, '--model', 'v3', '--image', IN + 'photos/' + key,
                    '--k', '2', '--format', 'json'])
  neighbors = json.loads(capsys.readouterr().out)[0]['neighbors']
  assert neighbors[0]['key'] == key and neighbors[0]['score'] > 0.999


def test_saved_model_directory_copies_only_what_tensorflow_cannot_read(memory_run, tmp_path):
  local = saved_model_directory(MODELS + 'v3')
  assert os.path.isfile(os.path.join(local, 'saved_model.pb'))
  assert os.path.isdir(os.path.join(local, 'variables'))
  assert saved_model_directory(MODELS + 'v3') == local  # once per process
  # TensorFlow reads these itself, so they are used in place.
  assert saved_model_directory('gs://bucket/models/v3') == 'gs://bucket/models/v3'
  assert saved_model_directory(str(tmp_path)) == str(tmp_path)
  with pytest.raises(ModelUnavailableError, match='no SavedModel at'):
    saved_model_directory(MODELS + 'missing')


def write_run_layout(out_dir):
  """A run's files as an interrupted run leaves them, through Beam's filesystems."""
  for relative in (outputs.MANIFEST_FILE, 'failures/part-00000-of-00001.parquet',
                   'm/embeddings/part-00000-of-00001.parquet', 'm/index.faiss',
                   'm/embeddings/beam-temp-part-1234/shard', 'm/index_info.json.tmp-writing'):
    with FileSystems.create(outputs.output_path(out_dir, *relative.split('/'))) as f:
      f.write(b'x')


def test_output_dir_checks_see_the_same_run_on_mem_and_local_disk(tmp_path):
  found = {}
  for out_dir in (str(tmp_path / 'out'), memory_filesystem.PREFIX + 'layout/out'):
    write_run_layout(out_dir)
    with pytest.raises(OutputDirError, match='holds a completed run'):
      check_output_dir(out_dir)
    found[out_dir] = [p[len(out_dir):] for p in run_outputs(out_dir)]
    delete_paths(run_outputs(out_dir))
    assert outputs.matching_paths(out_dir + '/**') == []
  assert found[str(tmp_path / 'out')] == found[memory_filesystem.PREFIX + 'layout/out']
  assert found[str(tmp_path / 'out')] == [
      '/manifest.json', '/failures', '/m', '/m/embeddings/beam-temp-part-1234',
      '/m/index_info.json.tmp-writing']


def test_updating_rows_of_changed_or_moved_inputs_keeps_the_part_on_mem_and_local_disk(
    tmp_path):
  record = {'name': 'm', 'keys_root': '/photos/'}
  schema = outputs.embeddings_schema(4, record)
  keys = ['k%02d' % n for n in range(10)]
  table = pa.Table.from_pydict({
      'key': keys, 'uri': ['/photos/' + k for k in keys], 'model': ['m'] * 10,
      'embedding': pa.FixedSizeListArray.from_arrays(
          pa.array(np.arange(40, dtype=np.float32)), 4),
      'width': [1] * 10, 'height': [1] * 10, 'sha256': ['0' * 64] * 10,
      'file_size': [100] * 10, 'file_modified': [5.0] * 10,
      'label': [None] * 10, 'metadata': [None] * 10}, schema=schema)
  for path in (str(tmp_path / 'part.parquet'), memory_filesystem.PREFIX + 'drop/part.parquet'):
    outputs.write_parquet(path, table, row_group_size=3)
    with FileSystems.open(path) as f:
      before = f.read()

    assert outputs.update_rows(path, ['elsewhere'], {'k03': ('/photos/k03', 100, 5.0)}) == (
        0, 0)
    with FileSystems.open(path) as f:
      assert f.read() == before  # not rewritten

    assert outputs.update_rows(path, ['k01', 'k05', 'k06', 'elsewhere'],
                               {'k02': ('/moved/k02', 100, 5.0), 'k05': ('/moved/k05', 1, 1.0),
                                'k04': ('/photos/k04', 100, 7.0)}) == (3, 2)
    assert outputs.parquet_embeddings_info(path) == (4, record)
    got = outputs.read_parquet([path])
    assert got.column('key').to_pylist() == [k for k in keys if k not in ('k01', 'k05', 'k06')]
    assert got.column('embedding').to_pylist()[1] == [8.0, 9.0, 10.0, 11.0]  # k02's
    assert got.column('uri').to_pylist()[:3] == ['/photos/k00', '/moved/k02', '/photos/k03']
    assert got.column('file_modified').to_pylist()[:4] == [5.0, 5.0, 5.0, 7.0]  # k04 retimed
    assert outputs.read_parquet([path]).schema == schema
    assert outputs.matching_paths(path + '*') == [path]  # no temporary left
