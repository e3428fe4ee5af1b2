"""The Dataflow job, built offline: --runner DataflowRunner --dry_run --no_auth."""

import tarfile

import pytest
from apache_beam.portability.api import beam_runner_api_pb2

import run_pipeline
from conftest import PROJECT
from pipeline.runners import job_stages
from schemas import outputs

CONTAINER = 'europe-docker.pkg.dev/my-project/images/beam-image-embeddings:1'


def dataflow_dry_run(photo_root, out, test_models, *extra):
  # Local inputs, output and models: the launcher lists and loads them before building
  # the job, and --no_auth leaves it no access to gs:// (and no wish to go online).
  return run_pipeline.main([
      '--input', str(photo_root / '**'), '--output', str(out),
      '--model', 'mobilenet_v1_050_160=' + test_models['v1_tf1'],
      '--model', 'v2=' + test_models['v2_tflite'],
      '--runner', 'DataflowRunner', '--project', 'my-project', '--region', 'europe-west4',
      '--temp_location', 'gs://my-bucket/tmp', '--dry_run', '--no_auth', *extra])


def staged_files(job):
  """{name on the workers: local path} of what the job would stage, per environment."""
  staged = {}
  for environment in job.proto_pipeline.components.environments.values():
    for dependency in environment.dependencies:
      role = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(
          dependency.role_payload)
      source = beam_runner_api_pb2.ArtifactFilePayload.FromString(dependency.type_payload)
      staged[role.staged_name] = source.path
  return staged


def container_images(job):
  return {beam_runner_api_pb2.DockerPayload.FromString(e.payload).container_image
          for e in job.proto_pipeline.components.environments.values()}


@pytest.fixture(scope='module')
def setup_file_job(photo_tree, test_models, tmp_path_factory):
  root, _, _ = photo_tree
  out = tmp_path_factory.mktemp('dry_run') / 'out'
  job = dataflow_dry_run(root, out, test_models, '--setup_file', str(PROJECT / 'setup.py'),
                         '--num_workers', '3', '--machine_type', 'n2-standard-4').job
  assert not out.exists()  # nothing written
  return job


def test_job_holds_every_stage(setup_file_job):
  stages = job_stages(setup_file_job.proto_pipeline)
  for stage in ('ReadImages', 'DecodeImages', 'Embed[mobilenet_v1_050_160]',
                'Embed[v2]', 'WriteEmbeddings[mobilenet_v1_050_160]', 'WriteEmbeddings[v2]',
                'BuildIndex[mobilenet_v1_050_160]', 'BuildIndex[v2]', 'WriteFailures',
                'WriteManifest'):
    assert stage in stages
  # Stages follow the data: nothing is indexed before it is embedded and written.
  assert (stages.index('ReadImages') < stages.index('DecodeImages') < stages.index('Embed[v2]')
          < stages.index('WriteEmbeddings[v2]') < stages.index('BuildIndex[v2]')
          < stages.index('WriteManifest'))


def test_job_carries_the_dataflow_options(setup_file_job):
  options = setup_file_job.options.get_all_options(drop_default=True)
  assert (options['project'], options['region'], options['num_workers'],
          options['machine_type']) == ('my-project', 'europe-west4', 3, 'n2-standard-4')
  assert options['temp_location'].startswith('gs://my-bucket/tmp/')


def test_setup_file_ships_the_project_sources(setup_file_job):
  sdist = staged_files(setup_file_job)['workflow.tar.gz']
  with tarfile.open(sdist) as archive:
    names = {name.split('/', 1)[1] for name in archive.getnames() if '/' in name}
  for module in ('setup.py', 'run_pipeline.py', 'pipeline/versions.py', 'pipeline/graph.py',
                 'transforms/embed.py', 'transforms/models.py', 'schemas/outputs.py'):
    assert module in names


def test_the_project_is_shipped_without_asking(photo_tree, test_models, tmp_path, capfd):
  # Forgetting --setup_file is how Dataflow jobs fail minutes after submission.
  root, _, _ = photo_tree
  job = dataflow_dry_run(root, tmp_path / 'out', test_models).job
  assert job.options.get_all_options()['setup_file'] == str(PROJECT / 'setup.py')
  with tarfile.open(staged_files(job)['workflow.tar.gz']) as archive:
    assert any(name.endswith('/transforms/decode.py') for name in archive.getnames())
  # Beam's stager first tries 'python -m build', which is not installed, in a child
  # process whose error line reached the terminal at every launch.
  assert 'No module named build' not in capfd.readouterr().err


def test_custom_container_replaces_the_default_image(photo_tree, test_models, tmp_path,
                                                     capsys):
  root, _, _ = photo_tree
  job = dataflow_dry_run(root, tmp_path / 'out', test_models, '--sdk_container_image',
                         CONTAINER, '--sdk_location', 'container').job
  assert container_images(job) == {CONTAINER}
  assert 'workflow.tar.gz' not in staged_files(job)
  printed = capsys.readouterr().out
  assert 'dry run: built Dataflow job' in printed and 'nothing was staged or submitted' in printed


def test_dry_run_deletes_nothing_even_with_overwrite(photo_tree, test_models, tmp_path):
  root, _, _ = photo_tree
  out = tmp_path / 'out'
  (out / outputs.FAILURES_DIR).mkdir(parents=True)
  earlier = {out / outputs.MANIFEST_FILE: b'{}',
             out / outputs.FAILURES_DIR / 'part-00000-of-00001.parquet': b'x'}
  for path, data in earlier.items():
    path.write_bytes(data)
  dataflow_dry_run(root, out, test_models, '--overwrite')
  assert {path: path.read_bytes() for path in earlier} == earlier
