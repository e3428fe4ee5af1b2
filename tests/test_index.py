"""Index stage: the index choice, recall and tuning, files written, and one run per family."""

import json
import tracemalloc

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

import query_index
import run_pipeline
from benchmarks.synthetic import MODEL_NAME, clustered_vectors, write_synthetic_run
from conftest import IN_PROCESS
from schemas import outputs
from transforms import index as index_stage

GB = 2**30


def test_normalize_keeps_zero_vectors_finite():
  vectors = np.array([[3, 4], [0, 0]], np.float32)
  normalized = index_stage.normalize(vectors)
  np.testing.assert_allclose(normalized, [[0.6, 0.8], [0, 0]])
  assert vectors[0, 0] == 3  # input untouched


@pytest.mark.parametrize('count,dim,budget,expected', [
    (0, 512, 4 * GB, 'Flat'),
    (40_000, 1024, 4 * GB, 'Flat'),  # an exact scan is still cheap
    (150_000, 512, 4 * GB, 'HNSW32'),  # a graph while it fits and builds fast
    (1_000_000, 512, 4 * GB, 'IVF4096,Flat'),  # the raw vectors fit: no quantization
    (1_000_000, 1664, 4 * GB, 'IVF4096,PQ64'),  # 6.7 GB of raw vectors do not
    (150_000, 512, 256 * 2**20, 'IVF2048,PQ64'),  # small budget: no graph either
    (1_000_000, 512, 128 * 2**20, 'IVF4096,PQ32'),
    (100_000_000, 1024, 4 * GB, 'IVF32768,PQ16'),
    (10**9, 1024, 64 * GB, 'IVF131072_HNSW32,PQ32'),  # a graph as coarse quantizer
])
def test_choose_factory_families(count, dim, budget, expected):
  assert index_stage.choose_factory(count, dim, budget) == expected


@settings(max_examples=150, deadline=None)
@given(count=st.integers(0, 10**9), dim=st.sampled_from([256, 512, 1000, 1024, 1280, 1664]),
       budget=st.integers(index_stage.MIN_MEMORY_BUDGET, 2**40))
def test_choice_is_a_valid_factory_within_budget(count, dim, budget):
  factory = index_stage.choose_factory(count, dim, budget)
  index_stage.check_factory(factory, dim)  # FAISS accepts it for this dimension
  estimate = index_stage.estimate_index_bytes(factory, count, dim)
  smallest = index_stage.estimate_index_bytes(
      'IVF%d,PQ%d' % (index_stage.ivf_lists(count), index_stage.pq_code_sizes(dim)[-1]),
      count, dim)
  fits = estimate <= budget * index_stage.INDEX_SHARE
  assert fits or count < index_stage.MIN_TRAIN_POINTS or estimate <= smallest * 1.01
  # More memory never buys a smaller, less accurate index.
  richer = index_stage.choose_factory(count, dim, budget * 4)
  assert index_stage.estimate_index_bytes(richer, count, dim) >= estimate or (
      richer in ('Flat', 'HNSW32'))


def test_check_factory_says_why():
  with pytest.raises(ValueError, match='IVF10,PQ7'):
    index_stage.check_factory('IVF10,PQ7', 512)  # 512 is not a multiple of 7
  index_stage.check_factory('OPQ16,IVF256,PQ16', 512)
  with pytest.raises(ValueError, match='IDMap'):
    index_stage.check_factory('IDMap,Flat', 512)  # its add() would fail after the embedding


def test_recall_at_k_counts_shared_neighbours():
  truth = np.array([[1, 2, 3], [4, 5, -1]])
  assert index_stage.recall_at_k(np.array([[3, 2, 1], [4, 5, 6]]), truth) == 1.0
  assert index_stage.recall_at_k(np.array([[1, 9, 9], [9, 9, 5]]), truth) == 2 / 5.0
  # A search that comes back short pads with -1 as well: no neighbour, not a hit.
  assert index_stage.recall_at_k(np.array([[1, 2, 3], [4, 5, -1]]), truth) == 1.0
  assert index_stage.recall_at_k(np.array([[1, -1, -1], [-1, -1, -1]]), truth) == 1 / 5.0


def test_recall_is_measured_not_assumed():
  rng = np.random.default_rng(1)
  vectors = index_stage.normalize(rng.normal(size=(500, 32)))
  truth = index_stage.exact_neighbors(vectors, vectors[:100], 10)
  exact = faiss.IndexFlatIP(32)
  exact.add(vectors)
  assert index_stage.measure_recall(exact, vectors[:100], truth) == 1.0
  coarse = faiss.index_factory(32, 'PQ4x4', faiss.METRIC_INNER_PRODUCT)  # deliberately lossy
  coarse.train(vectors)
  coarse.add(vectors)
  assert index_stage.measure_recall(coarse, vectors[:100], truth) < 0.9


