#!/usr/bin/env bash
# The benchmarks: inference (Conch against the seed-style app, transformers generate and llama.cpp) and training
# (Conch's recipe against a plain transformers Trainer + peft run), then one goals table. Nothing is asserted.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  echo "==> building llama-cpp-python for the llama.cpp baseline (once, a few minutes; log: .venv/bench-install.log)"
  .venv/bin/python -m pip install -e ".[bench]" > .venv/bench-install.log 2>&1 ||
    echo "llama-cpp-python did not build (see the log); the benchmark runs without the llama.cpp baseline"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/conch bench "$@"
