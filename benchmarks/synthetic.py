"""Synthetic finished runs: clustered embedding vectors written as a run's Parquet and manifest."""

import numpy as np
import pyarrow as pa

from schemas import outputs
from transforms.write import ROWS_PER_ROW_GROUP

MODEL_NAME = 'synthetic'


def clustered_vectors(rng, centers, count, spread=1.0):
  """`count` vectors scattered around randomly chosen centers, like embeddings of photos
  of a thousand kinds of things. The clusters are wide: an inverted-file index must
  probe several lists to find a vector's 10 nearest neighbours."""
  picked = rng.integers(0, len(centers), size=count)
  noise = rng.standard_normal((count, centers.shape[1]), dtype=np.float32)
  return centers[picked] + spread * noise


def cluster_centers(rng, count, dim):
  return rng.standard_normal((max(1, count // 1000), dim), dtype=np.float32)


def write_synthetic_run(out_dir, count, dim, parts=4, seed=0, model_name=MODEL_NAME):
  """Writes OUT/<model>/embeddings/part-*.parquet with `count` clustered vectors and a
  manifest, as a finished run would; returns the cluster centers (for fresh queries)."""
  rng = np.random.default_rng(seed)
  centers = cluster_centers(rng, count, dim)
  bounds = np.linspace(0, count, parts + 1).astype(int)
  for part, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
    vectors = clustered_vectors(rng, centers, stop - start)
    keys = ['img%09d' % i for i in range(start, stop)]
    table = pa.Table.from_pydict({
        'key': keys, 'uri': ['synthetic://%s.jpg' % k for k in keys],
        'model': [model_name] * len(keys),
        'embedding': pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
        'width': np.full(len(keys), 224, np.int32),
        'height': np.full(len(keys), 224, np.int32),
        'sha256': ['%064x' % i for i in range(start, stop)],
        'file_size': [None] * len(keys), 'file_modified': [None] * len(keys),
        'label': [None] * len(keys), 'metadata': [None] * len(keys)},
        schema=outputs.embeddings_schema(dim))
    name = '%s-%05d-of-%05d%s' % (outputs.PART_PREFIX, part, parts, outputs.PARQUET_SUFFIX)
    # Row groups as small as the pipeline's own, which readers take one at a time.
    outputs.write_parquet(outputs.output_path(out_dir, model_name, outputs.EMBEDDINGS_DIR,
                                              name), table, ROWS_PER_ROW_GROUP)
  outputs.write_json(outputs.output_path(out_dir, outputs.MANIFEST_FILE), {
      'format_version': outputs.MANIFEST_FORMAT_VERSION,
      'models': [{'name': model_name, 'handle': None, 'tensor': None, 'format': None,
                  'input_size': [224, 224], 'dim': dim, 'index': None,
                  'embeddings': outputs.relative_embeddings_glob(model_name)}],
      'counts': {'read': count, 'read_failed': 0, 'decode_failed': 0, 'reconciled': True,
                 'models': {model_name: {'embedded': count, 'failed': 0,
                                         'embed_failed': 0}}}})
  return centers
