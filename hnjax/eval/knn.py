"""Weighted k-nearest-neighbour classifier on frozen embeddings.

The monitor used by InstDisc (Wu et al., 2018) and the MoCo CIFAR-10 demo:
each query's ``k`` most cosine-similar bank entries vote for their label with
weight ``exp(sim / temperature)``; the class with the largest total wins.

References:
  Wu et al., Unsupervised Feature Learning via Non-Parametric Instance
  Discrimination, 2018. https://arxiv.org/abs/1805.01978
  He et al., Momentum Contrast for Unsupervised Visual Representation
  Learning, 2020. https://arxiv.org/abs/1911.05722
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from hnjax import numerics
from hnjax.eval import _arrays


@functools.partial(jax.jit, static_argnames=('num_classes', 'k', 'chunk_size'))
def _knn_predict(
    query, bank, bank_labels, temperature, *, num_classes, k, chunk_size
):
  q, b = numerics.l2_normalize(query), numerics.l2_normalize(bank)
  num_queries, dim = q.shape
  pad = -num_queries % chunk_size
  chunks = jnp.pad(q, ((0, pad), (0, 0))).reshape(-1, chunk_size, dim)

  def predict_chunk(qc):  # [chunk, D] -> [L, chunk]
    sims = jnp.matmul(qc, b.T, precision=jax.lax.Precision.HIGHEST)  # [c, N]
    top_sims, top_idx = jax.lax.top_k(sims, k)  # [c, k], descending
    # Subtracting each row's max leaves the argmax unchanged and keeps
    # exp() finite for small temperatures.
    weights = jnp.exp((top_sims - top_sims[:, :1]) / temperature)
    rows = jnp.arange(qc.shape[0])[:, None]
    preds = []
    for labels in bank_labels:  # label sets share the neighbours
      # A scatter-add keeps memory at [chunk, C], not one-hot's
      # [chunk, k, C].
      scores = jnp.zeros((qc.shape[0], num_classes), jnp.float32)
      scores = scores.at[rows, labels[top_idx]].add(weights)
      preds.append(jnp.argmax(scores, axis=-1).astype(jnp.int32))
    return jnp.stack(preds)

  out = jax.lax.map(predict_chunk, chunks)  # [chunks, L, chunk]
  return jnp.moveaxis(out, 1, 0).reshape(len(bank_labels), -1)[
      :, :num_queries]


def knn_predict(
    query_features: jax.typing.ArrayLike,
    bank_features: jax.typing.ArrayLike,
    bank_labels: jax.typing.ArrayLike,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 256,
) -> jax.Array:
  """Predicts labels by a similarity-weighted vote of the k nearest neighbours.

  .. math::
    \\hat y(q) = \\arg\\max_c \\sum_{i \\in \\mathrm{top}_k(q)}
      e^{\\cos(q, b_i) / t} [y_i = c]

  Features are L2-normalised (in float32) first. The queries are processed
  ``chunk_size`` at a time inside one jitted ``lax.map``, so the memory is
  ``O(chunk_size * N)`` rather than ``O(Q * N)``. Sharded or multi-process
  global arrays are gathered onto one device first.

  Args:
    query_features: ``[Q, D]`` embeddings to classify.
    bank_features: ``[N, D]`` labelled embeddings (e.g. the training set).
    bank_labels: ``[N]`` int labels in ``[0, num_classes)``.
    num_classes: number of classes ``C``.
    k: neighbours per query; if ``k > N``, all ``N`` bank entries vote (the
      result equals ``k = N``), so small smoke-test banks work unchanged.
    temperature: softness of the vote weights; must be positive.
    chunk_size: queries per chunk.

  Returns:
    ``[Q]`` int32 predicted labels.

  Raises:
    ValueError: on mismatched shapes, an empty bank, non-positive ``k``,
      ``temperature``, ``num_classes`` or ``chunk_size``, or labels outside
      ``[0, num_classes)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from hnjax.eval import knn
    >>> bank = jnp.array([[1., 0.], [0.9, 0.1], [0., 1.]])
    >>> knn.knn_predict(jnp.array([[1., 0.05], [0.1, 1.]]), bank,
    ...                 jnp.array([0, 0, 1]), num_classes=2, k=1)
    Array([0, 1], dtype=int32)

  References:
    Wu et al., 2018. https://arxiv.org/abs/1805.01978
  """
  return _predict(query_features, bank_features, (bank_labels,),
                  num_classes=num_classes, k=k, temperature=temperature,
                  chunk_size=chunk_size)[0]


def _predict(query_features, bank_features, label_sets, *, num_classes, k,
             temperature, chunk_size):
  """Validates, then votes for each ``[N]`` labeling: ``[L, Q]`` int32."""
  query = _arrays.to_local(query_features)
  bank = _arrays.to_local(bank_features)
  if query.ndim != 2 or bank.ndim != 2 or query.shape[1] != bank.shape[1]:
    raise ValueError(
        'query_features and bank_features must be [Q, D] and [N, D], got'
        f' {query.shape} and {bank.shape}'
    )
  if bank.shape[0] == 0:
    raise ValueError('bank_features is empty')
  for name, value in (
      ('num_classes', num_classes),
      ('k', k),
      ('chunk_size', chunk_size),
  ):
    if value < 1:
      raise ValueError(f'{name} must be >= 1, got {value}')
  if not temperature > 0:
    raise ValueError(f'temperature must be > 0, got {temperature}')
  label_sets = tuple(np.asarray(_arrays.to_local(l)) for l in label_sets)
  for labels in label_sets:
    if labels.shape != bank.shape[:1]:
      raise ValueError(
          f'bank_labels must have shape {bank.shape[:1]}, got {labels.shape}'
      )
    if labels.min() < 0 or labels.max() >= num_classes:
      raise ValueError(
          f'bank_labels must be in [0, {num_classes}), got'
          f' [{labels.min()}, {labels.max()}]'
      )
  return _knn_predict(
      query,
      bank,
      tuple(jnp.asarray(l, jnp.int32) for l in label_sets),
      jnp.float32(temperature),
      num_classes=num_classes,
      k=min(k, bank.shape[0]),
      chunk_size=min(chunk_size, max(query.shape[0], 1)),
  )


def knn_accuracy(
    query_features: jax.typing.ArrayLike,
    query_labels: jax.typing.ArrayLike,
    bank_features: jax.typing.ArrayLike,
    bank_labels: jax.typing.ArrayLike,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 256,
) -> float:
  """Top-1 accuracy of :func:`knn_predict`, as a fraction in ``[0, 1]``.

  Args:
    query_features: ``[Q, D]`` embeddings (e.g. the test set).
    query_labels: ``[Q]`` true labels.
    bank_features: ``[N, D]`` labelled embeddings.
    bank_labels: ``[N]`` labels.
    num_classes: number of classes.
    k: neighbours per query (capped at ``N``).
    temperature: vote temperature.
    chunk_size: queries per chunk.

  Returns:
    The fraction of queries whose predicted label equals ``query_labels``.

  Raises:
    ValueError: as :func:`knn_predict`, or if ``query_labels`` is not ``[Q]``.
  """
  query = _arrays.to_local(query_features)
  labels = np.asarray(_arrays.to_local(query_labels))
  if labels.shape != query.shape[:1]:
    raise ValueError(
        f'query_labels must have shape {query.shape[:1]}, got {labels.shape}'
    )
  pred = knn_predict(
      query,
      bank_features,
      bank_labels,
      num_classes=num_classes,
      k=k,
      temperature=temperature,
      chunk_size=chunk_size,
  )
  return float(np.mean(np.asarray(pred) == labels))


def knn_accuracies(
    query_features: jax.typing.ArrayLike,
    bank_features: jax.typing.ArrayLike,
    labels: Mapping[str, tuple[jax.typing.ArrayLike, jax.typing.ArrayLike]],
    *,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 256,
) -> dict[str, float]:
  """:func:`knn_accuracy` for several labelings, one neighbour search.

  The ``k`` nearest neighbours of each query are found once and vote for
  each labeling (e.g. a class and its factors: shape and colour); the
  search, not the vote, is the cost.

  Args:
    query_features: ``[Q, D]`` embeddings.
    bank_features: ``[N, D]`` labelled embeddings.
    labels: ``{name: (query_labels [Q], bank_labels [N])}``, non-negative
      ints; each labeling has ``max + 1`` classes.
    k: neighbours per query (capped at ``N``).
    temperature: vote temperature.
    chunk_size: queries per chunk.

  Returns:
    ``{name: accuracy}``, each equal to :func:`knn_accuracy` on that
    labeling.
  """
  query = _arrays.to_local(query_features)
  bank = _arrays.to_local(bank_features)
  names = list(labels)
  pairs = [tuple(np.asarray(_arrays.to_local(x)) for x in labels[n])
           for n in names]
  for n, (q_lab, b_lab) in zip(names, pairs):
    if q_lab.shape != query.shape[:1] or b_lab.shape != bank.shape[:1]:
      raise ValueError(
          f'labels[{n!r}] must have shapes {query.shape[:1]} and '
          f'{bank.shape[:1]}, got {q_lab.shape} and {b_lab.shape}')
    if min(q_lab.min(initial=0), b_lab.min(initial=0)) < 0:
      raise ValueError(f'labels[{n!r}] must be >= 0')
  num_classes = max(int(max(q.max(initial=0), b.max(initial=0))) + 1
                    for q, b in pairs)
  preds = np.asarray(_predict(
      query, bank, tuple(b for _, b in pairs), num_classes=num_classes, k=k,
      temperature=temperature, chunk_size=chunk_size))
  return {n: float(np.mean(p == q)) for n, p, (q, _) in zip(names, preds,
                                                           pairs)}
