"""The straightforward tf.data job the pipeline is compared with: decode_image, resize,
batch, model, Parquet. Kept deliberately plain: it is what a user would write first."""

import argparse
import glob
import json
import os
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# pylint: disable=wrong-import-position
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow as tf


def load_model(handle):
  """A TF2 SavedModel is called; a TF1 Hub module goes through image_feature_vector."""
  try:
    loaded = tf.saved_model.load(handle, tags=[])
    signature = loaded.signatures['image_feature_vector']
    return lambda images: signature(images=images)['default']
  except (KeyError, RuntimeError, ValueError):
    return tf.saved_model.load(handle)


def preprocess(encoded, size):
  """Encoded image bytes -> the model's float input: a full decode, a plain resize."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  return tf.image.resize(image, (size, size)) / 255.0


def run(pattern, handle, size, output, batch_size=64):
  files = sorted(glob.glob(pattern, recursive=True))
  model = load_model(handle)

  def load(path):
    return path, preprocess(tf.io.read_file(path), size)

  dataset = (tf.data.Dataset.from_tensor_slices(files)
             .map(load, num_parallel_calls=tf.data.AUTOTUNE)
             .batch(batch_size)
             .prefetch(tf.data.AUTOTUNE))
  keys, vectors = [], []
  for paths, images in dataset:
    vectors.append(model(images).numpy())
    keys.extend(p.decode() for p in paths.numpy())
  matrix = np.concatenate(vectors).astype(np.float32)
  table = pa.table({'key': keys, 'embedding': pa.FixedSizeListArray.from_arrays(
      pa.array(matrix.reshape(-1)), matrix.shape[1])})
  os.makedirs(output, exist_ok=True)
  pq.write_table(table, os.path.join(output, 'embeddings.parquet'))
  return len(keys)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--input', required=True, help='glob pattern of image files')
  parser.add_argument('--model', required=True, help='SavedModel directory')
  parser.add_argument('--size', type=int, required=True, help='model input side')
  parser.add_argument('--output', required=True)
  args = parser.parse_args()
  started = time.perf_counter()
  count = run(args.input, args.model, args.size, args.output)
  print(json.dumps({'images': count, 'seconds': time.perf_counter() - started}))


if __name__ == '__main__':
  main()
