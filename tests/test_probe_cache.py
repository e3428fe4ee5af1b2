"""Remembered model probes: used while the model's files are unchanged, redone otherwise."""

import os
import shutil

import pytest

from pipeline import probe_cache
from transforms import models
from transforms.models import ModelSpec, ModelUnavailableError


@pytest.fixture
def counted_probes(monkeypatch, tmp_path):
  """A cache of this test only, and the number of real probes run through it."""
  monkeypatch.setenv(probe_cache.CACHE_ENV, str(tmp_path / 'cache'))
  probed = []
  real_probe = models.probe_model

  def probe_and_count(spec):
    probed.append(spec.name)
    return real_probe(spec)

  monkeypatch.setattr(models, 'probe_model', probe_and_count)
  return probed


def test_a_probe_is_remembered_until_the_model_files_change(counted_probes, tmp_path,
                                                           test_models):
  model = tmp_path / 'v3'
  shutil.copytree(test_models['v3_tf2'], model)
  spec = ModelSpec(name='v3', handle=str(model))
  first = probe_cache.probe_models_remembered([spec])
  again = probe_cache.probe_models_remembered([spec])
  assert counted_probes == ['v3']  # the second launch loaded nothing
  assert again == first and first[0].dim > 0 and first[0].model_format == models.FORMAT_TF2
  variables = next((model / 'variables').glob('*.data-*'))
  os.utime(variables, ns=(0, 0))  # a model updated in place
  assert probe_cache.probe_models_remembered([spec]) == first
  assert counted_probes == ['v3', 'v3']


def test_each_model_file_and_tflite_file_is_keyed_apart(counted_probes, test_models):
  specs = [ModelSpec(name='v1', handle=test_models['v1_tf1']),
           ModelSpec(name='v2', handle=test_models['v2_tflite'])]
  first = probe_cache.probe_models_remembered(specs)
  assert probe_cache.probe_models_remembered(specs) == first
  assert counted_probes == ['v1', 'v2']
  assert [spec.model_format for spec in first] == [models.FORMAT_TF1_HUB, models.FORMAT_TFLITE]
  # Another name for the same files is another spec: probed on its own.
  probe_cache.probe_models_remembered([specs[0]._replace(name='other')])
  assert counted_probes == ['v1', 'v2', 'other']


def test_a_remembered_probe_keeps_its_output_note(counted_probes, tmp_path):
  import model_factory  # pylint: disable=import-outside-toplevel
  spec = ModelSpec(name='c', handle=model_factory.save_tflite_classifier(
      str(tmp_path / 'classifier.tflite')))
  first = probe_cache.probe_models_remembered([spec])
  again = probe_cache.probe_models_remembered([spec])
  assert counted_probes == ['c']
  assert first[0].output_note and again[0].output_note == first[0].output_note


def test_a_failed_probe_is_not_remembered(counted_probes, tmp_path):
  broken = tmp_path / 'broken'
  broken.mkdir()
  (broken / 'saved_model.pb').write_bytes(b'not a SavedModel')
  spec = ModelSpec(name='m', handle=str(broken))
  for _ in range(2):
    with pytest.raises(ModelUnavailableError):
      probe_cache.probe_models_remembered([spec])
  assert counted_probes == ['m', 'm']
  assert not list((tmp_path / 'cache').rglob('*.json'))
