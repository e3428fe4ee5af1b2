"""2-D projections of embeddings for the run report: PCA (linear) and t-SNE (neighbourhoods)."""

import numpy as np

TSNE_PERPLEXITY = 30.0
TSNE_ITERATIONS = 500
TSNE_EXAGGERATED_ITERATIONS = 125
TSNE_EXAGGERATION = 12.0  # early exaggeration of the affinities, as in the paper
ENTROPY_TOLERANCE = 1e-5  # nats, as in the paper's reference implementation


def pca_2d(vectors):
  """Rows -> (their coordinates on the first two principal components, the share of the
  variance each of the two explains)."""
  vectors = np.asarray(vectors, dtype=np.float64)
  centered = vectors - vectors.mean(axis=0)
  _, singular, components = np.linalg.svd(centered, full_matrices=False)
  variance = singular ** 2
  total = variance.sum()
  coordinates = np.zeros((vectors.shape[0], 2))
  shares = [0.0, 0.0]
  for axis in range(min(2, components.shape[0])):
    coordinates[:, axis] = centered @ components[axis]
    shares[axis] = float(variance[axis] / total) if total > 0 else 0.0
  return coordinates, shares


def _squared_distances(points):
  squares = np.einsum('ij,ij->i', points, points)
  distances = squares[:, None] + squares[None, :] - 2 * (points @ points.T)
  np.maximum(distances, 0, out=distances)
  return distances


def _planar_squared_distances(points, out, scratch):
  """Pairwise squared distances of 2-D points into `out`: the differences coordinate by
  coordinate, where a matrix product with an inner dimension of 2 was the slowest step of
  a t-SNE iteration (and needs no clipping of rounding below zero)."""
  x, y = np.ascontiguousarray(points.T)  # a strided column took twice as long
  np.subtract.outer(x, x, out=out)
  out *= out
  np.subtract.outer(y, y, out=scratch)
  scratch *= scratch
  out += scratch
  return out


def neighbour_affinities(vectors, perplexity=TSNE_PERPLEXITY, steps=50):
  """Symmetric t-SNE input affinities: per row a Gaussian whose width gives the wanted
  perplexity (found by bisection on all rows at once, at most `steps`, until every row's
  entropy is within ENTROPY_TOLERANCE of the target)."""
  count = vectors.shape[0]
  perplexity = min(perplexity, max((count - 1) / 3.0, 1.0))
  distances = _squared_distances(vectors)
  np.fill_diagonal(distances, np.inf)
  distances -= distances.min(axis=1, keepdims=True)  # exp() stays in range
  finite = np.where(np.isinf(distances), 0, distances)
  target = np.log(perplexity)
  low, high = np.zeros(count), np.full(count, np.inf)
  beta = np.ones(count)
  weights, weighted = np.empty_like(distances), np.empty_like(distances)  # for every step
  for _ in range(steps):
    np.multiply(distances, -beta[:, None], out=weights)
    np.exp(weights, out=weights)
    sums = weights.sum(axis=1)
    np.multiply(weights, finite, out=weighted)
    entropy = np.log(sums) + beta * weighted.sum(axis=1) / sums
    if np.abs(entropy - target).max() < ENTROPY_TOLERANCE:
      break  # after 25-30 of the 50 steps on the embeddings tried (13 ms each at 1,500)
    too_wide = entropy > target
    low = np.where(too_wide, beta, low)
    high = np.where(too_wide, high, beta)
    beta = np.where(np.isinf(high), beta * 2, (low + high) / 2)
  conditional = weights / weights.sum(axis=1, keepdims=True)
  joint = (conditional + conditional.T) / (2 * count)
  return np.maximum(joint, 1e-12).astype(np.float32)


def tsne_2d(vectors, iterations=TSNE_ITERATIONS, seed=0):
  """Rows -> 2-D coordinates by exact t-SNE (van der Maaten and Hinton, 2008), started
  from the PCA coordinates so that the result is the same on every run. Cost grows with
  the square of the rows: meant for a few thousand."""
  vectors = np.asarray(vectors, dtype=np.float64)
  count = vectors.shape[0]
  if count < 3:
    return pca_2d(vectors)[0]
  affinities = neighbour_affinities(vectors)
  start, _ = pca_2d(vectors)
  scale = start[:, 0].std()
  if scale > 0:
    points = (start / scale * 1e-4).astype(np.float32)
  else:
    points = np.random.default_rng(seed).normal(0, 1e-4, (count, 2)).astype(np.float32)
  velocity = np.zeros_like(points)
  gains = np.ones_like(points)
  learning_rate = max(count / 12.0, 50.0)
  exaggerated = affinities * TSNE_EXAGGERATION
  # Count x count buffers reused by every step (9 MB each at 1,500 points) and the
  # operations fused where numpy allows: a step took about 7 ms at 1,500 points, now 4.
  kernel, forces = np.empty((count, count), np.float32), np.empty((count, count), np.float32)
  with_ones = np.ones((count, 3), np.float32)
  for step in range(iterations):
    early = step < TSNE_EXAGGERATED_ITERATIONS
    momentum = 0.5 if early else 0.8
    _planar_squared_distances(points, kernel, forces)
    kernel += 1
    np.reciprocal(kernel, out=kernel)  # Student-t kernel 1 / (1 + d^2)
    np.fill_diagonal(kernel, 0)
    # forces = (exaggeration * P - Q) * kernel, Q = kernel / sum(kernel)
    np.multiply(kernel, 1 / kernel.sum(), out=forces)
    np.subtract(exaggerated if early else affinities, forces, out=forces)
    forces *= kernel
    # One product gives forces @ points and the rows' sums of forces.
    with_ones[:, :2] = points
    pulled = forces @ with_ones
    gradient = 4 * (pulled[:, 2:] * points - pulled[:, :2])
    same_direction = np.sign(gradient) == np.sign(velocity)
    gains = np.where(same_direction, gains * 0.8, gains + 0.2).clip(0.01)
    velocity = momentum * velocity - learning_rate * gains * gradient
    points = points + velocity
    points -= points.mean(axis=0)
  return points.astype(np.float64)
