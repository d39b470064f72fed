"""PyTorch peer: CLIP + m²-mix (+ m³-mix) as the authors' ``main.py`` computes it.

Source followed: changdaeoh/multimodal-mixup ``main.py`` (``sph_inter``, the
``do_train`` loss block, ``clip_loss`` / ``clip_loss2`` of ``loss.py``) as
ALGORITHMS.md §5 transcribes it; written from that reading, not copied. On
unit-norm image and text features ``v``, ``t`` [B, D]:

  clip   = ½[CE(v tᵀ/τ, I) + CE(t vᵀ/τ, I)]                    (τ = 0.01)
  λ      ~ numpy Beta(β₂, β₂)
  m      = sph_inter(v, t, λ) = sin(λθ)/sin θ · v + sin((1-λ)θ)/sin θ · t
  L_img  = (v tᵀ ⊙ I + v mᵀ ⊙ (1 - I)) / τ₂,  L_txt the same with t
  m2     = CE(L_img, I) + CE(L_txt, I)                          (τ₂ = 0.07)
  total  = clip + w · m2 / (epoch + 1)                          (epoch 0)

and for ``m3=True`` the V-, L- and VL-mix terms with the flipped partner
(soft targets λI + (1-λ)J, I + J; ``calc_mix_loss``). Eager PyTorch on the
CPU, float32, ``torch.set_num_threads(2)``; fwd + bwd w.r.t. both feature
matrices (leaf tensors). Memory: the peak resident memory growth during
the first step of a fresh process (Linux VmHWM).
"""

import resource
import time

import numpy as np
import torch
import torch.nn.functional as F

NUM_THREADS = 2


def sph_inter(a, b, s):
  theta = torch.acos((a * b).sum(dim=1)).view(a.shape[0], 1)
  n1 = torch.sin(s * theta) / torch.sin(theta) * a
  n2 = torch.sin((1 - s) * theta) / torch.sin(theta) * b
  return n1 + n2


def clip_loss(logits_per_image, logits_per_text):
  labels = torch.arange(logits_per_image.shape[0])
  return (F.cross_entropy(logits_per_image, labels) +
          F.cross_entropy(logits_per_text, labels)) / 2


def clip_loss2(logits_img, logits_txt):
  labels = torch.arange(logits_img.shape[0])
  return F.cross_entropy(logits_img, labels) + F.cross_entropy(logits_txt,
                                                               labels)


def soft_clip_loss(logits, targets):
  """Mean over rows and columns of the soft cross-entropy (calc_mix_loss)."""
  row = -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
  col = -(targets.t() * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
  return (row + col) / 2


def loss_fn(v, t, lam, lam3, *, tau=0.01, tau2=0.07, w=0.01, m2=True,
            m3=False, weights=(0.05, 0.05, 0.1)):
  logits = v @ t.t() / tau
  loss = clip_loss(logits, logits.t())
  if not m2:
    return loss
  eye = torch.eye(v.shape[0])
  mixed = sph_inter(v, t, lam)
  base = v @ t.t()
  logits_img = (base * eye + (v @ mixed.t()) * (1 - eye)) / tau2
  logits_txt = (base.t() * eye + (t @ mixed.t()) * (1 - eye)) / tau2
  mix = w * clip_loss2(logits_img, logits_txt)
  if m3:
    flip = torch.flip(eye, dims=[0])
    v_hat = sph_inter(v, torch.flip(v, dims=[0]), lam3)
    t_hat = sph_inter(t, torch.flip(t, dims=[0]), lam3)
    soft = lam3 * eye + (1 - lam3) * flip
    mix = mix + weights[0] * soft_clip_loss(v_hat @ t.t() / tau, soft)
    mix = mix + weights[1] * soft_clip_loss(v @ t_hat.t() / tau, soft)
    mix = mix + weights[2] * soft_clip_loss(v_hat @ t_hat.t() / tau,
                                            eye + flip)
  return loss + mix  # epoch 0: the mixing weight is not decayed yet


def _inputs(b, d, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, b, d)).astype(np.float32)
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  return (torch.tensor(x[0], requires_grad=True),
          torch.tensor(x[1], requires_grad=True))


def loss_value(b, d, seed, lam, lam3, **kw):
  """The loss on ``_inputs(b, d, seed)`` (for the agreement check)."""
  v, t = _inputs(b, d, seed)
  return float(loss_fn(v, t, torch.tensor(lam), torch.tensor(lam3), **kw))


def time_loss(b, d, iters, *, m2=True, m3=False, seed=0, warmup=2):
  """Median / min ms of fwd+bwd at batch ``b``, and the peak memory."""
  torch.set_num_threads(NUM_THREADS)
  v, t = _inputs(b, d, seed)
  rng = np.random.default_rng(seed)

  def step():
    lam = torch.tensor(rng.beta(0.5, 0.5), dtype=torch.float32)
    lam3 = torch.tensor(rng.beta(0.5, 0.5), dtype=torch.float32)
    v.grad = t.grad = None
    loss_fn(v, t, lam, lam3, m2=m2, m3=m3).backward()

  peak = _peak_mb(step)  # the first step: nothing cached by the allocator
  for _ in range(warmup):
    step()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    step()
    times.append(1e3 * (time.perf_counter() - t0))
  return dict(median_ms=float(np.median(times)), min_ms=float(np.min(times)),
              peak_mb=peak)


def _status_kb(field):
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1])
  raise KeyError(field)


def _peak_mb(step):
  """Peak resident memory growth of one ``step()`` (Linux: VmHWM reset by
  /proc/self/clear_refs; elsewhere the ru_maxrss growth, a lower bound)."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    before = _status_kb('VmRSS')
    step()
    return (_status_kb('VmHWM') - before) / 1024
  except OSError:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
