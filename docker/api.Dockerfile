# Control plane image: no torch, starts fast. Also runs the one-shot migration service.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY core core
COPY api api
COPY migrations migrations
COPY cli cli
RUN pip install ".[api]"
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
EXPOSE 8000
CMD ["uvicorn", "api.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]
