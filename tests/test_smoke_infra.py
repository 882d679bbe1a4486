from sqlalchemy import text


def test_database_has_schema(db):
    names = {r[0] for r in db.execute(text("select tablename from pg_tables where schemaname='public'"))}
    assert {"files", "fine_tuning_jobs", "job_events", "checkpoints", "models", "deployments"} <= names


def test_tiny_models_load(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["tiny-qwen2"])
    assert model.config.num_hidden_layers == 2
