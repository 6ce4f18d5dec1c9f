#!/usr/bin/env bash
# One command on a machine with a CUDA GPU: the CUDA tests, the pytest-benchmark microbenchmarks (FLCE,
# projector, merge, planner; barnfast / torch eager / torch.compile / Liger side by side, CUDA-event times,
# at LLaMA-1/2/3 7-8B widths and CLIP-L/SigLIP projector shapes) and the end-to-end train step at real width,
# one results file per step under bench/results/ named with the GPU and the date, and a summary table
# SUMMARY_<gpu>_<date>.md.
#
#   bash bench/gpu.sh
#
# Planned to finish inside 10 minutes on an H100/H200 (each step has its own time limit in
# bench/run_all.py). Packages the GPU image lacks (liger-kernel, torchao, flash-attn) can travel as
# wheels in .whl/ (see README, "Benchmarks on a GPU"); they are installed to /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh needs a CUDA GPU; on CPU run: python -m bench.run_all')"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
# barnfast itself, from this tree, without touching the network (barnfast.kernels maps to kernels/).
if ! python3 -m pip install -q --no-deps --no-build-isolation -e .; then
  python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/barnfast-site .
  export PYTHONPATH="/tmp/barnfast-site:${PYTHONPATH:-}"
fi
# the microbenchmarks need pytest-benchmark (dev extra); without network it must come as a wheel in .whl/
python3 -c "import pytest_benchmark" 2>/dev/null || echo "bench/gpu.sh: pytest-benchmark is not importable:" \
  "the microbench step will fail (put the pytest_benchmark and py_cpuinfo wheels in .whl/)" >&2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec python3 -m bench.run_all "$@"