@pytest.mark.parametrize('factory', ['IVF16,Flat', 'HNSW8', 'PCA16,HNSW8',
                                     'IVF16_HNSW8,Flat'])
def test_a_large_k_gets_k_neighbours_from_an_approximate_index(factory):
  """The tuned setting (here the narrowest) runs out of candidates long before k = 150:
  the search widens until every query has its k neighbours."""
  rng = np.random.default_rng(3)
  vectors = index_stage.normalize(clustered_vectors(rng, rng.normal(size=(16, 32)), 400))
  index = faiss.index_factory(32, factory, faiss.METRIC_INNER_PRODUCT)
  index.train(vectors)
  index.add(vectors)
  index_stage.apply_search_parameters(
      index, index_stage.search_parameter_candidates(index)[0] if 'IVF' in factory
      else {'efSearch': 16})
  keys = ['%03d' % row for row in range(400)]
  narrow = index.search(vectors[:20], 150)[1]
  assert (narrow < 0).any()  # the test would prove nothing otherwise
  results = index_stage.search(index, keys, keys, vectors[:20], 150)
  # The tuned setting is back: later searches of the index are not widened.
  assert (index.search(vectors[:20], 150)[1] == narrow).all()
  truth = index_stage.exact_neighbors(vectors, vectors[:20], 150)
  assert [len(neighbors) for neighbors in results] == [150] * 20
  found = np.array([[int(n['key']) for n in neighbors] for neighbors in results])
  assert (found == np.arange(20)[:, None]).any(axis=1).all()  # each query finds itself
  assert index_stage.recall_at_k(found, truth) > index_stage.recall_at_k(narrow, truth)
  exact_index = faiss.IndexFlatIP(32)
  exact_index.add(vectors)
  assert len(index_stage.search(exact_index, keys, keys, vectors[:3], 500)[0]) == 400


