"""PyTorch peer: one plain MoCo v2 training step on CPU (CIFAR ResNet-18).

Command (peer venv, see README.md in this folder):

  /work/torchvenv/bin/python benchmarks/peers/torch_moco_step.py \
      --batch 256 --K 4096 65536 --iters 5

What one step does (facebookresearch/moco ``moco/builder.py`` ``forward`` and
``main_moco.py`` ``train``, ALGORITHMS.md §2.2; small-scale recipe of the
``colab-notebook`` branch, §2.3):

  q = normalize(f_q(x_q))                                  [B, 128]
  no_grad:  theta_k <- m * theta_k + (1 - m) * theta_q      (m = 0.99, first)
            perm = randperm(B); k = normalize(f_k(x_k[perm]))[argsort(perm)]
  l_pos = einsum('nc,nc->n', q, k)[:, None]
  l_neg = einsum('nc,ck->nk', q, queue.clone().detach())   queue [128, K]
  loss = cross_entropy(cat([l_pos, l_neg], 1) / T, 0)      T = 0.2
  optimizer.zero_grad(); loss.backward(); optimizer.step()
  enqueue k at ptr (FIFO), ptr = (ptr + B) % K

Model: CIFAR ResNet-18 written here (3x3 stride-1 stem, no max-pool,
BasicBlocks [2, 2, 2, 2] with widths 64-128-256-512, global average pool),
followed by the MoCo v2 MLP head Linear(512, 512) -> ReLU -> Linear(512, 128).
f_k is a deep copy of f_q with ``requires_grad=False``; both in train mode
(BatchNorm uses batch statistics). SGD lr 0.06, momentum 0.9, weight decay
5e-4 on all parameters. float32, ``torch.set_num_threads(2)``, NCHW.

Excluded: data loading and augmentation (inputs are two fixed random float32
image batches [B, 3, 32, 32]), learning-rate schedule, logging, kNN monitor.
Single process: the key shuffle is a plain in-batch permutation with ordinary
BatchNorm, so it does not emulate shuffle-BN (the CIFAR demo's SplitBatchNorm
is not used); it only costs the two index copies, as in the reference code.

Reported: first-step time (includes one-time allocation and lazy init),
median and min of ``iters`` timed steps after ``warmup`` untimed ones, and
images/s = batch / median step time.
"""
import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_THREADS = 2


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, in_planes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != planes:
      self.shortcut = nn.Sequential(
          nn.Conv2d(in_planes, planes, 1, stride, bias=False),
          nn.BatchNorm2d(planes))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + self.shortcut(x))


class CifarResNet18(nn.Module):
  """ResNet-18 for 32x32 inputs: 3x3 stem, no max-pool; returns [B, 512]."""

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    layers, in_planes = [], 64
    for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
      for s in (stride, 1):
        layers.append(BasicBlock(in_planes, planes, s))
        in_planes = planes
    self.layers = nn.Sequential(*layers)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.layers(out)
    return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


def make_encoder(dim=128):
  """Backbone + MoCo v2 MLP head 512 -> 512 -> dim."""
  return nn.Sequential(CifarResNet18(), nn.Linear(512, 512), nn.ReLU(),
                       nn.Linear(512, dim))


