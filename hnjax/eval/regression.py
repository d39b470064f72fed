"""Regression probe and metrics for contrastive regression (SupReMix, RnC).

The SupReMix protocol (ALGORITHMS.md §4.7; the DIR benchmarks of Yang et
al., 2021): freeze the encoder, fit a linear regressor on its features of
the training set, keep the epoch with the lowest validation MSE, and report
on the test set the MAE, MSE/RMSE, Pearson and Spearman correlations, the
geometric mean of the absolute errors (G-mean), and the MAE and G-mean per
*shot* group: targets are binned (``bin_width``), and a test example is
many-shot when its bin has more than 100 training examples, few-shot when
fewer than 20, medium-shot otherwise.

References:
  Yang et al., "Delving into Deep Imbalanced Regression", ICML 2021,
  https://arxiv.org/abs/2102.09554
  Wu et al., "Mixup Your Own Pairs", 2023, https://arxiv.org/abs/2309.16633
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hnjax.eval import _arrays

MANY_SHOT, FEW_SHOT = 100, 20  # training examples per bin (DIR)
SHOTS = ('many', 'medium', 'few')


def _vector(name, x):
  x = np.asarray(_arrays.to_local(x), np.float64).reshape(-1)
  if x.size == 0:
    raise ValueError(f'{name} must not be empty')
  return x


def ranks(x: np.ndarray) -> np.ndarray:
  """Ranks ``0..n-1`` with ties given their average rank (as scipy)."""
  x = np.asarray(x)
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  first = np.cumsum(counts) - counts
  return (first + (counts - 1) / 2.0)[inverse.reshape(-1)]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
  """Pearson correlation; NaN when either side is constant."""
  a, b = a - a.mean(), b - b.mean()
  den = np.sqrt(np.sum(a * a) * np.sum(b * b))
  return float(np.sum(a * b) / den) if den > 0 else float('nan')


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman rank correlation (Pearson of average ranks)."""
  return pearson(ranks(a), ranks(b))


def gmean(errors: np.ndarray) -> float:
  """Geometric mean of absolute errors; 0 if any error is 0 (as scipy)."""
  e = np.abs(np.asarray(errors, np.float64))
  if e.size == 0:
    return float('nan')
  if np.any(e == 0):
    return 0.0
  return float(np.exp(np.mean(np.log(e))))


def shot_groups(
    targets: np.ndarray,
    train_targets: np.ndarray,
    *,
    bin_width: float,
    many: int = MANY_SHOT,
    few: int = FEW_SHOT,
) -> np.ndarray:
  """Shot group of each target from the training targets' bin counts.

  Args:
    targets: ``[M]`` targets to classify.
    train_targets: ``[N]`` training targets.
    bin_width: bin size in target units (1 for integer ages).
    many: a bin is many-shot above this many training examples.
    few: a bin is few-shot below this many.

  Returns:
    ``[M]`` int array: 0 many-shot, 1 medium-shot, 2 few-shot.
  """
  if not bin_width > 0:
    raise ValueError(f'bin_width must be > 0, got {bin_width}')
  bins = lambda y: np.floor(np.asarray(y, np.float64) / bin_width)
  uniq, counts = np.unique(bins(train_targets), return_counts=True)
  lookup = dict(zip(uniq.tolist(), counts.tolist()))
  n = np.array([lookup.get(b, 0) for b in bins(targets).tolist()])
  return np.where(n > many, 0, np.where(n < few, 2, 1))


def metrics(
    predictions: jax.typing.ArrayLike,
    targets: jax.typing.ArrayLike,
    *,
    train_targets: jax.typing.ArrayLike | None = None,
    bin_width: float = 1.0,
) -> dict[str, float]:
  """Test metrics of a regressor, overall and per shot group.

  Args:
    predictions: ``[M]`` predicted targets.
    targets: ``[M]`` true targets.
    train_targets: ``[N]`` training targets (for the shot groups); None
      skips the per-shot metrics.
    bin_width: target bin width of the shot groups.

  Returns:
    ``mae``, ``mse``, ``rmse``, ``pearson``, ``spearman``, ``gmean`` and,
    with ``train_targets``, ``mae_{many,medium,few}``,
    ``gmean_{many,medium,few}`` and ``count_{many,medium,few}`` (NaN for an
    empty group).

  Examples:
    >>> import numpy as np
    >>> from hnjax.eval import regression
    >>> m = regression.metrics(np.array([1., 2., 4.]), np.array([1., 3., 3.]))
    >>> m['mae'], m['rmse'], m['spearman']
    (0.666..., 0.816..., 0.866...)
  """
  p = _vector('predictions', predictions)
  y = _vector('targets', targets)
  if p.shape != y.shape:
    raise ValueError(f'predictions and targets differ in shape: {p.shape} vs'
                     f' {y.shape}')
  err = p - y
  out = {
      'mae': float(np.mean(np.abs(err))),
      'mse': float(np.mean(err * err)),
      'rmse': float(np.sqrt(np.mean(err * err))),
      'pearson': pearson(p, y),
      'spearman': spearman(p, y),
      'gmean': gmean(err),
  }
  if train_targets is not None:
    group = shot_groups(y, _vector('train_targets', train_targets),
                        bin_width=bin_width)
    for g, shot in enumerate(SHOTS):
      e = err[group == g]
      out[f'mae_{shot}'] = float(np.mean(np.abs(e))) if e.size else float(
          'nan')
      out[f'gmean_{shot}'] = gmean(e)
      out[f'count_{shot}'] = int(e.size)
  return out


