#!/usr/bin/env bash
# Installs pysim, its test tools and TensorBoard logging (--tensorboard) into the
# current Python environment.
#
# torch: an installed torch is kept as it is. With none installed, this pins
# the CPU build torch==2.13.0 (a bare "torch" requirement would pull several GB
# of CUDA packages); set PYSIM_TORCH to ask for another one.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q "${PYSIM_TORCH:-torch==2.13.0}"
fi
# The build needs no torch: only pybind11 and scikit-build-core (plus cmake and ninja).
"$PY" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" ninja
command -v cmake >/dev/null 2>&1 || "$PY" -m pip install -q "cmake>=3.18"
"$PY" -m pip install -q --no-build-isolation -e ".[test,tensorboard]"
"$PY" -c "import pysim._C, torch; print('pysim installed; torch', torch.__version__)"
