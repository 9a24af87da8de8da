#!/usr/bin/env bash
# The GPU machine's software on this CPU machine, before a GPU session spends its minutes: the
# device tool's machine has torch 2.11 and Triton 3.6, no network and no salstm_kernels install, and
# runs the package from the source tree without the C++ extension.  This builds that stack in a
# venv (torch 2.11.0 is a CUDA build on PyPI: about 3 GB with its nvidia-* wheels; it imports and
# runs on a machine without a GPU; Triton 3.6's interpreter needs numpy < 2.3) and runs the test
# suite on a clean copy of HEAD, with the GPU scripts' --cpu-smoke tests among them.
#
#   bash benchmarks/gpu_stack_on_cpu.sh [VENV]   # default VENV: /tmp/gpu-stack (reused if present)
#
# Not part of CI (the download); tests that need the C++ extension, MONAI or cmake's CUDA-free
# torch skip or are left out, as on the GPU machine.
set -euo pipefail
venv=${1:-/tmp/gpu-stack}
root=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==2.11.0" "triton==3.6.0" "numpy<2.3" pytest hypothesis
fi
"$venv/bin/python" -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
git -C "$root" archive HEAD | tar -x -C "$tree"
cd "$tree"
# the CMake test builds against torch's CMake config, which in a CUDA build of torch wants a CUDA
# toolkit; the GPU machine has no C++ extension either
PYTHONPATH=. "$venv/bin/python" -m pytest tests -q -p no:cacheprovider -rs \
  --deselect tests/test_cpp_cmake.py::test_cmake_build_loads_and_matches_reference
