"""PyTorch peer: CLIP + m²-mix (+ m³-mix) as the authors' ``main.py`` computes it.

Source followed: changdaeoh/multimodal-mixup ``main.py`` (``sph_inter`` and
the loss block of ``do_train``) and ``loss.py`` (``cross_entropy`` with dense
targets, ``clip_loss``, ``clip_loss2``, ``calc_mix_loss``), as ALGORITHMS.md §5
transcribes them; written from that reading, not copied. On unit-norm image
and text features ``v``, ``t`` [B, D], with I = eye(B), J = flip(I):

  clip   = clip_loss(v tᵀ/τ, I) = ½[CE(v tᵀ/τ, I) + CE(t vᵀ/τ, I)]     (τ = 0.01)
  vmix   = calc_mix_loss(sph_inter(v, flip(v), λ₁) tᵀ/τ, λ₁)   (λ₁I + (1-λ₁)J)
  lmix   = calc_mix_loss(v sph_inter(t, flip(t), λ₂)ᵀ/τ, λ₂)
  vlmix  = clip_loss(v̂ t̂ᵀ/τ, I + J)                  (v̂, t̂ mixed with λ₃)
  m      = sph_inter(v, t, λ₄) = sin(λθ)/sin θ · v + sin((1-λ)θ)/sin θ · t
  m2     = clip_loss2((v tᵀ ⊙ I + v mᵀ ⊙ (1-I))/τ₂, I, (t vᵀ ⊙ I + t mᵀ ⊙ (1-I))/τ₂, I)
  total  = clip + (0.05 vmix + 0.05 lmix + 0.1 vlmix + 0.01 m2) / (epoch + 1)

(τ₂ = 0.07, ``--sep_scale``; the m³ terms only with ``m3=True``, the m² term
only with ``m2=True``; epoch 0). Each term draws its own λ, as the authors'
code does (they use ``random.betavariate`` and cast λ to fp16; here numpy
``Beta(0.5, 0.5)`` in float32). Eager PyTorch on the CPU, float32,
``torch.set_num_threads(2)``; fwd + bwd w.r.t. both feature matrices (leaf
tensors). Memory: the peak resident memory growth during the first step of a
fresh process (Linux VmHWM).
"""

import resource

import numpy as np
import torch

from benchmarks.peers import torch_negatives  # timing and /proc helpers

NUM_THREADS = 2
WEIGHTS = dict(vmix=0.05, lmix=0.05, vlmix=0.1, mmmix=0.01)


def sph_inter(a, b, s):
  theta = torch.acos((a * b).sum(dim=[1])).view(a.shape[0], 1)
  n1 = torch.sin(s * theta) / torch.sin(theta) * a
  n2 = torch.sin((1 - s) * theta) / torch.sin(theta) * b
  return n1 + n2


def cross_entropy(preds, targets):
  return (-targets * torch.log_softmax(preds, dim=-1)).sum(1)


def clip_loss(logits, targets):
  img_loss = cross_entropy(logits, targets)
  txt_loss = cross_entropy(logits.T, targets.T)
  return ((img_loss + txt_loss) / 2.0).mean()


def clip_loss2(logits1, targets, logits2, targets2):
  del targets2  # their code scores logits2 against `targets` too
  return (cross_entropy(logits1, targets).mean() +
          cross_entropy(logits2, targets).mean())


def calc_mix_loss(logits_mix, lamb):
  eye = torch.eye(logits_mix.shape[0])
  return clip_loss(logits_mix, eye * lamb + (1 - lamb) * torch.flip(
      eye, dims=[0]))


def loss_fn(v, t, lams, *, m2=True, m3=False, tau=0.01, tau2=0.07, epoch=0):
  """The ``do_train`` loss; ``lams`` maps vmix/lmix/vlmix/mmmix to λ."""
  temperature1, temperature2 = 1.0 / tau, 1.0 / tau2
  logits_per_image = v @ t.T
  logits_per_text = logits_per_image.T
  eye = torch.eye(v.shape[0])
  flip, off = torch.flip(eye, dims=[0]), 1 - eye
  loss = clip_loss(logits_per_image * temperature1, eye)
  loss_mix = torch.zeros([])
  if m3:
    lamb = lams['vmix']
    pos1 = sph_inter(v, torch.flip(v, dims=[0]), lamb)
    loss_mix += WEIGHTS['vmix'] * calc_mix_loss(pos1 @ t.T * temperature1,
                                                lamb)
    lamb = lams['lmix']
    pos1 = sph_inter(t, torch.flip(t, dims=[0]), lamb)
    loss_mix += WEIGHTS['lmix'] * calc_mix_loss(v @ pos1.T * temperature1,
                                                lamb)
    lamb = lams['vlmix']
    v_mixed = sph_inter(v, torch.flip(v, dims=[0]), lamb)
    t_mixed = sph_inter(t, torch.flip(t, dims=[0]), lamb)
    loss_mix += WEIGHTS['vlmix'] * clip_loss(
        v_mixed @ t_mixed.T * temperature1, eye + flip)
  if m2:
    neg1 = sph_inter(v, t, lams['mmmix'])
    logits_per_image2 = logits_per_image * eye + (v @ neg1.T) * off
    logits_per_text2 = logits_per_text * eye + (t @ neg1.T) * off
    loss_mix += WEIGHTS['mmmix'] * clip_loss2(
        logits_per_image2 * temperature2, eye,
        logits_per_text2 * temperature2, eye)
  return loss + loss_mix / (epoch + 1)  # their --schedule


def _inputs(b, d, seed):
  # The same arrays as benchmarks/clip.py's embeddings().
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, b, d)).astype(np.float32)
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  return (torch.tensor(x[0], requires_grad=True),
          torch.tensor(x[1], requires_grad=True))


def _lams(values):
  return {k: torch.tensor(x, dtype=torch.float32)
          for k, x in zip(('vmix', 'lmix', 'vlmix', 'mmmix'), values)}


def loss_value(b, d, seed, lams, **kw):
  """The loss on ``_inputs(b, d, seed)`` with the λs (vmix, lmix, vlmix,
  mmmix) given, for the agreement check."""
  torch.set_num_threads(NUM_THREADS)
  v, t = _inputs(b, d, seed)
  return float(loss_fn(v, t, _lams(lams), **kw))


def time_loss(b, d, iters, *, m2=True, m3=False, seed=0, warmup=2):
  """Median / min ms of fwd+bwd at batch ``b``, and the peak memory (MiB)."""
  torch.set_num_threads(NUM_THREADS)
  v, t = _inputs(b, d, seed)
  rng = np.random.default_rng(seed)

  def step():
    lams = _lams(rng.beta(0.5, 0.5, size=4))
    v.grad = t.grad = None
    loss_fn(v, t, lams, m2=m2, m3=m3).backward()

  peak = _peak_mb(step)  # the first step: nothing cached by the allocator
  out = torch_negatives._time(step, iters, warmup)  # pylint: disable=protected-access
  out['peak_mb'] = peak
  return out


def _peak_mb(step):
  """Peak resident memory growth of one ``step()`` (Linux: VmHWM reset by
  /proc/self/clear_refs; elsewhere the ru_maxrss growth, a lower bound)."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    before = torch_negatives._status_kb('VmRSS')  # pylint: disable=protected-access
    step()
    return (torch_negatives._status_kb('VmHWM') - before) / 1024  # pylint: disable=protected-access
  except OSError:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
