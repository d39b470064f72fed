"""Evaluators by name, as a config lists them (``eval.final='knn,linear'``).

Each evaluator takes the frozen features of some splits (from
`hnjax.eval.features`) and an options mapping (the run's ``config.eval``
plus dataset facts such as ``num_classes``) and returns named results;
scalars go to the logs and the summary, arrays (predictions) to the plots.

========== ============================ =======================================
name       splits                       results
========== ============================ =======================================
knn        train, test (``label``)      ``knn_top1``
linear     train, test (``label``)      ``linear_top1``
regression train, val, test (``target``) ``mae``, ``rmse``, ``pearson``,
                                        ``spearman``, ``gmean``, per shot
                                        group, ``predictions``
knn_mae    train, test (``target``)     ``knn_mae``: MAE of a cosine kNN
                                        regressor (a cheap training monitor)
========== ============================ =======================================
"""

from typing import Any, Callable, Mapping

import numpy as np

from hnjax import numerics
from hnjax.eval import knn as knn_lib
from hnjax.eval import linear as linear_lib
from hnjax.eval import regression as regression_lib

Splits = Mapping[str, Mapping[str, np.ndarray]]
Evaluator = Callable[[Splits, Mapping[str, Any]], dict[str, Any]]


def _knn(splits, options):
  train, test = splits['train'], splits['test']
  return {'knn_top1': knn_lib.knn_accuracy(
      test['features'], test['label'], train['features'], train['label'],
      num_classes=options['num_classes'], k=options['knn_k'],
      temperature=options['knn_temperature'])}


def _linear(splits, options):
  train, test = splits['train'], splits['test']
  res = linear_lib.linear_probe(
      train['features'], train['label'], test['features'], test['label'],
      num_classes=options['num_classes'], epochs=options['probe_epochs'],
      seed=options['seed'])
  return {'linear_top1': res['top1']}


def _regression(splits, options):
  train, val, test = splits['train'], splits['val'], splits['test']
  probe = regression_lib.linear_probe(
      train['features'], train['target'], val['features'], val['target'],
      test['features'], epochs=options['probe_epochs'],
      batch_size=options['probe_batch_size'],
      learning_rate=options['probe_learning_rate'], seed=options['seed'])
  out = regression_lib.metrics(
      probe['predictions'], test['target'], train_targets=train['target'],
      bin_width=options['bin_width'])
  # An empty shot group has no MAE: leave it out rather than log NaN.
  out = {k: v for k, v in out.items()
         if not (k.startswith(('mae_', 'gmean_')) and np.isnan(v))}
  out.update(probe_best_epoch=probe['best_epoch'],
             predictions=probe['predictions'])
  return out


def _knn_mae(splits, options):
  """MAE of predicting each test target by its k nearest training targets."""
  train, test = splits['train'], splits['test']
  bank = np.asarray(numerics.l2_normalize(train['features']))
  query = np.asarray(numerics.l2_normalize(test['features']))
  k = min(int(options['knn_k']), bank.shape[0])
  errors = []
  for start in range(0, query.shape[0], 512):
    sims = query[start:start + 512] @ bank.T
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    pred = train['target'][top].mean(axis=1)
    errors.append(np.abs(pred - test['target'][start:start + 512]))
  return {'knn_mae': float(np.mean(np.concatenate(errors)))}


_EVALUATORS: dict[str, tuple[Evaluator, tuple[str, ...]]] = {
    'knn': (_knn, ('train', 'test')),
    'linear': (_linear, ('train', 'test')),
    'regression': (_regression, ('train', 'val', 'test')),
    'knn_mae': (_knn_mae, ('train', 'test')),
}
NAMES = tuple(_EVALUATORS)


def parse(names: str) -> tuple[str, ...]:
  """``'knn, linear'`` -> ``('knn', 'linear')``; raises on unknown names."""
  out = tuple(n.strip() for n in names.split(',') if n.strip())
  unknown = [n for n in out if n not in _EVALUATORS]
  if unknown:
    raise ValueError(f'unknown evaluator(s) {unknown}; known: {NAMES}')
  return out


def splits_needed(names: tuple[str, ...]) -> tuple[str, ...]:
  """The splits the named evaluators read, in train/val/test order."""
  need = {s for n in names for s in _EVALUATORS[n][1]}
  return tuple(s for s in ('train', 'val', 'test') if s in need)


def run(names: tuple[str, ...], splits: Splits,
        options: Mapping[str, Any]) -> dict[str, Any]:
  """Runs the named evaluators on features and merges their results.

  Args:
    names: evaluator names (see the module docstring).
    splits: ``{split: {'features': [n, F], 'label' or 'target': [n]}}``.
    options: evaluator options (``knn_k``, ``knn_temperature``,
      ``probe_epochs``, ``num_classes``, ``seed``, ...).

  Returns:
    The union of the evaluators' results.
  """
  out = {}
  for name in names:
    out.update(_EVALUATORS[name][0](splits, options))
  return out
