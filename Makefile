.PHONY: demo test install lint format typecheck migrate up bench clean

demo:        ## fine-tune the default model on the sample dataset and show /generate before and after
	bash scripts/demo.sh

test:        ## the whole test suite (starts PostgreSQL and Redis if they are down)
	bash scripts/test.sh

install:
	bash scripts/bootstrap.sh

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

format:
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .

typecheck:
	.venv/bin/mypy core artifacts api worker inference cli

migrate:
	.venv/bin/alembic upgrade head

migration:   ## make migration m="what changed"
	.venv/bin/alembic revision --autogenerate -m "$(m)"

up:
	.venv/bin/conch up

bench:       ## inference and training benchmarks against their baselines, one goals table at the end
	bash scripts/bench.sh

clean:
	rm -rf var
