# Inference image: PyTorch and transformers, no training libraries.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY core core
COPY inference inference
COPY migrations migrations
COPY cli cli
RUN pip install ".[inference]"
EXPOSE 8001
CMD ["uvicorn", "inference.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8001"]
