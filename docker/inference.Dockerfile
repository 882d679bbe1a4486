# Inference image: PyTorch and transformers, no training libraries.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY core core
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
EXPOSE 8001
CMD ["uvicorn", "inference.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8001"]
