"""The real quantized MobileNet v1 (../shared/models/coral) through the whole job."""

import json

import pytest

import query_index
import run_pipeline
from conftest import CORAL_V1_FEATURES, IN_PROCESS


@pytest.fixture(scope='module')
def coral_run(tmp_path_factory, coral_v1, coral_images):
  out = tmp_path_factory.mktemp('coral') / 'out'
  run_pipeline.main(['--input', str(coral_images / '*'), '--output', str(out),
                     '--model', 'v1=%s#%s' % (coral_v1, CORAL_V1_FEATURES), *IN_PROCESS])
  return out, coral_images


def test_retrieval_finds_own_class(coral_run):
  out, images = coral_run
  for label in ('cat', 'dog', 'hotdog'):
    query = images / ('imprinting_%s_test_0.bmp' % label)
    result = query_index.run_queries(str(out), images=[str(query)], k=2)[0]
    # Rank 1 is the query itself (it is in the run); rank 2 is its nearest other image.
    assert result['neighbors'][0]['key'] == query.name
    assert result['neighbors'][1]['key'].startswith('imprinting_%s_train_' % label), result


def test_every_image_finds_itself_first(coral_run):
  out, images = coral_run
  manifest = json.loads((out / 'manifest.json').read_text())
  assert manifest['models'][0]['dim'] == 512
  embedded = manifest['counts']['models']['v1']['embedded']
  photos = sorted(p for p in images.iterdir() if p.suffix.lower() in ('.jpg', '.bmp'))
  assert embedded == len(photos) == 18
  results = query_index.run_queries(str(out), images=[str(p) for p in photos], k=1)
  for photo, result in zip(photos, results):
    assert result['neighbors'][0]['key'] == photo.name
    assert result['neighbors'][0]['score'] > 0.999
  # The two licence texts beside the photos are failures with a reason, not drops.
  assert manifest['counts']['decode_failed'] == 2