def linear_probe(
    train_x: jax.typing.ArrayLike,
    train_y: jax.typing.ArrayLike,
    val_x: jax.typing.ArrayLike,
    val_y: jax.typing.ArrayLike,
    test_x: jax.typing.ArrayLike,
    *,
    epochs: int = 100,
    batch_size: int = 16,
    learning_rate: float = 0.1,
    seed: int = 0,
) -> dict[str, Any]:
  """Fits ``y ≈ w·x + b`` on frozen features; keeps the best-validation epoch.

  The SupReMix probe (``train_linear.py``): Adam, MSE loss, the learning
  rate divided by 10 at 60% and 80% of training, and the parameters of the
  epoch with the lowest validation MSE. Features are standardised with the
  training mean and standard deviation and the target likewise (the fit is
  the same up to the learning rate's scale; it keeps one learning rate
  right for ages and for pixels). Deterministic given ``seed``.

  Args:
    train_x: ``[N, F]`` training features.
    train_y: ``[N]`` training targets.
    val_x: ``[V, F]`` validation features.
    val_y: ``[V]`` validation targets.
    test_x: ``[M, F]`` test features.
    epochs: passes over the training set.
    batch_size: examples per step (capped at ``N``).
    learning_rate: initial Adam learning rate (standardised units).
    seed: seed of the mini-batch order.

  Returns:
    ``{'predictions': [M] test predictions, 'val_mse': best validation MSE
    (target units), 'best_epoch': its 1-based epoch}``.
  """
  x = np.asarray(_arrays.to_local(train_x), np.float32)
  vx = np.asarray(_arrays.to_local(val_x), np.float32)
  tx = np.asarray(_arrays.to_local(test_x), np.float32)
  y = _vector('train_y', train_y)
  vy = _vector('val_y', val_y)
  for name, a, n in (('train_x', x, y.size), ('val_x', vx, vy.size)):
    if a.ndim != 2 or a.shape[0] != n:
      raise ValueError(f'{name} must be [n, F] with n = {n} targets, got '
                       f'{a.shape}')
  if tx.ndim != 2 or not x.shape[1] == vx.shape[1] == tx.shape[1]:
    raise ValueError(f'feature dims differ: train {x.shape}, val {vx.shape},'
                     f' test {tx.shape}')
  for name, value in (('epochs', epochs), ('batch_size', batch_size)):
    if value < 1:
      raise ValueError(f'{name} must be >= 1, got {value}')
  if not learning_rate > 0:
    raise ValueError(f'learning_rate must be > 0, got {learning_rate}')
  mean, std = x.mean(0), np.maximum(x.std(0), 1e-6)
  y_mean, y_std = y.mean(), max(float(y.std()), 1e-6)
  z = lambda a: jnp.asarray((a - mean) / std)
  n = x.shape[0]
  batch_size = min(batch_size, n)
  steps = n // batch_size
  rng = np.random.default_rng(seed)
  orders = np.stack([rng.permutation(n)[:steps * batch_size]
                     for _ in range(epochs)]).reshape(epochs, steps,
                                                      batch_size)
  params, best_mse, best_epoch = _fit(
      z(x), jnp.asarray((y - y_mean) / y_std, jnp.float32), z(vx),
      jnp.asarray((vy - y_mean) / y_std, jnp.float32),
      jnp.asarray(orders, jnp.int32), jnp.float32(learning_rate))
  pred = np.asarray(z(tx) @ params['w'] + params['b'], np.float64)
  return {'predictions': pred * y_std + y_mean,
          'val_mse': float(best_mse) * y_std**2,
          'best_epoch': int(best_epoch) + 1}


@jax.jit
def _fit(x, y, vx, vy, orders, learning_rate):
  """Adam on MSE; returns the params of the best validation epoch."""
  epochs, steps = orders.shape[:2]
  total = epochs * steps
  schedule = optax.piecewise_constant_schedule(
      1.0, {int(0.6 * total): 0.1, int(0.8 * total): 0.1})
  tx = optax.chain(optax.scale_by_adam(), optax.scale_by_schedule(schedule),
                   optax.scale(-learning_rate))
  params = {'w': jnp.zeros(x.shape[1]), 'b': jnp.zeros(())}
  mse = lambda p, a, t: jnp.mean(jnp.square(a @ p['w'] + p['b'] - t))

  def step(carry, idx):
    p, s = carry
    grads = jax.grad(mse)(p, x[idx], y[idx])
    updates, s = tx.update(grads, s)
    return (optax.apply_updates(p, updates), s), None

  def epoch(carry, inputs):
    p, s, best_p, best, best_e = carry
    e, order = inputs
    (p, s), _ = jax.lax.scan(step, (p, s), order)
    v = mse(p, vx, vy)
    better = v < best  # strict: ties keep the earlier epoch
    best_p = jax.tree.map(lambda a, b: jnp.where(better, a, b), p, best_p)
    return (p, s, best_p, jnp.where(better, v, best),
            jnp.where(better, e, best_e)), None

  init = (params, tx.init(params), params, jnp.inf, jnp.int32(-1))
  (_, _, best_p, best, best_e), _ = jax.lax.scan(
      epoch, init, (jnp.arange(epochs, dtype=jnp.int32), orders))
  return best_p, best, best_e