class MoCo(nn.Module):
  """MoCo v2 as in facebookresearch/moco builder.py, single process."""

  def __init__(self, dim=128, K=4096, m=0.99, T=0.2):
    super().__init__()
    self.K, self.m, self.T = K, m, T
    self.encoder_q = make_encoder(dim)
    self.encoder_k = copy.deepcopy(self.encoder_q)
    for p in self.encoder_k.parameters():
      p.requires_grad = False
    self.register_buffer('queue', F.normalize(torch.randn(dim, K), dim=0))
    self.register_buffer('queue_ptr', torch.zeros(1, dtype=torch.long))

  @torch.no_grad()
  def _momentum_update_key_encoder(self):
    for p_q, p_k in zip(self.encoder_q.parameters(),
                        self.encoder_k.parameters()):
      p_k.data = p_k.data * self.m + p_q.data * (1.0 - self.m)

  @torch.no_grad()
  def _dequeue_and_enqueue(self, keys):
    B = keys.shape[0]
    ptr = int(self.queue_ptr)
    assert self.K % B == 0
    self.queue[:, ptr:ptr + B] = keys.T
    self.queue_ptr[0] = (ptr + B) % self.K

  def forward(self, im_q, im_k):
    q = F.normalize(self.encoder_q(im_q), dim=1)
    with torch.no_grad():
      self._momentum_update_key_encoder()
      idx_shuffle = torch.randperm(im_k.shape[0])
      idx_unshuffle = torch.argsort(idx_shuffle)
      k = F.normalize(self.encoder_k(im_k[idx_shuffle]), dim=1)
      k = k[idx_unshuffle]
    l_pos = torch.einsum('nc,nc->n', q, k).unsqueeze(-1)
    l_neg = torch.einsum('nc,ck->nk', q, self.queue.clone().detach())
    logits = torch.cat([l_pos, l_neg], dim=1) / self.T
    labels = torch.zeros(logits.shape[0], dtype=torch.long)
    self._dequeue_and_enqueue(k)
    return logits, labels


def time_moco_step(batch=256, K=4096, iters=5, warmup=1, m=0.99, T=0.2,
                   lr=0.06, seed=0):
  """Times MoCo v2 training steps; returns dict with ms and images/s."""
  torch.set_num_threads(NUM_THREADS)
  torch.manual_seed(seed)
  model = MoCo(dim=128, K=K, m=m, T=T).train()
  opt = torch.optim.SGD(model.encoder_q.parameters(), lr=lr, momentum=0.9,
                        weight_decay=5e-4)
  criterion = nn.CrossEntropyLoss()
  im_q = torch.randn(batch, 3, 32, 32)
  im_k = torch.randn(batch, 3, 32, 32)

  def step():
    logits, labels = model(im_q, im_k)
    loss = criterion(logits, labels)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss

  t0 = time.perf_counter()
  loss = step()
  first_ms = (time.perf_counter() - t0) * 1e3
  if not torch.isfinite(loss):
    raise FloatingPointError(f'non-finite loss {loss}')
  for _ in range(warmup):
    step()
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    step()
    times.append((time.perf_counter() - t0) * 1e3)
  med = statistics.median(times)
  return dict(first_ms=first_ms, median_ms=med, min_ms=min(times),
              images_per_s=batch / (med / 1e3), times_ms=times,
              loss=loss.item())


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch', type=int, default=256)
  p.add_argument('--K', type=int, nargs='+', default=[4096, 65536])
  p.add_argument('--iters', type=int, default=5)
  p.add_argument('--warmup', type=int, default=1,
                 help='untimed steps after the first (timed) step')
  p.add_argument('--seed', type=int, default=0)
  a = p.parse_args()
  torch.set_num_threads(NUM_THREADS)
  print(f'torch {torch.__version__}, threads {torch.get_num_threads()}, '
        f'float32, CIFAR ResNet-18 + MLP head, batch {a.batch}, T=0.2, '
        f'm=0.99, SGD(0.06, 0.9, wd 5e-4); random inputs, no augmentation; '
        f'first step, then warmup {a.warmup}, iters {a.iters}')
  cols = ['K', 'first step ms', 'median ms', 'min ms', 'images/s']
  print(' | '.join(f'{c:>14}' for c in cols))
  for K in a.K:
    r = time_moco_step(batch=a.batch, K=K, iters=a.iters, warmup=a.warmup,
                       seed=a.seed)
    row = [f'{K}', f"{r['first_ms']:.0f}", f"{r['median_ms']:.0f}",
           f"{r['min_ms']:.0f}", f"{r['images_per_s']:.1f}"]
    print(' | '.join(f'{c:>14}' for c in row), flush=True)


if __name__ == '__main__':
  main()