def test_tuning_picks_the_cheapest_nprobe_reaching_the_target():
  rng = np.random.default_rng(2)
  centers = rng.standard_normal((40, 32), dtype=np.float32)
  vectors = index_stage.normalize(clustered_vectors(rng, centers, 4000, spread=0.8))
  index = faiss.index_factory(32, 'IVF64,Flat', faiss.METRIC_INNER_PRODUCT)
  index.train(vectors)
  index.add(vectors)
  queries = vectors[:300]
  truth = index_stage.exact_neighbors(vectors, queries, 10)
  parameters, recall = index_stage.tune_search_parameters(index, queries, truth)
  nprobe = parameters['nprobe']
  assert recall >= index_stage.TARGET_RECALL and 1 < nprobe < 64
  assert faiss.extract_index_ivf(index).nprobe == nprobe  # left applied
  index_stage.apply_search_parameters(index, {'nprobe': nprobe // 2})
  assert index_stage.measure_recall(index, queries, truth) < index_stage.TARGET_RECALL


def _write_part(path, keys, vectors):
  pq.write_table(pa.Table.from_pydict({
      'key': keys, 'uri': ['u/' + k for k in keys],
      'embedding': pa.FixedSizeListArray.from_arrays(
          pa.array(vectors.reshape(-1)), vectors.shape[1])}), path)


def test_build_model_index_writes_ids_sorted_by_key(tmp_path):
  rng = np.random.default_rng(3)
  vectors = rng.normal(size=(30, 8)).astype(np.float32)
  keys = ['k%02d' % i for i in range(30)]
  # Written out of order, over two files.
  _write_part(tmp_path / 'part-0.parquet', keys[20:][::-1], vectors[20:][::-1])
  _write_part(tmp_path / 'part-1.parquet', keys[:20], vectors[:20])
  info = index_stage.build_model_index(str(tmp_path), 'm', [
      str(tmp_path / 'part-1.parquet'), str(tmp_path / 'part-0.parquet')])
  assert info['count'] == 30 and info['dimension'] == 8 and info['recall_at_10'] == 1.0
  # An exact scan's recall is 1 by construction: not measured, only its latency.
  assert info['factory'] == 'Flat' and info['exact_search'] and info['recall_queries'] == 0
  assert info['latency_queries'] == 30
  assert json.loads((tmp_path / 'm' / 'index_info.json').read_text()) == info
  index, ids, uris = index_stage.load_index(str(tmp_path), 'm')
  assert ids == keys and uris == ['u/' + k for k in keys]
  # Row i of the index is ids[i]: each vector finds its own key first.
  for row in (0, 5, 25):
    query = index_stage.normalize(vectors[row][None])
    assert index_stage.search(index, ids, uris, query, 1)[0][0]['key'] == keys[row]
  assert not list(tmp_path.rglob('*.tmp-writing'))


def test_files_without_rows_give_an_empty_index(tmp_path):
  # Every image of a run failed: its embedding files exist but hold no rows.
  _write_part(tmp_path / 'part-0.parquet', [], np.zeros((0, 8), np.float32))
  info = index_stage.build_model_index(str(tmp_path), 'm', [str(tmp_path / 'part-0.parquet')])
  assert info['count'] == 0 and info['index_bytes'] == 0
  assert not (tmp_path / 'm' / 'index.faiss').exists()
  assert pq.read_table(tmp_path / 'm' / 'index_ids.parquet').num_rows == 0


def test_exact_index_finds_the_true_neighbours(tmp_path):
  # What an unmeasured recall of 1.0 for a Flat index rests on, checked on a built one.
  write_synthetic_run(str(tmp_path), 3000, 32, parts=3, seed=5)
  index_stage.build_model_index(str(tmp_path), MODEL_NAME, outputs.matching_paths(
      outputs.embeddings_glob(str(tmp_path), MODEL_NAME)), index_type='Flat')
  index, _, _ = index_stage.load_index(str(tmp_path), MODEL_NAME)
  assert index_stage.is_exact(index) and index.ntotal == 3000
  vectors = index.reconstruct_n(0, index.ntotal)
  queries = index_stage.normalize(np.random.default_rng(6).normal(size=(50, 32)))
  truth = index_stage.exact_neighbors(vectors, queries, index_stage.RECALL_K)
  assert index_stage.measure_recall(index, queries, truth) == 1.0
  assert not index_stage.is_exact(faiss.index_factory(32, 'HNSW16'))


def test_latency_timing_ends_once_its_time_is_spent():
  index = faiss.IndexFlatIP(8)
  index.add(index_stage.normalize(np.random.default_rng(7).normal(size=(100, 8))))
  queries = index_stage.normalize(np.random.default_rng(8).normal(size=(60, 8)))
  assert len(index_stage.time_single_queries(index, queries)) == 60
  # With no time to spend, it still times the minimum a median and tail need.
  spent = index_stage.time_single_queries(index, queries, seconds=0)
  assert len(spent) == index_stage.MIN_LATENCY_QUERIES
  assert all(t > 0 for t in spent)
  summary = index_stage.latency_summary(spent)
  assert 0 < summary['median'] <= summary['p99']


def test_exact_index_plan_reads_no_vectors(tmp_path, monkeypatch):
  # An exact index needs no queries planned (recall 1 by construction), so its plan reads
  # the keys alone; its latency is timed on stored vectors, which find themselves.
  write_synthetic_run(str(tmp_path), 500, 16, parts=2, seed=9)
  paths = outputs.matching_paths(outputs.embeddings_glob(str(tmp_path), MODEL_NAME))
  reads = []
  real_batches = index_stage.iter_embedding_batches
  monkeypatch.setattr(index_stage, 'iter_embedding_batches',
                      lambda *args, **kwargs: reads.append(args[0]) or real_batches(
                          *args, **kwargs))
  plan, index = index_stage.plan_index(str(tmp_path), MODEL_NAME, paths, 'Flat')
  assert plan.exact and len(plan.queries) == 0 and not reads
  _, hnsw = index_stage.plan_index(str(tmp_path), MODEL_NAME, paths, 'HNSW16')
  assert reads  # the same files do hold vectors to read for a non-exact index
  index_stage.fill_index(index, plan, range(len(plan.files)))
  sample = index_stage.stored_vectors_sample(index, 50)
  assert sample.shape == (50, 16) and len({row.tobytes() for row in sample}) == 50
  scores, _ = index.search(sample, 1)
  np.testing.assert_allclose(scores[:, 0], 1.0, rtol=1e-5)
  assert index_stage.stored_vectors_sample(index, 900).shape == (500, 16)


def test_filling_an_exact_index_holds_its_vectors_about_once(tmp_path):
  # Beside the index's own copy: the vectors in key order, normalized in place, and one
  # read batch (here a file of 1,000). A 50,000 x 1280 exact index is 256 MB; each
  # extra copy would be another 256 MB (there were two).
  write_synthetic_run(str(tmp_path), 3000, 256, parts=3, seed=5)
  paths = outputs.matching_paths(outputs.embeddings_glob(str(tmp_path), MODEL_NAME))
  plan, index = index_stage.plan_index(str(tmp_path), MODEL_NAME, paths, 'Flat')
  vector_bytes = 3000 * 256 * 4
  tracemalloc.start()
  try:
    index_stage.fill_index(index, plan, range(len(plan.files)))
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert index.ntotal == 3000 and peak < 1.75 * vector_bytes, peak / vector_bytes
  stored = index.reconstruct_n(0, 3000)
  np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, rtol=1e-5)


def test_local_index_is_memory_mapped(tmp_path):
  vectors = index_stage.normalize(np.random.default_rng(4).normal(size=(50, 8)))
  index = faiss.IndexFlatIP(8)
  index.add(vectors)
  path = tmp_path / 'index.faiss'
  index_stage.write_index_file(index, str(path))
  mapped = index_stage.read_index_file(str(path))
  loaded = index_stage.read_index_file(str(path), mmap=False)
  # Overwrite the last stored vector in place: only a mapped index sees the change.
  with open(path, 'r+b') as f:
    f.seek(-4 * 8, 2)
    f.write(np.zeros(8, np.float32).tobytes())
  assert mapped.search(vectors[-1:], 1)[0][0, 0] < 0.99
  assert loaded.search(vectors[-1:], 1)[0][0, 0] > 0.99


@pytest.fixture(scope='module')
def synthetic_run(tmp_path_factory):
  out = tmp_path_factory.mktemp('synthetic') / 'run'
  write_synthetic_run(str(out), 3000, 32, parts=3, seed=5)
  return out


def test_resume_keeps_the_index_type_of_an_index_only_rebuild(tmp_path, photo_tree,
                                                               test_models, capsys):
  """--resume without --index_type used to choose again (auto) and undo the rebuild."""
  root, _, _ = photo_tree
  out = tmp_path / 'out'
  job = ['--input', str(root / '**' / '*.jpg'), '--output', str(out), '--no_report',
         '--model', 'v3=' + test_models['v3_tf2'], *IN_PROCESS]
  run_pipeline.main(job)
  run_pipeline.main(['--output', str(out), '--index_only', '--index_type', 'HNSW8',
                     '--no_report', *IN_PROCESS])
  capsys.readouterr()
  run_pipeline.main(job + ['--resume'])
  assert capsys.readouterr().err.strip().splitlines()[0] == (
      'run_pipeline.py: note: --resume keeps the index type the run was built with, HNSW8 '
      '(--index_type auto chooses again)')
  manifest = json.loads((out / 'manifest.json').read_text())
  assert manifest['models'][0]['index']['factory'] == 'HNSW8'
  assert manifest['options']['index_type'] == 'HNSW8'
  run_pipeline.main(job + ['--resume', '--index_type', 'auto'])
  assert json.loads((out / 'manifest.json').read_text())['models'][0]['index'][
      'factory'] == 'Flat'
  run_pipeline.main(job + ['--resume'])  # auto, as last chosen: no note
  assert 'note: --resume keeps' not in capsys.readouterr().err


def test_index_only_refuses_an_index_its_vectors_cannot_train(synthetic_run, capsys):
  out = synthetic_run
  before = (out / 'manifest.json').read_bytes()
  with pytest.raises(SystemExit) as exit_info:
    run_pipeline.main(['--output', str(out), '--index_only', '--index_type', 'IVF4096,Flat',
                       '--no_report', *IN_PROCESS])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      'run_pipeline.py: error: --index_type IVF4096,Flat needs at least 4096 vectors to '
      'train, and model %s can have 3000 (its embeddings); use --index_type auto, or fewer '
      'lists, codes or PCA dimensions' % MODEL_NAME)
  assert (out / 'manifest.json').read_bytes() == before


