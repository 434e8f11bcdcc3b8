#!/usr/bin/env bash
# Run the default (fast, offline, CPU) test suite; pass pytest arguments through,
# e.g. `bash scripts/test.sh -m slow` for the long tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
exec .venv/bin/python -m pytest -q "$@"
