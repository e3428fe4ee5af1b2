"""Index stage: a model's embedding Parquet -> a FAISS cosine index with its id table and info."""

import time

import apache_beam as beam
import faiss
import numpy as np
import pyarrow as pa

from schemas import outputs

EXACT_FACTORY = 'Flat'
RECALL_QUERIES = 1000
RECALL_K = 10


def normalize(vectors):
  """L2-normalized float32 copy: inner product on these is cosine similarity. Zero
  vectors stay zero instead of becoming NaN."""
  vectors = np.array(vectors, dtype=np.float32, copy=True)
  norms = np.linalg.norm(vectors, axis=1, keepdims=True)
  np.divide(vectors, norms, out=vectors, where=norms > 0)
  return vectors


def embeddings_matrix(table):
  """The 'embedding' column of an Arrow table -> float32 array (rows, dim), no copy per row."""
  column = table.column('embedding').combine_chunks()
  dim = column.type.list_size
  return column.values.to_numpy(zero_copy_only=False).reshape(-1, dim)


def read_run_embeddings(paths):
  """Embedding Parquet files -> (keys, uris, float32 vectors), sorted by key so the index
  is the same whatever order the shards were written in."""
  table = outputs.read_parquet(paths, columns=['key', 'uri', 'embedding'])
  if table is None or table.num_rows == 0:
    return [], [], None
  order = np.argsort(np.asarray(table.column('key').to_pylist(), dtype=object), kind='stable')
  table = table.take(pa.array(order))
  return (table.column('key').to_pylist(), table.column('uri').to_pylist(),
          embeddings_matrix(table))


def build_index(vectors, factory=EXACT_FACTORY):
  """Normalized vectors -> a trained and filled FAISS inner-product index."""
  index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
  if not index.is_trained:
    index.train(vectors)
  index.add(vectors)
  return index


def exact_neighbors(vectors, queries, k):
  scores = queries @ vectors.T
  k = min(k, vectors.shape[0])
  top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
  order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
  return np.take_along_axis(top, order, axis=1)


def measure_recall(index, vectors, k=RECALL_K, queries=RECALL_QUERIES, seed=0):
  """recall@k of the index against exact search, on up to `queries` stored vectors."""
  count = vectors.shape[0]
  picked = np.random.default_rng(seed).choice(count, size=min(queries, count), replace=False)
  query_vectors = vectors[picked]
  truth = exact_neighbors(vectors, query_vectors, k)
  _, found = index.search(query_vectors, min(k, count))
  hits = sum(len(set(t) & set(f)) for t, f in zip(truth.tolist(), found.tolist()))
  return hits / float(truth.size), len(picked)


def build_model_index(out_dir, model_name, paths):
  """Builds and writes OUT/<model>/index.faiss, index_ids.parquet and index_info.json
  from the given embedding files; returns the info written."""
  started = time.time()
  keys, uris, vectors = read_run_embeddings(paths)
  info = {'model': model_name, 'factory': EXACT_FACTORY, 'metric': 'inner_product',
          'similarity': 'cosine (vectors L2-normalized before indexing)',
          'count': len(keys), 'dimension': None, 'recall_at_10': None,
          'recall_queries': 0}
  model_dir = outputs.model_dir(out_dir, model_name)
  if keys:
    vectors = normalize(vectors)
    index = build_index(vectors)
    recall, queried = measure_recall(index, vectors)
    info.update(dimension=int(vectors.shape[1]), recall_at_10=recall,
                recall_queries=queried)
    outputs.write_bytes_atomically(outputs.output_path(model_dir, outputs.INDEX_FILE),
                                   faiss.serialize_index(index).tobytes())
  outputs.write_parquet(
      outputs.output_path(model_dir, outputs.INDEX_IDS_FILE),
      pa.Table.from_pydict({'key': keys, 'uri': uris}, schema=outputs.INDEX_IDS_SCHEMA))
  info['build_seconds'] = round(time.time() - started, 3)
  outputs.write_json(outputs.output_path(model_dir, outputs.INDEX_INFO_FILE), info)
  return info


def load_index(run_dir, model_name):
  """(FAISS index, keys, uris) of a finished run's model."""
  model_dir = outputs.model_dir(run_dir, model_name)
  ids = outputs.read_parquet([outputs.output_path(model_dir, outputs.INDEX_IDS_FILE)])
  with outputs.FileSystems.open(outputs.output_path(model_dir, outputs.INDEX_FILE)) as f:
    index = faiss.deserialize_index(np.frombuffer(f.read(), dtype=np.uint8))
  return index, ids.column('key').to_pylist(), ids.column('uri').to_pylist()


class BuildIndex(beam.PTransform):
  """Written embedding file paths -> one index-info dict, once every file is final."""

  def __init__(self, out_dir, model_name):
    super().__init__()
    self._out_dir = out_dir
    self._model_name = model_name

  def expand(self, written_paths):
    out_dir, model_name = self._out_dir, self._model_name
    return (
        written_paths
        | 'AllFiles' >> beam.combiners.ToList()
        | 'Build' >> beam.Map(lambda paths: build_model_index(out_dir, model_name,
                                                             sorted(paths))))


def search(index, keys, uris, query_vectors, k):
  """Normalized query vectors -> per query, a list of neighbour dicts (rank, key, uri,
  score = cosine similarity, higher is closer)."""
  k = min(k, index.ntotal)
  if k < 1:
    return [[] for _ in range(len(query_vectors))]
  scores, ids = index.search(np.ascontiguousarray(query_vectors, dtype=np.float32), k)
  return [[{'rank': rank + 1, 'key': keys[i], 'uri': uris[i], 'score': float(score)}
           for rank, (i, score) in enumerate(zip(row_ids, row_scores)) if i >= 0]
          for row_ids, row_scores in zip(ids.tolist(), scores.tolist())]
