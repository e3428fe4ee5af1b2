"""The job on Beam's PortableRunner: a separate job service and SDK worker processes, as on
Dataflow, so every DoFn and model handler must pickle and carry no launcher state."""

import json

import pyarrow.parquet as pq
import pytest
from apache_beam.metrics.metric import MetricsFilter

import run_pipeline
from beam_services import job_service_and_worker_pool
from test_pipeline_e2e import (assert_rows_equal_direct_call, direct_tf1, direct_tflite,
                               read_embeddings)


@pytest.fixture(scope='module')
def portable_run(tmp_path_factory, photo_tree, test_models):
  root, paths, corrupt = photo_tree
  work = tmp_path_factory.mktemp('portable')
  out = work / 'out'
  with job_service_and_worker_pool(work / 'services') as (job_endpoint, worker_endpoint):
    result = run_pipeline.main([
        '--input', str(root / '**'), '--output', str(out), '--batch_size', '4',
        '--model', 'mobilenet_v1_050_160=' + test_models['v1_tf1'],
        '--model', 'v2=' + test_models['v2_tflite'],
        '--runner', 'PortableRunner', '--job_endpoint', job_endpoint,
        '--environment_type', 'EXTERNAL', '--environment_config', worker_endpoint])
    worker_log = (work / 'services' / 'worker_pool.log').read_text()
    # Asked of the job service, so while it runs.
    inferences = {
        name: sum(c.committed for c in result.metrics().query(
            MetricsFilter().with_namespace('embed_' + name).with_name('num_inferences'))
                  ['counters'])
        for name in ('mobilenet_v1_050_160', 'v2')}
  return out, root, paths, corrupt, worker_log, inferences


def test_work_ran_in_the_external_worker_pool(portable_run):
  worker_log = portable_run[4]
  assert 'Starting worker with command' in worker_log


def test_counts_and_failures(portable_run):
  out, _, paths, corrupt, _, _ = portable_run
  counts = json.loads((out / 'manifest.json').read_text())['counts']
  assert counts['read'] == len(paths) + 1 and counts['reconciled'] is True
  for name in ('mobilenet_v1_050_160', 'v2'):
    assert counts['models'][name]['embedded'] == len(paths)
  failures = pq.read_table(str(out / 'failures')).to_pylist()
  assert [(f['uri'], f['stage']) for f in failures] == [(str(corrupt), 'decode')]


@pytest.mark.parametrize('name,direct,handle,size', [
    ('mobilenet_v1_050_160', direct_tf1, 'v1_tf1', 160), ('v2', direct_tflite, 'v2_tflite', 224)])
def test_rows_equal_direct_model_calls(portable_run, test_models, name, direct, handle, size):
  out, root, *_ = portable_run
  assert_rows_equal_direct_call(read_embeddings(out, name), root, direct, test_models[handle],
                                size)


def test_counters_reach_the_launcher(portable_run):
  # The counters the README tells Dataflow users to read, named by model.
  _, _, paths, _, _, inferences = portable_run
  assert inferences == {'mobilenet_v1_050_160': len(paths), 'v2': len(paths)}
