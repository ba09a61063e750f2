#!/usr/bin/env bash
# Creates .venv and installs the project with its test extras. Safe to run again (fast when done).
# torch is installed first and pinned (TORCH_SPEC, default torch==2.13.0): on the project's CPU
# machines that version comes from local disk; a bare `torch` requirement would pull a multi-GB
# CUDA build. On a GPU machine, set TORCH_SPEC to the torch build you want, or install it first.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
    echo "setup: installing $TORCH_SPEC"
    python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
    python -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v "is ignored" || true
fi
if ! python -c "import andy_dist, deepspeed, webdataset, sentencepiece, wandb, safetensors, pytest" 2>/dev/null \
   || [ setup.cfg -nt .venv/.andy-installed ]; then
    echo "setup: installing andy_dist and its dependencies"
    python -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
    python -c "import andy_dist, deepspeed, webdataset, sentencepiece, wandb, safetensors, pytest"
    touch .venv/.andy-installed
fi
python -c "import torch; print('setup: ready, torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