@pytest.mark.parametrize('factory,dim,needed', [
    ('Flat', 32, 0), ('HNSW8', 32, 0), ('IVF64,Flat', 32, 64), ('IVF8,PQ8', 32, 256),
    ('PQ8x4', 32, 16), ('IVF16_HNSW8,SQ8', 32, 16), ('OPQ8,IVF16,PQ8', 32, 256),
    ('OPQ8,IVF16,PQ8', 512, 512), ('PCA16,IVF8,Flat', 32, 16), ('PCAR16,Flat', 32, 16)])
def test_training_minimum_is_what_faiss_trains_on(factory, dim, needed):
  assert index_stage.training_minimum(factory, dim) == needed
  if not needed or (factory.startswith('OPQ') and needed - 1 < dim):
    return  # OPQ below its dimension aborts the whole process (FAISS 1.15): not tried
  rng = np.random.default_rng(0)
  index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
  index.train(rng.random((needed, dim), dtype=np.float32))
  assert index.is_trained
  index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
  with pytest.raises(RuntimeError, match='at least as large as number of clusters|'
                                         'PCA matrix cannot output'):
    index.train(rng.random((needed - 1, dim), dtype=np.float32))


@pytest.mark.parametrize('factory,parts,reaches_target', [
    ('Flat', 1, True), ('HNSW16', 1, True), ('IVF32,Flat', 3, True),
    ('IVF16,PQ8', 3, False)])
