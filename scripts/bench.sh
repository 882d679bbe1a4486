#!/usr/bin/env bash
# The benchmarks: inference (Conch against the seed-style app, transformers generate and llama.cpp) and training
# (Conch's recipe against a plain transformers Trainer + peft run), then one goals table. Nothing is asserted.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh  # installs llama-cpp-python too: Conch's llamacpp backend and the llama.cpp baseline
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/conch bench "$@"
