"""The computation shared by the 1-process and the 2-process runs."""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from hnjax import losses
from hnjax import queue as queue_lib
from hnjax import samplers

# K / 8 = 32 rows per device and N = 24: each shard first proposes 18
# candidates per query (bank._proposals), the mixed rows are routed.
G, K, D = 16, 256, 8


def make_data():
  rng = np.random.default_rng(40)
  unit = lambda *s: (lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True))(
      rng.normal(size=s)).astype(np.float32)
  return dict(q=unit(G, D), k=unit(G, D), ids=np.arange(G, dtype=np.int32),
              first_keys=unit(G, D), first_ids=np.arange(G, 2 * G,
                                                          dtype=np.int32))


def queue_template(mesh):
  return queue_lib.init(jax.random.key(0), K, D,
                        sharding=NamedSharding(mesh, P('data')))


def _loss_body(q, k, ids, qkeys, qids):
  mask = samplers.same_id_mask(jax.lax.all_gather(ids, 'data', tiled=True),
                               qids)
  h = samplers.mochi(jax.random.key(1), q, qkeys, num_hard=24, num_mix=4,
                     num_query_mix=2, negative_mask=mask, axis_name='data')
  return losses.info_nce(q, k, qkeys, temperature=0.2, negative_mask=mask,
                         extra_negatives=h, axis_name='data')


def loss_and_grads(mesh, queue, batch):
  rows = P('data')
  f = jax.shard_map(_loss_body, mesh=mesh,
                    in_specs=(rows, rows, rows, rows, rows), out_specs=rows)
  f = jax.jit(f)
  loss = f(batch['q'], batch['k'], batch['ids'], queue.keys, queue.ids)
  # Global arrays are arguments, never closed over (multi-process rule).
  grads = jax.jit(jax.grad(
      lambda q, k, ids, qk, qi: jnp.mean(f(q, k, ids, qk, qi)), (0, 1)))(
          batch['q'], batch['k'], batch['ids'], queue.keys, queue.ids)
  return loss, grads


def enqueue(mesh, queue, batch):
  return queue_lib.make_enqueue(mesh)(queue, batch['k'], batch['ids'],
                                      batch['ids'])
