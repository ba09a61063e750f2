#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite (GPU tests skip themselves without CUDA).
#   bash scripts/run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
# No GPU here: DeepSpeed must use its CPU accelerator; W&B never needs the network in tests.
if ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then export DS_ACCELERATOR=cpu; fi
export WANDB_MODE=offline OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Lint first: a finding fails CI in seconds (settings in pyproject.toml).
ruff check .
exec python -m pytest -q -p no:cacheprovider "$@"
