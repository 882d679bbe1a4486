# Inference image: PyTorch and transformers, no training libraries.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY core core
COPY inference inference
COPY migrations migrations
COPY cli cli
# EXTRAS=inference,llamacpp adds INFERENCE_BACKEND=llamacpp (built from source, hence the compiler);
# with CMAKE_ARGS="-DGGML_CUDA=on" on a CUDA base image it builds llama.cpp's GPU kernels.
ARG EXTRAS=inference
ARG CMAKE_ARGS="-DLLAVA_BUILD=OFF"
RUN case "$EXTRAS" in *llamacpp*) apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
      && rm -rf /var/lib/apt/lists/* ;; esac \
    && CMAKE_ARGS="$CMAKE_ARGS" pip install ".[$EXTRAS]"
EXPOSE 8001
CMD ["uvicorn", "inference.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8001"]
