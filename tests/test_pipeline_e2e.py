"""End-to-end runs of run_pipeline.py on the DirectRunner, checked against direct model calls."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

import query_index
import run_pipeline
from pipeline.runners import local_cores
from schemas import outputs
from transforms.decode import decode_image
from transforms.models import RESPONSE_VALUES, probe_picture


def run_job(*argv):
  run_pipeline.main(list(argv))


def read_embeddings(out_dir, model):
  return pq.read_table(str(out_dir / model / 'embeddings')).sort_by('key')


def direct_tf2(handle, pixels):
  return tf.saved_model.load(handle)(tf.constant(pixels, tf.float32) / 255.0).numpy()


def direct_tf1(handle, pixels):
  signature = tf.saved_model.load(handle, tags=[]).signatures['image_feature_vector']
  return signature(images=tf.constant(pixels, tf.float32) / 255.0)['default'].numpy()


def direct_tflite(handle, pixels):
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=import-outside-toplevel
  interpreter = Interpreter(model_path=handle)
  detail = interpreter.get_input_details()[0]
  interpreter.resize_tensor_input(detail['index'], pixels.shape)
  interpreter.allocate_tensors()
  interpreter.set_tensor(detail['index'], pixels.astype(np.float32) / 255.0)
  interpreter.invoke()
  return interpreter.get_tensor(interpreter.get_output_details()[0]['index'])


def three_model_job(root, out, test_models, *beam_args):
  run_job('--input', str(root / '**' / '*.jpg'), '--input', str(root / '**' / '*.png'),
          '--output', str(out), '--batch_size', '4',
          '--model', 'v3=' + test_models['v3_tf2'],
          '--model', 'mobilenet_v1_050_160=' + test_models['v1_tf1'],
          '--model', 'v2=' + test_models['v2_tflite'], *beam_args)


@pytest.fixture(scope='module')
def three_model_run(tmp_path_factory, photo_tree, test_models):
  """The default local run: DirectRunner, one worker process per core."""
  root, paths, corrupt = photo_tree
  out = tmp_path_factory.mktemp('three_model_run') / 'out'
  three_model_job(root, out, test_models)
  return out, root, paths, corrupt


def test_output_layout_counts_and_failures(three_model_run):
  out, root, paths, corrupt = three_model_run
  manifest = json.loads((out / 'manifest.json').read_text())
  counts = manifest['counts']
  assert counts['read'] == len(paths) + 1
  for name in ('v3', 'mobilenet_v1_050_160', 'v2'):
    model_counts = counts['models'][name]
    assert model_counts['embedded'] == len(paths)
    assert model_counts['embedded'] + model_counts['failed'] == counts['read']
    assert sorted(p.name for p in (out / name / 'embeddings').iterdir()) == sorted(
        p.name for p in (out / name / 'embeddings').glob('part-*-of-*.parquet'))
    for filename in ('index.faiss', 'index_ids.parquet', 'index_info.json'):
      assert (out / name / filename).exists()
  assert counts['reconciled'] is True
  failures = pq.read_table(str(out / 'failures')).to_pylist()
  assert [(f['key'], f['stage']) for f in failures] == [('cats/corrupt.jpg', 'decode')]
  assert failures[0]['uri'] == str(corrupt)
  assert failures[0]['message']
  assert {m['name']: m['dim'] for m in manifest['models']} == {
      'v3': 1024, 'mobilenet_v1_050_160': 512, 'v2': 1664}
  # Frozen weights are a SavedModel's; a TFLite model makes no claim either way.
  assert {m['name']: m['freeze_weights'] for m in manifest['models']} == {
      'v3': True, 'mobilenet_v1_050_160': True, 'v2': None}


def test_rows_match_schema_keys_and_labels(three_model_run):
  out, root, paths, _ = three_model_run
  table = read_embeddings(out, 'v3')
  assert table.schema.equals(outputs.embeddings_schema(1024))
  expected_keys = sorted(str(p.relative_to(root)) for p in paths)
  assert table.column('key').to_pylist() == expected_keys
  rows = table.to_pylist()
  for row in rows:
    assert row['label'] == row['key'].split('/')[0]
    assert row['model'] == 'v3'
    source = root / row['key']
    import hashlib  # pylint: disable=import-outside-toplevel
    assert row['sha256'] == hashlib.sha256(source.read_bytes()).hexdigest()
    from PIL import Image  # pylint: disable=import-outside-toplevel
    assert (row['width'], row['height']) == Image.open(source).size
    assert (row['file_size'], row['file_modified']) == (source.stat().st_size,
                                                         source.stat().st_mtime)


def assert_rows_equal_direct_call(table, root, direct, handle, size):
  """Embedding rows equal a direct call of the model on the same decoded pixels of the
  images under root (within float tolerance)."""
  keys = table.column('key').to_pylist()
  pixels = np.stack([decode_image((root / key).read_bytes(), [(size, size)])[2][(size, size)]
                     for key in keys])
  expected = direct(handle, pixels)
  got = np.stack(table.column('embedding').to_numpy(zero_copy_only=False))
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


THREE_MODELS = pytest.mark.parametrize('name,direct,size,test_model', [
    ('v3', direct_tf2, 224, 'v3_tf2'), ('mobilenet_v1_050_160', direct_tf1, 160, 'v1_tf1'),
    ('v2', direct_tflite, 224, 'v2_tflite')])


@THREE_MODELS
def test_pipeline_equals_direct_model_call(three_model_run, test_models, name, direct, size,
                                           test_model):
  out, root, _, _ = three_model_run
  assert_rows_equal_direct_call(read_embeddings(out, name), root, direct,
                                test_models[test_model], size)


@THREE_MODELS
def test_every_part_names_the_model_that_wrote_it(three_model_run, test_models, name, direct,
                                                  size, test_model):
  out, *_ = three_model_run
  handle = test_models[test_model]
  expected = direct(handle, probe_picture(size, size))[0][:RESPONSE_VALUES]
  parts = sorted((out / name / 'embeddings').glob('part-*.parquet'))
  assert parts
  for part in parts:
    dim, record = outputs.parquet_embeddings_info(str(part))
    assert (record['name'], record['handle'], record['dim']) == (name, handle, dim)
    assert record['input_size'] == [size, size]
    np.testing.assert_allclose(record['response'], expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())


def test_default_run_uses_a_worker_process_per_core(three_model_run):
  out, *_ = three_model_run
  beam_options = json.loads((out / 'manifest.json').read_text())['options']['beam']
  assert beam_options['direct_running_mode'] == 'multi_processing'
  assert beam_options['direct_num_workers'] == local_cores()


def test_in_process_mode_gives_the_same_rows(three_model_run, tmp_path, test_models):
  out, root, _, _ = three_model_run
  in_process = tmp_path / 'in_process'
  three_model_job(root, in_process, test_models, '--direct_running_mode', 'in_memory')
  for name in ('v3', 'mobilenet_v1_050_160', 'v2'):
    multi, single = read_embeddings(out, name), read_embeddings(in_process, name)
    assert multi.column('key').to_pylist() == single.column('key').to_pylist()
    assert multi.drop(['embedding']).equals(single.drop(['embedding']))
    vectors = [np.stack(t.column('embedding').to_numpy(zero_copy_only=False))
               for t in (multi, single)]
    np.testing.assert_allclose(vectors[0], vectors[1], rtol=1e-5,
                               atol=1e-5 * np.abs(vectors[1]).max())
  assert (json.loads((in_process / 'manifest.json').read_text())['counts'] ==
          json.loads((out / 'manifest.json').read_text())['counts'])


def test_query_finds_each_image_itself(three_model_run):
  out, root, paths, _ = three_model_run
  results = query_index.run_queries(str(out), 'v3', images=[str(p) for p in paths[:3]],
                                    keys=[str(paths[4].relative_to(root))], k=3)
  assert [r['query'] for r in results] == [str(p) for p in paths[:3]] + [
      str(paths[4].relative_to(root))]
  for result, path in zip(results, paths[:3] + [paths[4]]):
    top = result['neighbors'][0]
    assert top['key'] == str(path.relative_to(root))
    assert top['rank'] == 1 and top['score'] > 0.999
    assert [n['rank'] for n in result['neighbors']] == [1, 2, 3]
    scores = [n['score'] for n in result['neighbors']]
    assert scores == sorted(scores, reverse=True)


def test_query_cli_json(three_model_run, capsys):
  out, root, paths, _ = three_model_run
  query_index.main(['--run', str(out), '--model', 'v2', '--image', str(paths[0]),
                    '--k', '2', '--format', 'json'])
  printed = json.loads(capsys.readouterr().out)
  assert printed[0]['query'] == str(paths[0])
  assert printed[0]['neighbors'][0]['key'] == str(paths[0].relative_to(root))
  assert set(printed[0]['neighbors'][0]) == {'rank', 'key', 'uri', 'score'}


def test_query_needs_model_choice_when_several(three_model_run, capsys):
  out, _, paths, _ = three_model_run
  with pytest.raises(SystemExit) as exit_info:
    query_index.main(['--run', str(out), '--image', str(paths[0])])
  assert exit_info.value.code == 2
  assert '--model' in capsys.readouterr().err
