"""Index stage: a model's embedding Parquet -> a FAISS cosine index with its id table and info."""

import contextlib
import ctypes
import math
import os
import re
import time
from typing import NamedTuple, Optional, Tuple

import apache_beam as beam
import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import outputs

AUTO = 'auto'
EXACT_FACTORY = 'Flat'
RECALL_QUERIES = 1000
# Single-query timings: up to LATENCY_QUERIES, ending once LATENCY_SECONDS are spent and
# MIN_LATENCY_QUERIES are timed. A graph or inverted-file index answers all of them in a
# few milliseconds; an exact (Flat) index scans every vector per query, so without the
# time limit its timing would grow with the run (0.35 s of a 10,000-image build, 2 s at
# 50,000 x 1280).
LATENCY_QUERIES = 200
MIN_LATENCY_QUERIES = 20
LATENCY_SECONDS = 0.1
RECALL_K = 10
TARGET_RECALL = 0.95
DEFAULT_MEMORY_BUDGET = 4 * 2**30
MIN_MEMORY_BUDGET = 64 * 2**20

# The index choice, in the autofaiss spirit: exact search while a scan is cheap, a graph
# while it fits and builds quickly (HNSW is filled serially), inverted lists beyond that,
# product quantization when the raw vectors do not fit the budget.
EXACT_MAX_COUNT = 50_000
GRAPH_MAX_COUNT = 200_000
GRAPH_LINKS = 32
GRAPH_QUANTIZER_MIN_LISTS = 2**16  # past this a flat coarse quantizer dominates query time
PQ_CODE_SIZES = (64, 48, 32, 24, 16, 12, 8, 4)  # bytes per vector, most accurate first
TRAIN_POINTS_PER_LIST = 40
MIN_TRAIN_POINTS = 10_000  # PQ codebooks have 256 centroids each
# Shares of the memory budget: the index itself, the training sample, one read batch.
INDEX_SHARE = 0.6
TRAIN_SHARE = 0.1
BATCH_SHARE = 0.05
MAX_BATCH_ROWS = 16_384

# Search parameters tried at build time, cheapest first.
NPROBE_VALUES = tuple(2**i for i in range(17))
EF_SEARCH_VALUES = (16, 32, 64, 128, 256, 512, 1024, 2048)


# ---------------------------------------------------------------- choosing the index

def ivf_lists(count):
  """Inverted lists for `count` vectors: a power of two near 4 sqrt(count), with at
  least TRAIN_POINTS_PER_LIST training points per list."""
  lists = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(count))))
  while lists > 1 and lists * TRAIN_POINTS_PER_LIST > count:
    lists //= 2
  return lists


def pq_code_sizes(dim):
  return [m for m in PQ_CODE_SIZES if dim % m == 0 and m < dim] or [1]


_FACTORY_PATTERN = re.compile(
    r'^(?:Flat|HNSW(?P<links>\d+)|IVF(?P<lists>\d+)(?:_HNSW(?P<qlinks>\d+))?,'
    r'(?:Flat|PQ(?P<pq>\d+)))$')


