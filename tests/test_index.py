"""Index stage: normalization, exact cosine search, recall measurement, files written."""

import json

import numpy as np
import pyarrow as pa

from schemas import outputs
from transforms import index as index_stage


def test_normalize_keeps_zero_vectors_finite():
  vectors = np.array([[3, 4], [0, 0]], np.float32)
  normalized = index_stage.normalize(vectors)
  np.testing.assert_allclose(normalized, [[0.6, 0.8], [0, 0]])
  assert vectors[0, 0] == 3  # input untouched


def test_exact_index_scores_are_cosine_similarities():
  rng = np.random.default_rng(0)
  vectors = index_stage.normalize(rng.normal(size=(200, 16)))
  index = index_stage.build_index(vectors)
  scores, ids = index.search(vectors[:5], 3)
  assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]
  expected = vectors[:5] @ vectors.T
  for row in range(5):
    np.testing.assert_allclose(scores[row], np.sort(expected[row])[::-1][:3], rtol=1e-5)


def test_recall_is_measured_not_assumed():
  rng = np.random.default_rng(1)
  vectors = index_stage.normalize(rng.normal(size=(500, 32)))
  exact = index_stage.build_index(vectors)
  assert index_stage.measure_recall(exact, vectors)[0] == 1.0
  coarse = index_stage.build_index(vectors, 'PQ4x4')  # deliberately lossy
  recall, queries = index_stage.measure_recall(coarse, vectors)
  assert queries == 500 and recall < 0.9


def test_build_model_index_writes_sorted_ids_and_info(tmp_path):
  rng = np.random.default_rng(2)
  vectors = rng.normal(size=(30, 8)).astype(np.float32)
  keys = ['k%02d' % i for i in range(30)][::-1]  # written out of order
  table = pa.Table.from_pydict({
      'key': keys, 'uri': ['u/' + k for k in keys],
      'embedding': pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 8)})
  part = tmp_path / 'part.parquet'
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  pq.write_table(table, part)
  info = index_stage.build_model_index(str(tmp_path), 'm', [str(part)])
  assert info['count'] == 30 and info['dimension'] == 8 and info['recall_at_10'] == 1.0
  assert json.loads((tmp_path / 'm' / 'index_info.json').read_text()) == info
  index, ids, uris = index_stage.load_index(str(tmp_path), 'm')
  assert ids == sorted(keys) and uris == ['u/' + k for k in sorted(keys)]
  # Row i of the index is ids[i]: the vector of k05 finds k05 first.
  query = index_stage.normalize(vectors[keys.index('k05')][None])
  assert index_stage.search(index, ids, uris, query, 1)[0][0]['key'] == 'k05'
  assert not list(tmp_path.rglob('*.tmp-writing'))
