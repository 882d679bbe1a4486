#!/usr/bin/env bash
# The whole test suite: lint, types, then pytest against real PostgreSQL, Redis and Celery worker processes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/services.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "==> ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "==> mypy"
.venv/bin/mypy core artifacts api worker inference cli
echo "==> pytest"
exec .venv/bin/python -m pytest "$@"
