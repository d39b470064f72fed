#!/usr/bin/env bash
# The accelerator benchmark on a fresh machine, from a checkout of hnjax:
#
#   bash benchmarks/accelerator.sh             # GPU machine or TPU VM
#   bash benchmarks/accelerator.sh --small     # reduced shapes (CPU, CI)
#
# Makes .venv-accelerator with the jax build for the machine (CUDA 13 or 12
# by what the NVIDIA driver supports, TPU when a TPU is attached, CPU
# otherwise) and hnjax's training stack, then runs benchmarks/accelerator.py
# with the given flags. HNJAX_NO_INSTALL=1 skips the install and uses the
# active Python environment.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${HNJAX_NO_INSTALL:-0}" != 1 ]]; then
  python3 -m venv .venv-accelerator
  . .venv-accelerator/bin/activate
  python -m pip install -q -U pip
  if command -v nvidia-smi >/dev/null 2>&1; then
    cuda="$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -1)"
    if [[ "${cuda:-12}" -ge 13 ]]; then extra=cuda13; else extra=cuda12; fi
    echo "accelerator.sh: NVIDIA driver for CUDA ${cuda:-?}: jax[$extra]"
    python -m pip install -q -U "jax[$extra]"
  elif compgen -G "/dev/accel*" >/dev/null || compgen -G "/dev/vfio/[0-9]*" >/dev/null \
       || [[ -n "${TPU_NAME:-}" ]]; then
    echo "accelerator.sh: TPU: jax[tpu]"
    python -m pip install -q -U "jax[tpu]"
  else
    echo "accelerator.sh: no accelerator found: CPU jax"
  fi
  # hnjax after jax: its bounds are floors, so the build above stays.
  python -m pip install -q -e ".[train]"
fi
python benchmarks/accelerator.py "$@"
