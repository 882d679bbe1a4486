#!/usr/bin/env bash
# The main job: fine-tune the default model on the sample persona dataset through the real api, worker and
# inference services (embedded defaults: SQLite, a file-system broker, a local artifact folder), then ask
# GET /generate before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/conch demo "$@"
