"""Linear probe: multinomial logistic regression on frozen features.

The standard evaluation of self-supervised representations (MoCo, MoCHi):
freeze the encoder, fit a linear classifier on its features of the training
set, report top-1 accuracy on the test set. Here the features are
standardised with the training mean and standard deviation, and the
classifier is trained with Adam and a cosine learning-rate decay in one
jitted ``lax.scan``; the result is deterministic given ``seed``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hnjax.eval import _arrays


def _check(name_x, x, name_y, y, num_classes):
  if x.ndim != 2 or y.shape != x.shape[:1] or x.shape[0] == 0:
    raise ValueError(
        f'{name_x} must be [N, D] with N > 0 and {name_y} [N], got'
        f' {x.shape} and {y.shape}'
    )
  if y.min() < 0 or y.max() >= num_classes:
    raise ValueError(
        f'{name_y} must be in [0, {num_classes}), got [{y.min()}, {y.max()}]'
    )


def linear_probe(
    train_x: jax.typing.ArrayLike,
    train_y: jax.typing.ArrayLike,
    test_x: jax.typing.ArrayLike,
    test_y: jax.typing.ArrayLike,
    *,
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 256,
    learning_rate: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> dict[str, float]:
  """Fits a softmax classifier on ``train_x`` and evaluates it on ``test_x``.

  .. math::
    \\min_{W, b} \\frac{1}{N} \\sum_i -\\log \\mathrm{softmax}(W^\\top
      \\tilde x_i + b)_{y_i} + \\frac{\\lambda}{2} \\lVert W \\rVert^2,
    \\quad \\tilde x = (x - \\mu_{train}) / \\sigma_{train}

  Each epoch visits ``N // batch_size`` shuffled mini-batches (the partial
  last batch is dropped; a different one every epoch).

  Args:
    train_x: ``[N, D]`` frozen training features.
    train_y: ``[N]`` int labels in ``[0, num_classes)``.
    test_x: ``[M, D]`` frozen test features.
    test_y: ``[M]`` int labels.
    num_classes: number of classes ``C``.
    epochs: passes over the training set.
    batch_size: examples per step (capped at ``N``).
    learning_rate: peak Adam learning rate, decayed to 0 by a cosine.
    weight_decay: the L2 coefficient ``lambda`` on ``W`` (not on ``b``).
    seed: seed of the mini-batch order.

  Returns:
    ``{'top1': test accuracy in [0, 1], 'loss': mean test cross-entropy,
    'train_top1': training accuracy}``.

  Raises:
    ValueError: on mismatched shapes, labels out of range, or non-positive
      ``num_classes``, ``epochs``, ``batch_size`` or ``learning_rate``.
  """
  train_x = np.asarray(_arrays.to_local(train_x), np.float32)
  train_y = np.asarray(_arrays.to_local(train_y))
  test_x = np.asarray(_arrays.to_local(test_x), np.float32)
  test_y = np.asarray(_arrays.to_local(test_y))
  for name, value in (
      ('num_classes', num_classes),
      ('epochs', epochs),
      ('batch_size', batch_size),
  ):
    if value < 1:
      raise ValueError(f'{name} must be >= 1, got {value}')
  if not learning_rate > 0:
    raise ValueError(f'learning_rate must be > 0, got {learning_rate}')
  _check('train_x', train_x, 'train_y', train_y, num_classes)
  _check('test_x', test_x, 'test_y', test_y, num_classes)
  if test_x.shape[1] != train_x.shape[1]:
    raise ValueError(
        f'train_x and test_x feature dims differ: {train_x.shape[1]} vs'
        f' {test_x.shape[1]}'
    )
  # Standardise with training statistics only; constant features become 0.
  mean = train_x.mean(axis=0)
  std = np.maximum(train_x.std(axis=0), 1e-6)
  standardize = lambda x: (x - mean) / std
  # One shuffled order per epoch, drawn on the host: jax.random.permutation
  # inside the jitted scan triples its compile time.
  n = train_x.shape[0]
  batch_size = min(batch_size, n)
  steps_per_epoch = n // batch_size
  rng = np.random.default_rng(seed)
  orders = np.stack(
      [
          rng.permutation(n)[: steps_per_epoch * batch_size]
          for _ in range(epochs)
      ]
  ).reshape(epochs * steps_per_epoch, batch_size)
  params = _fit(
      jnp.asarray(standardize(train_x)),
      jnp.asarray(train_y, jnp.int32),
      jnp.asarray(orders, jnp.int32),
      jnp.float32(learning_rate),
      jnp.float32(weight_decay),
      num_classes=num_classes,
  )
  test_loss, test_correct = _evaluate(
      params, jnp.asarray(standardize(test_x)), jnp.asarray(test_y, jnp.int32)
  )
  _, train_correct = _evaluate(
      params, jnp.asarray(standardize(train_x)), jnp.asarray(train_y, jnp.int32)
  )
  return {
      'top1': int(test_correct) / test_x.shape[0],
      'loss': float(test_loss),
      'train_top1': int(train_correct) / n,
  }


def _logits(params, x):
  return x @ params['w'] + params['b']


@jax.jit
def _evaluate(params, x, y):
  logits = _logits(params, x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  # A count, not a float32 mean: the accuracy is then exactly correct / n.
  return loss, jnp.sum(jnp.argmax(logits, axis=-1) == y)


@functools.partial(jax.jit, static_argnames='num_classes')
def _fit(x, y, batches, learning_rate, weight_decay, *, num_classes):
  """Trains (W, b); ``batches`` is ``[steps, batch]`` example indices."""
  dim = x.shape[1]
  schedule = optax.cosine_decay_schedule(1.0, decay_steps=batches.shape[0])
  # The peak rate is traced (no recompilation per value), so scale outside.
  tx = optax.chain(
      optax.scale_by_adam(),
      optax.scale_by_schedule(schedule),
      optax.scale(-learning_rate),
  )
  params = {'w': jnp.zeros((dim, num_classes)), 'b': jnp.zeros(num_classes)}

  def loss_fn(params, xb, yb):
    ce = optax.softmax_cross_entropy_with_integer_labels(
        _logits(params, xb), yb
    )
    return ce.mean() + 0.5 * weight_decay * jnp.sum(params['w'] ** 2)

  def step(carry, idx):  # idx: [batch_size] example indices
    params, opt_state = carry
    grads = jax.grad(loss_fn)(params, x[idx], y[idx])
    updates, opt_state = tx.update(grads, opt_state)
    return (optax.apply_updates(params, updates), opt_state), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), batches)
  return params