def estimate_index_bytes(factory, count, dim):
  """Memory of a filled index of the kinds choose_factory returns (None for others)."""
  match = _FACTORY_PATTERN.match(factory)
  if not match:
    return None
  raw = 4 * dim
  if match.group('links'):
    # Level 0 keeps 2M links, the upper levels about 1/M of that again, plus levels.
    links = int(match.group('links'))
    return count * (raw + 8 * links + 8 * links // max(1, links - 1) + 16)
  if match.group('lists'):
    lists = int(match.group('lists'))
    coarse = lists * raw
    if match.group('qlinks'):
      coarse += lists * 8 * int(match.group('qlinks'))
    if match.group('pq'):
      code = int(match.group('pq'))
      return coarse + 256 * raw + count * (code + 8)
    return coarse + count * (raw + 8)
  return count * raw


def choose_factory(count, dim, memory_budget=DEFAULT_MEMORY_BUDGET):
  """(vectors, dimension, memory budget in bytes) -> a FAISS factory string whose filled
  index needs at most INDEX_SHARE of the budget, when any candidate does."""
  room = memory_budget * INDEX_SHARE
  if count < MIN_TRAIN_POINTS or (
      count <= EXACT_MAX_COUNT and estimate_index_bytes(EXACT_FACTORY, count, dim) <= room):
    return EXACT_FACTORY
  graph = 'HNSW%d' % GRAPH_LINKS
  if count <= GRAPH_MAX_COUNT and estimate_index_bytes(graph, count, dim) <= room:
    return graph
  lists = ivf_lists(count)
  coarse = 'IVF%d' % lists
  if lists >= GRAPH_QUANTIZER_MIN_LISTS:
    coarse += '_HNSW%d' % GRAPH_LINKS
  candidates = [coarse + ',Flat'] + [coarse + ',PQ%d' % m for m in pq_code_sizes(dim)]
  for factory in candidates:
    if estimate_index_bytes(factory, count, dim) <= room:
      return factory
  return candidates[-1]


def check_factory(factory, dim):
  """Raises ValueError with FAISS's reason when `factory` makes no index of `dim`."""
  try:
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
  except RuntimeError as e:
    reason = str(e).strip().splitlines()[-1]
    raise ValueError('%r is not a FAISS factory string for dimension %d (%s)'
                     % (factory, dim, reason)) from e
  if isinstance(faiss.downcast_index(index), (faiss.IndexIDMap, faiss.IndexIDMap2)):
    # Such an index refuses add() without ids, which the build would find out only
    # after every image is embedded.
    raise ValueError('%r maps ids, which this index does not need: its ids are the rows of '
                     'index_ids.parquet; leave out the IDMap part' % factory)


def training_minimum(factory, dim):
  """The fewest vectors FAISS trains an index of this factory string on: one per
  inverted list, one per code of a product quantizer, one per output dimension of a
  PCA, and for OPQ's rotation also one per input dimension (FAISS 1.15 aborts the
  process, uncatchable, with fewer)."""
  index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
  if index.is_trained:
    return 0
  parts = [faiss.downcast_index(index)]
  if isinstance(parts[0], faiss.IndexPreTransform):
    parts = [faiss.downcast_VectorTransform(parts[0].chain.at(i))
             for i in range(parts[0].chain.size())] + [faiss.downcast_index(parts[0].index)]
  ivf = faiss.try_extract_index_ivf(index)
  needs = [1, ivf.nlist if ivf is not None else 0]
  for part in parts:
    if isinstance(part, faiss.OPQMatrix):
      needs.append(max(2 ** 8, part.d_in))  # its quantizer's codes: 8 bits each
    elif isinstance(part, faiss.PCAMatrix):
      needs.append(part.d_out)
    elif hasattr(part, 'pq'):
      needs.append(part.pq.ksub)
  return max(needs)


def training_count(index, count, memory_budget):
  """Vectors to train `index` on: enough for its lists and codebooks, within the budget."""
  if index.is_trained:
    return 0
  ivf = faiss.try_extract_index_ivf(index)
  wanted = max(TRAIN_POINTS_PER_LIST * (ivf.nlist if ivf else 1), MIN_TRAIN_POINTS)
  affordable = int(memory_budget * TRAIN_SHARE) // (4 * index.d)
  return max(1, min(count, wanted, affordable))


def batch_rows(dim, memory_budget):
  return int(max(1024, min(MAX_BATCH_ROWS, memory_budget * BATCH_SHARE // (4 * dim))))


# ---------------------------------------------------------------- vectors and recall

def normalize(vectors):
  """L2-normalized float32 copy: inner product on these is cosine similarity. Zero
  vectors stay zero instead of becoming NaN."""
  vectors = np.array(vectors, dtype=np.float32, copy=True)
  normalize_in_place(vectors)
  return vectors


def normalize_in_place(vectors):
  """Like normalize, on a float32 array (rows, dim) that it changes."""
  # einsum sums the squares without an intermediate array as large as the vectors (as
  # np.linalg.norm makes): 11 ms for 10,200 x 1024 against 15-90 ms.
  norms = np.sqrt(np.einsum('ij,ij->i', vectors, vectors))[:, None]
  np.divide(vectors, norms, out=vectors, where=norms > 0)


def embeddings_matrix(table):
  """The 'embedding' column of an Arrow table or batch -> float32 array (rows, dim)."""
  column = table.column('embedding')
  if isinstance(column, pa.ChunkedArray):
    column = column.combine_chunks()
  dim = column.type.list_size
  return column.values.to_numpy(zero_copy_only=False).reshape(-1, dim)


def parquet_shape(path):
  """(rows, dimension) of an embedding file, from its footer alone."""
  with outputs.FileSystems.open(path) as f:
    parquet = pq.ParquetFile(f)
    return parquet.metadata.num_rows, parquet.schema_arrow.field('embedding').type.list_size


def iter_embedding_batches(path, rows, columns=('embedding',)):
  """(first row, Arrow record batch) pairs of one embedding file, `rows` at a time."""
  with outputs.FileSystems.open(path) as f:
    offset = 0
    for batch in pq.ParquetFile(f).iter_batches(batch_size=rows, columns=list(columns)):
      yield offset, batch
      offset += batch.num_rows


def exact_neighbors(vectors, queries, k):
  """Row numbers of the k highest inner products of each query, best first."""
  return faiss.knn(np.ascontiguousarray(queries, np.float32),
                   np.ascontiguousarray(vectors, np.float32), min(k, vectors.shape[0]),
                   metric=faiss.METRIC_INNER_PRODUCT)[1]


def recall_at_k(found, truth):
  """Share of the true neighbours (rows of ids; -1 = none) that were found."""
  hits = sum(len((set(t) - {-1}) & set(f)) for t, f in zip(truth.tolist(), found.tolist()))
  return hits / float(max(1, int((truth >= 0).sum())))


def measure_recall(index, queries, truth):
  """recall@k of the index for the queries, against their exact neighbours `truth`."""
  _, found = index.search(np.ascontiguousarray(queries, np.float32), truth.shape[1])
  return recall_at_k(found, truth)


def time_single_queries(index, queries, k=RECALL_K, seconds=None):
  """Milliseconds of each single-query search, in the queries' order; with `seconds`,
  the timing ends once they are spent and MIN_LATENCY_QUERIES are timed."""
  times, spent = [], 0.0
  for query in np.ascontiguousarray(queries, np.float32):
    started = time.perf_counter()
    index.search(query[None], k)
    elapsed = time.perf_counter() - started
    times.append(elapsed * 1000.0)
    spent += elapsed
    if seconds is not None and spent >= seconds and len(times) >= MIN_LATENCY_QUERIES:
      break
  return times


def measure_latency(index, queries, k=RECALL_K):
  """Median and 99th-percentile time of one single-query search, in milliseconds."""
  return latency_summary(time_single_queries(index, queries, k))


def latency_summary(times):
  """Single-query times in milliseconds -> their median and 99th percentile."""
  if not times:
    return {'median': None, 'p99': None}
  return {'median': round(float(np.median(times)), 4),
          'p99': round(float(np.percentile(times, 99)), 4)}


# ---------------------------------------------------------------- search parameters

def apply_search_parameters(index, parameters):
  space = faiss.ParameterSpace()
  for name, value in (parameters or {}).items():
    space.set_index_parameter(index, name, value)


def _settable(index, name, value):
  try:
    faiss.ParameterSpace().set_index_parameter(index, name, value)
    return True
  except RuntimeError:
    return False


def search_parameter_candidates(index):
  """Cheapest-first parameter settings worth trying on `index` ([] when it has none)."""
  ivf = faiss.try_extract_index_ivf(index)
  if ivf is not None:
    graph_quantizer = _settable(index, 'quantizer_efSearch', 16)
    return [dict({'nprobe': n}, **({'quantizer_efSearch': max(64, 2 * n)}
                                   if graph_quantizer else {}))
            for n in NPROBE_VALUES if n <= ivf.nlist]
  if _settable(index, 'efSearch', 16):
    return [{'efSearch': ef} for ef in EF_SEARCH_VALUES]
  return []


def tune_search_parameters(index, queries, truth, target=TARGET_RECALL):
  """The cheapest parameters reaching `target` recall on the queries (or, when none
  does, the best recall's); applied to the index and returned with that recall."""
  best, best_recall = {}, None
  for parameters in search_parameter_candidates(index):
    apply_search_parameters(index, parameters)
    recall = measure_recall(index, queries, truth)
    if best_recall is None or recall > best_recall:
      best, best_recall = parameters, recall
    if recall >= target:
      break
  apply_search_parameters(index, best)
  return best, best_recall


# ---------------------------------------------------------------- building

class IndexPlan(NamedTuple):
  """Everything an index build needs, fixed before the first vector is added."""
  out_dir: str
  model_name: str
  index_type: str  # as asked: 'auto' or a factory string
  factory: str
  memory_budget: int
  dim: Optional[int]
  count: int
  files: Tuple  # (path, rows, number of rows in the files before it)
  parts: Tuple  # tuples of file numbers, filled separately and merged
  ranks: Optional[np.ndarray]  # row of the files (in order) -> its id: the key's rank
  # Normalized; the first eval_count measure, the rest tune (none for an exact index).
  queries: Optional[np.ndarray]
  eval_count: int
  train_count: int
  exact: bool = False  # an exact scan: its recall is 1 by construction, never measured


def merge_into(index, part):
  """Moves the entries of an inverted-file part into the index (ids are kept)."""
  faiss.extract_index_ivf(index).merge_from(faiss.extract_index_ivf(part), 0)


def gather_rows(files, positions, rows_per_batch):
  """The normalized vectors at the given row numbers of the run, in that order, read in
  one pass over the files."""
  positions = np.asarray(positions, dtype=np.int64)
  order = np.argsort(positions, kind='stable')
  wanted = positions[order]
  gathered = np.zeros((len(positions), 0), np.float32)
  found = 0
  for path, rows, first in files:
    lo, hi = np.searchsorted(wanted, [first, first + rows])
    if lo == hi:
      continue
    for offset, batch in iter_embedding_batches(path, rows_per_batch):
      start, stop = first + offset, first + offset + batch.num_rows
      in_batch = wanted[lo:hi][(wanted[lo:hi] >= start) & (wanted[lo:hi] < stop)]
      if not len(in_batch):
        continue
      vectors = normalize(embeddings_matrix(batch)[in_batch - start])
      if gathered.shape[1] == 0:
        gathered = np.zeros((len(positions), vectors.shape[1]), np.float32)
      gathered[order[found:found + len(in_batch)]] = vectors
      found += len(in_batch)
  return gathered


def plan_index(out_dir, model_name, paths, index_type=AUTO,
               memory_budget=DEFAULT_MEMORY_BUDGET, seed=0):
  """Embedding files -> (IndexPlan, trained empty index or None when there is nothing to
  index). Reads the files' footers, then one pass for the training sample and queries."""
  files, first, dim = [], 0, None
  for path in sorted(paths):
    rows, dim = parquet_shape(path)
    files.append((path, rows, first))
    first += rows
  count = first
  factory = choose_factory(count, dim or 1, memory_budget) if index_type == AUTO else index_type
  empty = dict(out_dir=out_dir, model_name=model_name, index_type=index_type,
               factory=factory, memory_budget=memory_budget, dim=dim, count=count,
               files=tuple(files), queries=None, eval_count=0, train_count=0, ranks=None)
  if count == 0:
    return IndexPlan(parts=(), **empty), None
  # Index ids follow the keys' order, so the index is the same whatever files the rows
  # were written to (by one run, or by several attempts of a resumed one).
  keys = outputs.read_parquet([path for path, _, _ in files], columns=['key'])
  # Arrow's stable sort of UTF-8 bytes is Python's order of the strings, without them.
  order = pc.sort_indices(keys.column('key')).to_numpy()
  del keys
  ranks = np.empty(count, np.int64)
  ranks[order] = np.arange(count, dtype=np.int64)
  index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
  exact = is_exact(index)
  rng = np.random.default_rng(seed)
  if exact:
    # No queries to read: the exact neighbours of 2,000 queries would cost as much as
    # searching for them, the largest part of an exact index's build, to confirm a recall
    # of 1; its latency is timed on stored vectors once it is filled.
    eval_rows = tune_rows = np.zeros(0, np.int64)
  else:
    shuffled = rng.permutation(count)
    # Queries that measure the reported recall are held out from those that tune.
    eval_rows = shuffled[:RECALL_QUERIES]
    tune_rows = shuffled[RECALL_QUERIES:2 * RECALL_QUERIES]
    if not len(tune_rows):
      tune_rows = eval_rows
  train_count = training_count(index, count, memory_budget)
  train_rows = rng.choice(count, size=train_count, replace=False) if train_count else []
  rows_per_batch = batch_rows(dim, memory_budget)
  sample = gather_rows(files, np.concatenate([eval_rows, tune_rows, train_rows]),
                       rows_per_batch)
  query_count = len(eval_rows) + len(tune_rows)
  queries, train = sample[:query_count], sample[query_count:]
  if train_count:
    _skip_polysemous_training(index)
    try:
      index.train(train)
    except RuntimeError as e:  # an explicit --index_type with more clusters than vectors
      reason = str(e).strip().splitlines()[-1].split(' failed: ')[-1]
      raise ValueError(
          'cannot train index %r of model %s on %d vectors (%s); choose an --index_type '
          "that needs fewer ('auto' chooses from the number of vectors)"
          % (factory, model_name, train_count, reason)) from e
  del train, sample
  release_free_memory()
  # Inverted lists take any ids, so each file fills its own part; other indexes number
  # their vectors in insertion order and are filled in one part, in key order.
  ivf = faiss.try_extract_index_ivf(index) is not None
  parts = tuple((n,) for n in range(len(files))) if ivf else (tuple(range(len(files))),)
  return IndexPlan(parts=parts, **dict(empty, queries=queries, eval_count=len(eval_rows),
                                       train_count=train_count, ranks=ranks,
                                       exact=exact)), index


def stored_vectors_sample(index, count, seed=0):
  """Up to `count` of an exact index's stored vectors (the normalized embeddings), chosen
  at random."""
  ids = np.random.default_rng(seed).choice(index.ntotal, size=min(count, index.ntotal),
                                           replace=False)
  return index.reconstruct_batch(ids.astype(np.int64))


def is_exact(index):
  """Whether the index scans every stored vector (a Flat index): its results are the
  true nearest neighbours."""
  return isinstance(faiss.downcast_index(index), faiss.IndexFlat)


def _skip_polysemous_training(index):
  # FAISS trains PQ codes for Hamming pre-filtering by default; searches here never use
  # it, and it is by far the slowest part of training a small PQ index.
  for part in (faiss.try_extract_index_ivf(index), faiss.downcast_index(index)):
    if part is not None and hasattr(part, 'do_polysemous_training'):
      part.do_polysemous_training = False


def fill_index(index, plan, file_numbers):
  """Adds the vectors of the given files to `index` and returns, per plan query, their
  exact top-k among these vectors as (scores, ids); None for an exact index."""
  heap = None if plan.exact else faiss.ResultHeap(len(plan.queries), RECALL_K,
                                                  keep_max=True)
  ivf = faiss.try_extract_index_ivf(index)
  if ivf is None:
    # Ids are insertion numbers here: gather the vectors in key order first (these
    # index types hold every vector anyway, or are chosen only while they are few).
    ordered = np.zeros((plan.count, plan.dim), np.float32)
    for ids, vectors in _file_batches(plan, file_numbers, normalized=False):
      ordered[ids] = vectors
    normalize_in_place(ordered)  # not per batch: one array of the vectors' size, not two
    step = batch_rows(plan.dim, plan.memory_budget)
    for start in range(0, plan.count, step):
      vectors = ordered[start:start + step]
      index.add(vectors)
      _add_truth(heap, plan.queries, vectors, np.arange(start, start + len(vectors)))
  elif ivf is faiss.downcast_index(index) and ivf.ntotal == 0:
    # Two passes: assign every vector to its list, allocate each list once for its
    # final length, then add with the assignments kept.
    assignments = []
    for ids, vectors in _file_batches(plan, file_numbers):
      assignments.append(ivf.quantizer.search(vectors, 1)[1].ravel())
      _add_truth(heap, plan.queries, vectors, ids)
    reserve_lists(ivf, np.bincount(np.concatenate(assignments), minlength=ivf.nlist))
    for (ids, vectors), assigned in zip(_file_batches(plan, file_numbers), assignments):
      ivf.add_core(len(vectors), faiss.swig_ptr(vectors), faiss.swig_ptr(ids),
                   faiss.swig_ptr(np.ascontiguousarray(assigned)))
  else:
    for ids, vectors in _file_batches(plan, file_numbers):
      index.add_with_ids(vectors, ids)
      _add_truth(heap, plan.queries, vectors, ids)
  if heap is None:
    return None
  heap.finalize()
  return heap.D, heap.I


def _file_batches(plan, file_numbers, normalized=True):
  """(ids, vectors) of the given files, in file order; normalized, or else as stored
  (read-only)."""
  rows_per_batch = batch_rows(plan.dim, plan.memory_budget)
  for number in file_numbers:
    path, _, first = plan.files[number]
    for offset, batch in iter_embedding_batches(path, rows_per_batch):
      vectors = embeddings_matrix(batch)
      if normalized:
        vectors = normalize(vectors)
      yield plan.ranks[first + offset:first + offset + len(vectors)], vectors
    release_free_memory()


def release_free_memory():
  """Returns freed memory to the system: Arrow's allocator and glibc's heap keep freed
  buffers for reuse, and the index being filled needs that memory more."""
  pa.default_memory_pool().release_unused()
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass


def _add_truth(heap, queries, vectors, ids):
  if heap is None:
    return
  scores, rows = faiss.knn(queries, vectors, min(RECALL_K, len(vectors)),
                           metric=faiss.METRIC_INNER_PRODUCT)
  heap.add_result(scores, np.where(rows >= 0, ids[np.maximum(rows, 0)], -1))


def reserve_lists(ivf, sizes):
  """Allocates each empty inverted list for its final length at once. A list grown entry
  by entry doubles its capacity, leaving about a third of the memory unused."""
  invlists = faiss.downcast_InvertedLists(ivf.invlists)
  if not isinstance(invlists, faiss.ArrayInvertedLists):
    return
  for list_number in np.nonzero(sizes)[0].tolist():
    if invlists.list_size(list_number) == 0:
      invlists.resize(list_number, int(sizes[list_number]))
      invlists.resize(list_number, 0)  # the capacity stays


def list_sizes(index):
  ivf = faiss.extract_index_ivf(index)
  return np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], np.int64)


def merge_truths(truths):
  """Partial exact top-k lists of several parts -> the exact top-k over all of them
  (None when the parts computed none: an exact index)."""
  truths = list(truths)
  if any(truth is None for truth in truths):
    return None
  heap = faiss.ResultHeap(truths[0][0].shape[0], RECALL_K, keep_max=True)
  for scores, ids in truths:
    heap.add_result(scores, ids)
  heap.finalize()
  return heap.I


def write_index_file(index, path):
  """Streams the index to `path` on any Beam filesystem; returns the bytes written."""
  written = [0]

  def write(handle):
    def chunk(data):
      handle.write(data)
      written[0] += len(data)
    faiss.write_index(index, faiss.PyCallbackIOWriter(chunk))
  outputs.write_atomically(path, write)
  return written[0]


def read_index_file(path, mmap=True):
  """A FAISS index file; memory-mapped when local (unless mmap=False, for an index that
  will be changed), so that a large index opens at once."""
  if mmap and outputs.FileSystems.get_scheme(path) in (None, 'file') and os.path.exists(path):
    return faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC)
  with outputs.FileSystems.open(path) as f:
    return faiss.read_index(faiss.PyCallbackIOReader(f.read))


def finish_index(plan, index, truth, started, filled_file=None):
  """Tunes and measures the filled index, then writes index.faiss, index_ids.parquet and
  index_info.json; returns the info written. filled_file: a file holding this index as
  filled, copied into place when tuning leaves the index unchanged (an exact one)."""
  model_dir = outputs.model_dir(plan.out_dir, plan.model_name)
  index_path = outputs.output_path(model_dir, outputs.INDEX_FILE)
  info = {'model': plan.model_name, 'index_type': plan.index_type, 'factory': plan.factory,
          'metric': 'inner_product',
          'similarity': 'cosine (vectors L2-normalized before indexing)',
          'count': plan.count, 'dimension': plan.dim, 'memory_budget_bytes': plan.memory_budget,
          'estimated_index_bytes': estimate_index_bytes(plan.factory, plan.count,
                                                        plan.dim or 1),
          'train_count': plan.train_count, 'parts': len(plan.parts),
          'exact_search': plan.exact, 'search_parameters': {}, 'target_recall': TARGET_RECALL,
          'recall_at_10': None, 'recall_queries': 0, 'tuning_queries': 0,
          'tuning_recall_at_10': None, 'latency_ms': {'median': None, 'p99': None},
          'latency_queries': 0, 'index_bytes': 0}
  if index is not None:
    if plan.exact:
      info.update(recall_at_10=1.0)
      timed = stored_vectors_sample(index, LATENCY_QUERIES)
    else:
      evaluation, tuning = plan.queries[:plan.eval_count], plan.queries[plan.eval_count:]
      timed = evaluation[:LATENCY_QUERIES]
      truth_eval, truth_tune = truth[:plan.eval_count], truth[plan.eval_count:]
      parameters, tuning_recall = tune_search_parameters(index, tuning, truth_tune)
      info.update(search_parameters=parameters, tuning_recall_at_10=tuning_recall,
                  tuning_queries=len(tuning),
                  recall_at_10=measure_recall(index, evaluation, truth_eval),
                  recall_queries=len(evaluation))
    times = time_single_queries(index, timed, seconds=LATENCY_SECONDS)
    if plan.exact and filled_file is not None:
      # Its bytes are final already: writing them again serialized the whole index
      # through Python (on Cloud Storage an upload, 256 MB at 50,000 x 1280, where a
      # copy stays inside the store). Copied, not moved: a retried step reads the part.
      index_bytes = outputs.copy_into_place(filled_file, index_path)
    else:
      index_bytes = write_index_file(index, index_path)
    info.update(latency_ms=latency_summary(times), latency_queries=len(times),
                index_bytes=index_bytes)
  elif outputs.FileSystems.exists(index_path):
    outputs.FileSystems.delete([index_path])  # an earlier build's, of vectors now gone
  ids = outputs.read_parquet([path for path, _, _ in plan.files], columns=['key', 'uri'])
  if ids is None or not plan.count:
    # No files, or only files without rows (every image of the run failed): no ranks.
    ids = outputs.INDEX_IDS_SCHEMA.empty_table()
  else:
    ids = ids.take(pa.array(np.argsort(plan.ranks)))  # row i = id i
  outputs.write_parquet(outputs.output_path(model_dir, outputs.INDEX_IDS_FILE),
                        ids.select(['key', 'uri']).cast(outputs.INDEX_IDS_SCHEMA))
  info.update(repeated_keys(ids.column('key')))
  info['build_seconds'] = round(time.time() - started, 3)
  outputs.write_json(outputs.output_path(model_dir, outputs.INDEX_INFO_FILE), info)
  return info


REPEATED_KEY_EXAMPLES = 3


def repeated_keys(sorted_keys):
  """{'repeated_key_rows': rows whose key an earlier row has, 'repeated_key_examples': the
  first such keys} of a model's sorted keys. Every key should name one image: WebDataset
  shards of one folder that reuse each other's sample keys break that, and with it a
  query by key and a resume."""
  if len(sorted_keys) < 2:
    return {'repeated_key_rows': 0, 'repeated_key_examples': []}
  later, earlier = sorted_keys.slice(1), sorted_keys.slice(0, len(sorted_keys) - 1)
  same = pc.fill_null(pc.equal(later, earlier), False)
  rows = pc.sum(same).as_py() or 0
  examples = (pc.unique(later.filter(same)).slice(0, REPEATED_KEY_EXAMPLES).to_pylist()
              if rows else [])
  return {'repeated_key_rows': rows, 'repeated_key_examples': examples}


def build_model_index(out_dir, model_name, paths, index_type=AUTO,
                      memory_budget=DEFAULT_MEMORY_BUDGET):
  """Builds and writes a model's index in this process (the Beam stage runs the same
  steps with the parts filled in parallel); returns the info written."""
  started = time.time()
  plan, index = plan_index(out_dir, model_name, paths, index_type, memory_budget)
  truth = None
  if index is not None:
    truth = merge_truths([fill_index(index, plan, range(len(plan.files)))])
  return finish_index(plan, index, truth, started)


def load_index(run_dir, model_name):
  """(FAISS index with its tuned search parameters, keys, uris) of a finished run's
  model; the index is memory-mapped when the run is on a local disk."""
  model_dir = outputs.model_dir(run_dir, model_name)
  ids = outputs.read_parquet([outputs.output_path(model_dir, outputs.INDEX_IDS_FILE)])
  index = read_index_file(outputs.output_path(model_dir, outputs.INDEX_FILE))
  info_path = outputs.output_path(model_dir, outputs.INDEX_INFO_FILE)
  if outputs.FileSystems.exists(info_path):
    apply_search_parameters(index, outputs.read_json(info_path).get('search_parameters'))
  return index, ids.column('key').to_pylist(), ids.column('uri').to_pylist()


# ---------------------------------------------------------------- the Beam stage

def _prepare_parts(paths, out_dir, model_name, index_type, memory_budget):
  started = time.time()
  plan, index = plan_index(out_dir, model_name, paths, index_type, memory_budget)
  if index is not None:
    write_index_file(index, outputs.index_build_path(out_dir, model_name, 'trained.faiss'))
  return plan, started


def _fill_part(number, prepared):
  plan, _ = prepared
  index = read_index_file(outputs.index_build_path(plan.out_dir, plan.model_name,
                                                   'trained.faiss'), mmap=False)
  truth = fill_index(index, plan, plan.parts[number])
  path = outputs.index_build_path(plan.out_dir, plan.model_name, 'part-%05d.faiss' % number)
  write_index_file(index, path)
  return number, path, truth


def _merge_and_finish(parts, prepared):
  plan, started = prepared
  parts = sorted(parts, key=lambda part: part[0])
  index, temporary = None, []
  if plan.count:
    trained_path = outputs.index_build_path(plan.out_dir, plan.model_name, 'trained.faiss')
    temporary.append(trained_path)
  filled_file = None
  if len(parts) == 1:
    filled_file = parts[0][1]
    # An exact index is only searched from here on, so a local part can be memory-mapped.
    index = read_index_file(filled_file, mmap=plan.exact)
    temporary.append(filled_file)
    parts_to_merge = []
  else:
    index = read_index_file(trained_path, mmap=False) if plan.count else None
    parts_to_merge = parts
    if parts and faiss.try_extract_index_ivf(index) is not None:
      # The lists' final lengths, from the parts' headers (memory-mapped, not read).
      reserve_lists(faiss.extract_index_ivf(index),
                    sum(list_sizes(read_index_file(path)) for _, path, _ in parts))
  for _, path, _ in parts_to_merge:
    # Not memory-mapped: merging moves the part's entries, changing both indexes.
    part = read_index_file(path, mmap=False)
    merge_into(index, part)
    del part
    temporary.append(path)
  truth = merge_truths(truth for _, _, truth in parts) if parts else None
  info = finish_index(plan, index, truth, started, filled_file)
  outputs.FileSystems.delete(temporary)
  return info


class BuildIndex(beam.PTransform):
  """Written embedding file paths -> one index-info dict, once every file is final.

  One step plans the index and trains it on a sample; the parts (one per embedding
  file when the index type can be merged, else one) are filled in parallel on workers
  and written beside the index; one step merges them, tunes the search parameters and
  measures recall and latency.
  """

  def __init__(self, out_dir, model_name, index_type=AUTO,
               memory_budget=DEFAULT_MEMORY_BUDGET):
    super().__init__()
    self._args = (out_dir, model_name, index_type, memory_budget)

  def expand(self, written_paths):
    args = self._args
    prepared = beam.pvalue.AsSingleton(
        written_paths
        | 'AllFiles' >> beam.combiners.ToList()
        | 'PlanAndTrain' >> beam.Map(lambda paths: _prepare_parts(paths, *args)))
    root = written_paths.pipeline
    return (
        root
        | 'Start' >> beam.Create([None])
        | 'PartNumbers' >> beam.FlatMap(lambda _, p: range(len(p[0].parts)), prepared)
        | 'SpreadParts' >> beam.Reshuffle()
        | 'FillParts' >> beam.Map(_fill_part, prepared)
        | 'AllParts' >> beam.combiners.ToList()
        | 'MergeAndFinish' >> beam.Map(_merge_and_finish, prepared))


def near_duplicate_pairs(index, batches, threshold, k):
  """(row numbers, normalized vectors) batches of the indexed vectors -> {(row, other):
  best cosine} with row < other, for the pairs scoring at least `threshold` among each
  vector's k nearest neighbours."""
  pairs = {}
  for rows, vectors in batches:
    scores, found = index.search(np.ascontiguousarray(vectors, np.float32),
                                 min(k + 1, index.ntotal))
    rows = np.asarray(rows, np.int64)[:, None]
    hit = (scores >= threshold) & (found >= 0) & (found != rows)
    for row, other, score in zip(np.broadcast_to(rows, found.shape)[hit].tolist(),
                                 found[hit].tolist(), scores[hit].tolist()):
      pair = (min(row, other), max(row, other))
      pairs[pair] = max(score, pairs.get(pair, score))
  return pairs


def group_pairs(pairs):
  """{(a, b): score} -> groups of connected rows (sorted lists), largest group first."""
  parent = {}

  def root(node):
    parent.setdefault(node, node)
    while parent[node] != node:
      parent[node] = parent[parent[node]]
      node = parent[node]
    return node
  for a, b in pairs:
    parent[root(a)] = root(b)
  groups = {}
  for node in list(parent):
    groups.setdefault(root(node), []).append(node)
  return sorted((sorted(members) for members in groups.values()),
                key=lambda members: (-len(members), members[0]))


def _graph_of(index):
  """The HNSW graph of a graph index (under any pre-transform), or None."""
  index = faiss.downcast_index(index)
  while not hasattr(index, 'hnsw'):
    if not isinstance(index, faiss.IndexPreTransform):
      return None
    index = faiss.downcast_index(index.index)
  return index.hnsw


def _widen_search(index, k):
  """Widens the index's search about twice per step, up to all of the index; yields
  after each step. Closed, it puts the tuned setting back, so that later searches of
  the same index are not slowed by one query's large k."""
  ivf = faiss.try_extract_index_ivf(index)
  graph = _graph_of(ivf.quantizer if ivf is not None else index)
  tuned_nprobe = ivf.nprobe if ivf is not None else None
  tuned_ef_search = graph.efSearch if graph is not None else None
  try:
    while True:
      if ivf is not None and ivf.nprobe < ivf.nlist:
        ivf.nprobe = min(2 * ivf.nprobe, ivf.nlist)
        if graph is not None:  # a graph as coarse quantizer must find that many lists
          graph.efSearch = max(graph.efSearch, 2 * ivf.nprobe)
      elif ivf is None and graph is not None and graph.efSearch < index.ntotal:
        graph.efSearch = min(max(2 * graph.efSearch, k), index.ntotal)
      else:
        return
      yield
  finally:
    if ivf is not None:
      ivf.nprobe = tuned_nprobe
    if graph is not None:
      graph.efSearch = tuned_ef_search


def search(index, keys, uris, query_vectors, k):
  """Normalized query vectors -> per query, a list of neighbour dicts (rank, key, uri,
  score = cosine similarity, higher is closer)."""
  k = min(k, index.ntotal)
  if k < 1:
    return [[] for _ in range(len(query_vectors))]
  query_vectors = np.ascontiguousarray(query_vectors, dtype=np.float32)
  scores, ids = index.search(query_vectors, k)
  # The tuned setting reaches the top 10; a larger k can run out of candidates (the
  # probed lists of an inverted file, a graph's search queue) and come back short.
  with contextlib.closing(_widen_search(index, k)) as steps:
    for _ in steps:
      short = (ids < 0).any(axis=1)
      if not short.any():
        break
      scores[short], ids[short] = index.search(query_vectors[short], k)
  # Float rounding can put the cosine of an image with itself a hair above 1.
  scores = np.clip(scores, -1.0, 1.0)
  return [[{'rank': rank + 1, 'key': keys[i], 'uri': uris[i], 'score': float(score)}
           for rank, (i, score) in enumerate(zip(row_ids, row_scores)) if i >= 0]
          for row_ids, row_scores in zip(ids.tolist(), scores.tolist())]
