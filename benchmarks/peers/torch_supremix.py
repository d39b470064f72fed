"""PyTorch peer: the SupReMix loss as the authors' AgeDB-DIR code computes it.

Command (peer venv, see README.md in this folder):

  /work/torchvenv/bin/python benchmarks/peers/torch_supremix.py \
      --N 256 512 --D 128 --iters 3

Source followed: Dingyijiang1/Mixup-Your-Own-Pairs (HEAD d6152e0),
``agedb-dir/train_supremix.py`` (``mixing_func`` and the train-loop glue),
``agedb-dir/utils.py`` (``calculate_alpha_vectorized``, ``compress_mixtures``)
and ``agedb-dir/supremix_loss.py`` (``SupConLoss_v2.calculate_weight`` and
``forward``), method ``supremix`` (both mixture kinds), ``--n 5``,
``--beta 0`` (Beta(2, 8)), ``--distance L1_inv``, ``use_weight`` True,
``temperature = base_temperature = T``, one sub-batch (``--pool 1``). The code
here is written from reading theirs, not copied. With N = 2B views, features
``f`` [B, 2, D] (unit rows), ``z = cat([f[:, 0], f[:, 1]])`` [N, D] and labels
``y = cat([y_b, y_b])`` [N], one step is:

  mixing_func (under no_grad, on z.detach(); their mixtures are detached too):
    mixtures = zeros(N, N, N, D)     <- the [N, N, N, D] materialisation
    labels3  = zeros(N, N, N); mask3 = -ones(N, N, N)
    neg triples (i, i, k): k != i and y_k != y_i                -> mask3 = 0
    pos triples (i, j, k): y_j < y_i < y_k, both gaps < window   -> mask3 = 1
    neg: one Beta(2, 8) draw a per triple, in nonzero (row-major) order;
         mixture a*z_i + (1-a)*z_k, label a*y_i + (1-a)*y_k
    pos: a = clamp((y_k - y_i) / clamp(y_k - y_j, 1e-9), 0, 1);
         mixture a*z_j + (1-a)*z_k, label y_i
  compress_mixtures, per anchor row over the N^2 flat columns c = j*N + k:
    sort the mask row (-1 -> -inf) ascending; keep the last M columns
    (M = max number of valid mixtures of any row); gather those mixtures;
    invalid slots become all-(-1) vectors; the labels are cast to float32 and
    sorted BY VALUE on their own (not with the mask permutation), last M kept
  SupConLoss_v2:
    real logits  z z^T / T minus their row max (self included), mask y_a == y_i
                 (a != i), self excluded from the denominator
    mixture logits <mixture[i, m], z_i> / T (bmm) minus their own row max
                 (padding columns included), mask = compressed mask3 (1 pos,
                 0 neg, -1 excluded)
    one log-sum-exp over both blocks, every denominator term weighted by
    |y_i - label| + 1 (L1_inv; mixture columns use the value-sorted labels);
    loss = mean over the N anchors of -mean(log_prob over mask == 1)
  loss.backward()   (gradient w.r.t. f: real pairs + the anchor side of the
                     mixture logits)

Deviations from the authors' code, none of which changes the math:
- The mask rows are sorted with ``torch.sort(..., stable=True)``. The authors'
  ``torch.sort`` is not stable (CPU: ``std::sort``), which changes which
  mixture is paired with which value-sorted DM label among ties; on small
  batches that moves the loss by about 1e-3 relative. It does not matter for
  timing, and the stable order is the one hnjax is pinned to.
- The mixtures are built under ``no_grad`` from ``z.detach()`` instead of
  being built with autograd recording and detached afterwards (same values,
  same forward work, no graph that is thrown away).
- The positive mixtures are filled in one vectorised pass instead of their
  Python loop over chunks of 1000 triples (same values).
- Their forward also computes two diagnostic similarities with ``.item()``.
  They are computed here too, so they are timed, but ``supremix_loss``
  returns them only with ``diagnostics=True``.

Timing: ``torch.set_num_threads(2)`` (``--threads`` or ``threads=`` changes
it), float32, ``warmup`` untimed steps, then ``iters`` timed steps with
``time.perf_counter``; median and min in ms. Timed:
everything above (mixing_func, compress_mixtures, the loss, backward) and
clearing ``f.grad``. Not timed: creating the inputs (the same NumPy batch as
benchmarks/supremix.py: ``default_rng(seed)``, normal z normalised, then
``y_b = integers(0, 100, B)``). If the float32 [N, N, N, D] tensor alone
would exceed ``max_gb`` (1e9 bytes), the size is not run and the result says
``skipped``. N = 256 needs 8.6 GB; N = 512 needs 68.7 GB.

Memory (``peak_mb``): a fresh subprocess builds the inputs and runs one
warm-up step; the kernel's peak-RSS counter is then reset (``echo 5 >
/proc/self/clear_refs``) and one more step runs; ``peak_mb`` is VmHWM after it
minus VmRSS before it, in MiB. If the reset is not permitted, the
``resource.getrusage`` ru_maxrss delta is used instead (it can only
under-report); ``mem_method`` says which.

``time_supcon`` times plain SupCon (HobbitLong/SupContrast ``losses.py``,
``contrast_mode='all'``, positives = exact label equality, no mixtures, no
weights, ``base_temperature = temperature``) on the same batch, for reference.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

NUM_THREADS = 2

# authors_supremix_loss(..., tie_order='stable') on the batch of
# check_against_numpy (the batch of tests/losses_supervised_test.py's
# test_authors_reference_against_their_torch_run), T = 0.5, window 5,
# L1_inv; keys are (mix_neg, mix_pos).
PINNED_STABLE = {
    (True, True): 5.015722242013150,
    (True, False): 6.144259091996712,
    (False, True): 6.262287649577016,
}


# ---------------------------------------------------------------------------
# mixing_func + compress_mixtures
# ---------------------------------------------------------------------------
def build_mixtures(z, y, *, window=5, mix_neg=True, mix_pos=True,
                   beta=(2.0, 8.0), alpha_neg=None):
  """The authors' mixing_func then compress_mixtures, on detached inputs.

  Args:
    z: [N, D] features, rows 0..B-1 view 0, B..2B-1 view 1.
    y: [N] labels (= y_b repeated).
    window: their ``--n`` (strict ``<``).
    mix_neg, mix_pos: which kinds are filled. Both kinds are marked in the
      mask either way; an unfilled kind keeps zero vectors and label 0.
    beta: Beta parameters of the anchor weight of the negative mixtures.
    alpha_neg: optional [N, N]; if given, alpha_neg[i, k] replaces the Beta
      draw of negative triple (i, i, k) (used by the self-check).

  Returns:
    (mixtures [N, M, D], mask [N, M] in {-1, 0, 1}, labels [N, M] float32).
  """
  with torch.no_grad():
    z = z.detach()
    n, d = z.shape
    # mixing_func: the full [N, N, N, D] tensor, labels and mask.
    mixtures = torch.zeros((n, n, n, d), dtype=z.dtype)
    labels3 = torch.zeros((n, n, n), dtype=z.dtype)
    mask3 = torch.zeros((n, n, n)) - 1
    ar = torch.arange(n)
    ii, jj, kk = ar.view(-1, 1, 1), ar.view(1, -1, 1), ar.view(1, 1, -1)
    yi, yj, yk = y.view(-1, 1, 1), y.view(1, -1, 1), y.view(1, 1, -1)
    neg_cond = (ii == jj) & (ii != kk) & (yj != yk)
    mask3[neg_cond] = 0
    pos_cond = ((yi < yk) & ((yi - yk).abs() < window)
                & (yj < yi) & ((yj - yi).abs() < window))
    mask3[pos_cond] = 1
    if mix_neg:
      ti, tj, tk = torch.nonzero(mask3 == 0).t()   # row-major order
      if alpha_neg is None:
        dist = torch.distributions.Beta(float(beta[0]), float(beta[1]))
        a = dist.sample((ti.shape[0],)).to(z.dtype)
      else:
        a = alpha_neg.to(z.dtype)[ti, tk]
      a = a.view(-1, 1)
      mixtures[ti, tj, tk] = a * z[tj] + (1 - a) * z[tk]
      labels3[ti, tj, tk] = a[:, 0] * y[tj] + (1 - a[:, 0]) * y[tk]
    if mix_pos:
      ti, tj, tk = torch.nonzero(mask3 == 1).t()
      a = (y[tk] - y[ti]) / torch.clamp(y[tk] - y[tj], min=1e-9)
      a = torch.clamp(a, 0, 1).to(z.dtype).view(-1, 1)
      mixtures[ti, tj, tk] = a * z[tj] + (1 - a) * z[tk]
      labels3[ti, tj, tk] = y[ti].to(z.dtype)

    # rearrange 'b n m ... -> b (n m) ...' (views of contiguous tensors).
    mix_flat = mixtures.view(n, n * n, d)
    mask = mask3.view(n, n * n).float()
    lab = labels3.view(n, n * n)

    # compress_mixtures
    invalid = mask == -1
    key = mask.masked_fill(invalid, float('-inf'))
    s_mask, index = torch.sort(key, dim=1, stable=True)
    s_invalid = s_mask == float('-inf')
    new_mask = s_mask.masked_fill(s_invalid, -1)
    index = index.masked_fill(s_invalid, 0)
    keep_mask = ~(new_mask == -1).all(dim=0)
    keep_index = ~(index == 0).all(dim=0)
    new_mask = new_mask[:, keep_mask]
    index = index[:, keep_index]
    if new_mask.shape[1] == 0:
      raise ValueError('no valid mixture in the batch (the authors\' code '
                       'fails here too: max over an empty dimension)')
    new_mix = mix_flat.gather(1, index.unsqueeze(-1).expand(-1, -1, d))
    new_mix = new_mix.masked_fill(~(index.unsqueeze(-1) != 0), -1)
    lab = lab.float()                        # their `.float()` (float32)
    lab_key = lab.masked_fill(lab == -1, float('-inf'))
    s_lab, _ = torch.sort(lab_key, dim=1)    # by value, independently
    new_lab = s_lab.masked_fill(s_lab == float('-inf'), -1)[:, keep_mask]
    del mixtures, mix_flat                   # the [N, N, N, D] tensor
  return new_mix, new_mask, new_lab


# ---------------------------------------------------------------------------
# SupConLoss_v2.forward (mixture branch)
# ---------------------------------------------------------------------------
def _dm_weight(anchor, other, distance, mixture_block):
  d = anchor - other
  if distance == 'L1':
    return torch.reciprocal(d.abs() + 1)
  if distance == 'L2':
    return torch.reciprocal(d.pow(2) + 1)
  if distance == 'L1_inv':
    return d.abs() + 1
  if distance == 'L2_inv':  # their mixture branch squares (d + 1)
    return (d + 1).pow(2) + 1 if mixture_block else d.pow(2) + 1
  raise ValueError(f'unknown distance {distance!r}')


def supremix_loss(features, labels, mixtures, myop_mask, myop_label, *,
                  temperature=0.5, distance='L1_inv', use_weight=True,
                  diagnostics=False):
  """SupConLoss_v2 with mixtures, temperature = base_temperature.

  features [B, 2, D] (grad flows here), labels [B]; mixtures [N, M, D],
  myop_mask [N, M], myop_label [N, M] from build_mixtures. Returns the scalar
  loss (and the two diagnostic similarities if ``diagnostics``).
  """
  b = features.shape[0]
  z = torch.cat(torch.unbind(features, dim=1), dim=0)        # [N, D]
  n = z.shape[0]
  y = labels.reshape(-1).repeat(2)                            # [N]
  t = temperature
  # real block
  mask = (y.view(-1, 1) == y.view(1, -1)).to(z.dtype)
  adc = torch.matmul(z, z.T) / t
  logits_max, _ = torch.max(adc, dim=1, keepdim=True)
  logits = adc - logits_max.detach()
  logits_mask = torch.scatter(torch.ones_like(mask), 1,
                              torch.arange(n).view(-1, 1), 0)
  mask = mask * logits_mask
  # mixture block (anchor side carries the gradient, mixtures are constants)
  adm = torch.bmm(mixtures, z.unsqueeze(2)).squeeze(2) / t
  max_val, _ = torch.max(adm, dim=1, keepdim=True)
  mix_logits = adm - max_val.detach()
  logits = torch.cat([logits, mix_logits], dim=1)
  mask = torch.cat([mask, myop_mask.to(z.dtype)], dim=1)
  logits_mask = torch.cat(
      [logits_mask, torch.where(myop_mask != -1, 1, 0).to(z.dtype)], dim=1)
  exp_logits = torch.exp(logits) * logits_mask
  if use_weight:
    w = torch.cat([_dm_weight(y.view(-1, 1), y.view(1, -1), distance, False),
                   _dm_weight(y.view(-1, 1), myop_label, distance, True)],
                  dim=1)
    exp_logits = exp_logits * w
  log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
  pos = mask == 1
  mean_log_prob_pos = (pos * log_prob).sum(1) / pos.sum(1)
  # their forward's diagnostics (computed every call, hence timed)
  p_sim = ((pos * torch.exp(logits)).sum(1) / pos.sum(1)).mean().item()
  neg = mask == 0
  n_sim = ((neg * torch.exp(logits)).sum(1) / neg.sum(1)).mean().item()
  loss = (-(t / t) * mean_log_prob_pos).view(2, b).mean()
  return (loss, p_sim, n_sim) if diagnostics else loss


def supremix_step(features, labels, *, temperature=0.5, window=5,
                  mix_neg=True, mix_pos=True, distance='L1_inv',
                  alpha_neg=None):
  """One fwd+bwd: mixing_func, compress_mixtures, SupConLoss_v2, backward."""
  b = features.shape[0]
  y = labels.reshape(-1).repeat(2)
  z = torch.cat([features[:, 0], features[:, 1]], dim=0)
  mix, mmask, mlab = build_mixtures(z, y, window=window, mix_neg=mix_neg,
                                    mix_pos=mix_pos, alpha_neg=alpha_neg)
  assert mix.shape[0] == 2 * b
  loss = supremix_loss(features, labels, mix, mmask, mlab,
                       temperature=temperature, distance=distance)
  loss.backward()
  return loss


# ---------------------------------------------------------------------------
# SupCon (HobbitLong/SupContrast losses.py, contrast_mode='all')
# ---------------------------------------------------------------------------
def supcon_loss(features, labels, *, temperature=0.5, base_temperature=None):
  base_temperature = temperature if base_temperature is None else (
      base_temperature)
  b, views = features.shape[:2]
  labels = labels.contiguous().view(-1, 1)
  mask = torch.eq(labels, labels.T).to(features.dtype)
  contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
  adc = torch.matmul(contrast, contrast.T) / temperature
  logits_max, _ = torch.max(adc, dim=1, keepdim=True)
  logits = adc - logits_max.detach()
  mask = mask.repeat(views, views)
  logits_mask = torch.scatter(torch.ones_like(mask), 1,
                              torch.arange(b * views).view(-1, 1), 0)
  mask = mask * logits_mask
  exp_logits = torch.exp(logits) * logits_mask
  log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
  mask_pos_pairs = mask.sum(1)
  mask_pos_pairs = torch.where(mask_pos_pairs < 1e-6, 1, mask_pos_pairs)
  mean_log_prob_pos = (mask * log_prob).sum(1) / mask_pos_pairs
  loss = -(temperature / base_temperature) * mean_log_prob_pos
  return loss.view(views, b).mean()


# ---------------------------------------------------------------------------
# inputs, timing, memory
# ---------------------------------------------------------------------------
def make_inputs(n, d, seed=0, dtype=torch.float32):
  """The batch of benchmarks/supremix.py: features [B, 2, D] leaf, labels [B].

  z = normalize(rng.normal((N, D))) with rows 0..B-1 = view 0, then
  y_b = rng.integers(0, 100, B) (the two views share y_b).
  """
  if n % 2:
    raise ValueError('N = 2B must be even')
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, d))
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  yb = rng.integers(0, 100, n // 2).astype(np.float64)
  b = n // 2
  f = np.stack([z[:b], z[b:]], axis=1)
  features = torch.tensor(f, dtype=dtype, requires_grad=True)
  labels = torch.tensor(yb, dtype=dtype)
  return features, labels


def mixture_gb(n, d):
  """Size of the float32 [N, N, N, D] mixtures tensor in GB (1e9 bytes)."""
  return n ** 3 * d * 4 / 1e9


def _step_fn(kind, n, d, temperature=0.5, window=5, seed=0):
  features, labels = make_inputs(n, d, seed)
  torch.manual_seed(seed)
  out = {}
  if kind == 'supremix':
    def step():
      out['loss'] = supremix_step(features, labels, temperature=temperature,
                                  window=window).item()
      features.grad = None
  elif kind == 'supcon':
    def step():
      loss = supcon_loss(features, labels, temperature=temperature)
      loss.backward()
      out['loss'] = loss.item()
      features.grad = None
  else:
    raise ValueError(f'unknown kind {kind!r}')
  return step, out


def _time(step, iters, warmup):
  for _ in range(warmup):
    step()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    step()
    times.append((time.perf_counter() - t0) * 1e3)
  return dict(median_ms=statistics.median(times), min_ms=min(times),
              times_ms=times)


def _status_kb(field):
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1])
  raise KeyError(field)


def _mem_worker(spec):
  """Runs in a fresh process: peak extra RSS (MiB) of one warmed-up step."""
  torch.set_num_threads(spec.pop('threads', NUM_THREADS))
  step, _ = _step_fn(**spec)
  step()  # warm-up: one-time allocations and lazy init are not counted
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')  # reset VmHWM to the current RSS
    before = _status_kb('VmRSS')
    step()
    delta_kb = _status_kb('VmHWM') - before
    method = 'vmhwm'
  except OSError:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    delta_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    method = 'maxrss'
  return dict(peak_mb=delta_kb / 1024, mem_method=method)


def _measure_mem(spec):
  out = subprocess.run(
      [sys.executable, os.path.abspath(__file__), '--_mem_worker',
       json.dumps(spec)], check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def time_supremix(n, d, iters, *, temperature=0.5, window=5, seed=0,
                  max_gb=12.0, warmup=1, memory=True, threads=None):
  """Times the authors' SupReMix fwd+bwd at N = n views.

  Returns dict(median_ms, min_ms, times_ms, loss, peak_mb, mem_method,
  mixture_gb), or dict(skipped=..., mixture_gb) if the [N, N, N, D] float32
  tensor needs more than ``max_gb`` GB.
  """
  gb = mixture_gb(n, d)
  if gb > max_gb:
    return dict(skipped=f'needs {gb:.1f} GB for the [N,N,N,D] mixtures',
                mixture_gb=gb)
  threads = NUM_THREADS if threads is None else threads
  torch.set_num_threads(threads)
  spec = dict(kind='supremix', n=n, d=d, temperature=temperature,
              window=window, seed=seed)
  step, last = _step_fn(**spec)
  out = _time(step, iters, warmup)
  out['loss'] = last['loss']
  out['mixture_gb'] = gb
  del step, last
  if memory:
    out.update(_measure_mem(dict(spec, threads=threads)))
  return out


def time_supcon(n, d, iters, *, temperature=0.5, seed=0, warmup=3,
                threads=None):
  """Times plain SupCon fwd+bwd at N = n views; dict(median_ms, min_ms, ...)."""
  torch.set_num_threads(NUM_THREADS if threads is None else threads)
  step, last = _step_fn('supcon', n, d, temperature=temperature, seed=seed)
  out = _time(step, iters, warmup)
  out['loss'] = last['loss']
  return out


# ---------------------------------------------------------------------------
# self-check
# ---------------------------------------------------------------------------
def check_against_numpy(tol=1e-9):
  """float64 loss on the tests' N = 12 batch vs the pinned NumPy values.

  Batch (authors_supremix.md §2): rng = default_rng(0); y_b =
  rng.integers(20, 30, 6); z = normalize(rng.normal((12, 8))); alpha =
  rng.beta(2, 8, (12, 12)) used as the negative-mixture draws; T = 0.5,
  window 5, L1_inv; stable tie order. Raises AssertionError on a mismatch.
  """
  rng = np.random.default_rng(0)
  b, d = 6, 8
  yb = rng.integers(20, 30, size=b).astype(np.float64)
  z = rng.normal(size=(2 * b, d))
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  alpha = rng.beta(2.0, 8.0, size=(2 * b, 2 * b))
  labels = torch.tensor(yb, dtype=torch.float64)
  alpha_t = torch.tensor(alpha, dtype=torch.float64)
  got = {}
  for flags, want in PINNED_STABLE.items():
    features = torch.tensor(np.stack([z[:b], z[b:]], axis=1),
                            dtype=torch.float64, requires_grad=True)
    loss = supremix_step(features, labels, temperature=0.5, window=5,
                         mix_neg=flags[0], mix_pos=flags[1],
                         alpha_neg=alpha_t)
    got[flags] = loss.item()
    assert abs(got[flags] - want) <= tol, (flags, got[flags], want)
    g = features.grad
    assert g is not None and bool(torch.isfinite(g).all()), flags
  return got


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--N', type=int, nargs='+', default=[256, 512, 1024],
                 help='views per batch, 2B (default: 256 512 1024)')
  p.add_argument('--D', type=int, default=128)
  p.add_argument('--T', type=float, default=0.5)
  p.add_argument('--window', type=float, default=5)
  p.add_argument('--iters', type=int, default=3)
  p.add_argument('--max_gb', type=float, default=12.0,
                 help='skip N whose [N, N, N, D] float32 tensor is larger')
  p.add_argument('--no_memory', action='store_true')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--threads', type=int, default=NUM_THREADS,
                 help='torch.set_num_threads (default 2)')
  p.add_argument('--json', default='', help='also write the rows here')
  p.add_argument('--_mem_worker', default=None, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a._mem_worker is not None:
    print(json.dumps(_mem_worker(json.loads(a._mem_worker))))
    return

  torch.set_num_threads(a.threads)
  got = check_against_numpy()
  print('check_against_numpy: ok ' + ', '.join(
      f'{k}: {v:.15f}' for k, v in got.items()))
  print(f'torch {torch.__version__}, threads {torch.get_num_threads()}, '
        f'float32, D={a.D} T={a.T} window={a.window} Beta(2, 8) L1_inv, '
        f'iters {a.iters}; fwd+bwd w.r.t. the features; ms median (min); '
        'MB = peak extra RSS of one step')
  rows = []
  for n in a.N:
    sm = time_supremix(n, a.D, a.iters, temperature=a.T, window=a.window,
                       seed=a.seed, max_gb=a.max_gb,
                       memory=not a.no_memory, threads=a.threads)
    sc = time_supcon(n, a.D, a.iters, temperature=a.T, seed=a.seed,
                     threads=a.threads)
    rows.append(dict(N=n, supremix=sm, supcon=sc))
    if 'skipped' in sm:
      smtxt = f"skipped: {sm['skipped']}"
    else:
      mb = sm.get('peak_mb')
      smtxt = (f"{sm['median_ms']:.0f} ({sm['min_ms']:.0f}) ms, "
               f"{'-' if mb is None else f'{mb:.0f}'} MB, "
               f"loss {sm['loss']:.6f}")
    print(f"N={n}: SupReMix {smtxt} | SupCon {sc['median_ms']:.2f} "
          f"({sc['min_ms']:.2f}) ms", flush=True)
  if a.json:
    with open(a.json, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
