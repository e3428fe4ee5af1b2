"""2-D projections of embeddings for the run report: PCA (linear) and t-SNE (neighbourhoods)."""

import numpy as np

TSNE_PERPLEXITY = 30.0
TSNE_ITERATIONS = 500
TSNE_EXAGGERATED_ITERATIONS = 125


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


def neighbour_affinities(vectors, perplexity=TSNE_PERPLEXITY, steps=50):
  """Symmetric t-SNE input affinities: per row a Gaussian whose width gives the wanted
  perplexity (found by bisection on all rows at once)."""
  count = vectors.shape[0]
  perplexity = min(perplexity, max((count - 1) / 3.0, 1.0))
  distances = _squared_distances(vectors)
  np.fill_diagonal(distances, np.inf)
  distances -= distances.min(axis=1, keepdims=True)  # exp() stays in range
  finite = np.where(np.isinf(distances), 0, distances)
  target = np.log(perplexity)
  low, high = np.zeros(count), np.full(count, np.inf)
  beta = np.ones(count)
  for _ in range(steps):
    weights = np.exp(-distances * beta[:, None])
    sums = weights.sum(axis=1)
    entropy = np.log(sums) + beta * (weights * finite).sum(axis=1) / sums
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
  for step in range(iterations):
    exaggeration = 12.0 if step < TSNE_EXAGGERATED_ITERATIONS else 1.0
    momentum = 0.5 if step < TSNE_EXAGGERATED_ITERATIONS else 0.8
    kernel = _squared_distances(points)
    kernel += 1
    np.reciprocal(kernel, out=kernel)  # Student-t kernel 1 / (1 + d^2)
    np.fill_diagonal(kernel, 0)
    # forces = (exaggeration * P - Q) * kernel, Q = kernel / sum(kernel)
    forces = affinities * exaggeration
    forces -= kernel / kernel.sum()
    forces *= kernel
    gradient = 4 * (forces.sum(axis=1)[:, None] * points - forces @ points)
    same_direction = np.sign(gradient) == np.sign(velocity)
    gains = np.where(same_direction, gains * 0.8, gains + 0.2).clip(0.01)
    velocity = momentum * velocity - learning_rate * gains * gradient
    points = points + velocity
    points -= points.mean(axis=0)
  return points.astype(np.float64)