def test_index_only_rebuild_per_family(synthetic_run, capsys, factory, parts, reaches_target):
  out = synthetic_run
  run_pipeline.main(['--output', str(out), '--index_only', '--index_type', factory,
                     '--index_memory_budget', '256MB', '--no_report', *IN_PROCESS])
  manifest = json.loads((out / 'manifest.json').read_text())
  info = manifest['models'][0]['index']
  assert info == json.loads((out / MODEL_NAME / 'index_info.json').read_text())
  assert (info['factory'], info['count'], info['dimension']) == (factory, 3000, 32)
  assert info['parts'] == parts and info['memory_budget_bytes'] == 256 * 2**20
  assert info['exact_search'] == (factory == 'Flat')
  if factory == 'Flat':
    assert info['recall_queries'] == 0 and info['tuning_queries'] == 0
  else:
    assert info['recall_queries'] == 1000 and info['tuning_queries'] == 1000
  assert info['latency_queries'] == index_stage.LATENCY_QUERIES
  assert info['latency_ms']['median'] <= info['latency_ms']['p99']
  assert (info['recall_at_10'] >= index_stage.TARGET_RECALL) == reaches_target
  assert 0 < info['recall_at_10'] <= 1
  assert manifest['index_rebuilt']['options']['index_type'] == factory
  assert sorted(p.name for p in (out / MODEL_NAME).iterdir()) == [
      'embeddings', 'index.faiss', 'index_ids.parquet', 'index_info.json']
  capsys.readouterr()
  # The query tool finds stored images through the rebuilt index.
  keys = ['img%09d' % i for i in (0, 1234, 2999)]
  results = query_index.run_queries(str(out), keys=keys, k=10)
  for key, result in zip(keys, results):
    assert key in [n['key'] for n in result['neighbors']]
    if reaches_target:
      assert result['neighbors'][0]['key'] == key


def test_an_exact_index_is_copied_into_place_not_written_again(synthetic_run, monkeypatch):
  # Its one filled part is final: serializing it again through Python cost a read and a
  # write of every vector (and an upload on Cloud Storage).
  out = synthetic_run
  written = []
  write_index_file = index_stage.write_index_file

  def recording_write_index_file(index, path):
    written.append(path)
    return write_index_file(index, path)

  monkeypatch.setattr(index_stage, 'write_index_file', recording_write_index_file)
  run_pipeline.main(['--output', str(out), '--index_only', '--index_type', 'Flat',
                     '--no_report', *IN_PROCESS])
  assert written and outputs.INDEX_FILE not in [path.split('/')[-1] for path in written]
  index_path = out / MODEL_NAME / outputs.INDEX_FILE
  info = json.loads((out / MODEL_NAME / 'index_info.json').read_text())
  assert info['index_bytes'] == index_path.stat().st_size
  assert sorted(p.name for p in (out / MODEL_NAME).iterdir()) == [
      'embeddings', 'index.faiss', 'index_ids.parquet', 'index_info.json']
  index = faiss.read_index(str(index_path))
  assert (index.ntotal, index.d) == (3000, 32)
  keys = ['img%09d' % i for i in (7, 2999)]
  for key, result in zip(keys, query_index.run_queries(str(out), keys=keys, k=1)):
    assert result['neighbors'][0]['key'] == key


@pytest.mark.parametrize('keys,expected', [
    ([], (0, [])),
    (['a'], (0, [])),
    (['a', 'b', 'c'], (0, [])),
    (['a', 'a', 'a', 'b', 'c', 'c', 'd', 'e', 'e', 'f', 'f'], (5, ['a', 'c', 'e'])),
])
def test_repeated_keys(keys, expected):
  found = index_stage.repeated_keys(pa.chunked_array([pa.array(keys, pa.string())]))
  assert (found['repeated_key_rows'], found['repeated_key_examples']) == expected
