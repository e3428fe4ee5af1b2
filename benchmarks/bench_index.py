"""Index benchmark: build through the project's code on clustered synthetic vectors, print JSON.

Writes a synthetic finished run (N clustered vectors of dimension D as embedding
Parquet), builds its index with transforms.index.build_model_index in a child process
(whose peak memory is measured), then compares the index loaded as query_index.py loads
it with exact search on fresh queries that are not in the index:

  .venv/bin/python benchmarks/bench_index.py --n 1000000 --dim 512
"""

import argparse
import json
import multiprocessing
import os
import pathlib
import resource
import shutil
import sys
import tempfile
import time

PROJECT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

# pylint: disable=wrong-import-position
import faiss
import numpy as np

from benchmarks.synthetic import MODEL_NAME, clustered_vectors, write_synthetic_run
from pipeline.options import parse_bytes
from schemas import outputs
from transforms import index as index_stage


def _build(out_dir, index_type, memory_budget):
  paths = outputs.matching_paths(outputs.embeddings_glob(out_dir, MODEL_NAME))
  index_stage.build_model_index(out_dir, MODEL_NAME, paths, index_type, memory_budget)


def build_in_child(out_dir, index_type, memory_budget):
  """Builds in a fresh process; returns (seconds, that process's peak RSS in MB)."""
  started = time.time()
  child = multiprocessing.get_context('spawn').Process(
      target=_build, args=(out_dir, index_type, memory_budget))
  child.start()
  child.join()
  if child.exitcode != 0:
    raise SystemExit('index build failed (exit %s)' % child.exitcode)
  peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  return time.time() - started, peak_kb / 1024.0


def exact_index(out_dir, dim):
  """The baseline: every stored vector in an exact inner-product index, added in batches."""
  exact = faiss.IndexFlatIP(dim)
  for path in outputs.matching_paths(outputs.embeddings_glob(out_dir, MODEL_NAME)):
    for _, batch in index_stage.iter_embedding_batches(path, 65536):
      exact.add(index_stage.normalize(index_stage.embeddings_matrix(batch)))
  return exact


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--n', type=int, required=True, help='vectors to index')
  parser.add_argument('--dim', type=int, required=True, help='their dimension')
  parser.add_argument('--keep', metavar='DIR',
                      help='write the synthetic run and its index here and keep them')
  parser.add_argument('--index_type', default=index_stage.AUTO)
  parser.add_argument('--index_memory_budget', type=parse_bytes, default='4GB')
  parser.add_argument('--parts', type=int, default=8, help='embedding files to write')
  parser.add_argument('--queries', type=int, default=1000,
                      help='fresh queries for recall@10 (default: %(default)s)')
  parser.add_argument('--latency_queries', type=int, default=200,
                      help='single-query searches timed on each index (default: %(default)s)')
  args = parser.parse_args(argv)

  out_dir = args.keep or tempfile.mkdtemp(prefix='bench_index_')
  try:
    started = time.time()
    centers = write_synthetic_run(out_dir, args.n, args.dim, parts=args.parts)
    write_seconds = time.time() - started

    build_seconds, peak_mb = build_in_child(out_dir, args.index_type,
                                            args.index_memory_budget)
    info = outputs.read_json(outputs.output_path(out_dir, MODEL_NAME,
                                                 outputs.INDEX_INFO_FILE))
    started = time.time()
    index, _, _ = index_stage.load_index(out_dir, MODEL_NAME)
    load_seconds = time.time() - started

    queries = index_stage.normalize(clustered_vectors(
        np.random.default_rng(12345), centers, args.queries))
    exact = exact_index(out_dir, args.dim)
    truth = exact.search(queries, index_stage.RECALL_K)[1]
    timed = queries[:args.latency_queries]
    exact_latency = index_stage.measure_latency(exact, timed)
    index_latency = index_stage.measure_latency(index, timed)
    recall = index_stage.measure_recall(index, queries, truth)
    figures = {
        'n': args.n, 'dim': args.dim, 'factory': info['factory'],
        'search_parameters': info['search_parameters'],
        'memory_budget_mb': round(args.index_memory_budget / 2**20),
        'write_parquet_seconds': round(write_seconds, 1),
        'build_seconds': round(build_seconds, 1),
        'build_peak_rss_mb': round(peak_mb),
        'index_mb': round(info['index_bytes'] / 2**20, 1),
        'load_seconds': round(load_seconds, 3),
        'recall_at_10_fresh_queries': round(recall, 4),
        'recall_at_10_index_info': info['recall_at_10'],
        'latency_ms': index_latency,
        'exact_latency_ms': exact_latency,
        'median_latency_ratio_to_exact': round(
            index_latency['median'] / exact_latency['median'], 4),
        'threads': faiss.omp_get_max_threads(),
    }
    figures['targets_met'] = bool(
        recall >= index_stage.TARGET_RECALL
        and figures['median_latency_ratio_to_exact'] < 0.1
        and peak_mb * 2**20 <= args.index_memory_budget)
    print(json.dumps(figures, indent=2))
    return figures
  finally:
    if not args.keep:
      shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  main()
