"""Job creation checks what it can before anything is stored: non-finite numbers, lora_target against the base
model's architecture, val_size against the training file, the tokens one step holds, and OpenAI's batch_size
round-tripping through gradient accumulation. Each refusal is a 422 naming the field, with no row and no message."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from core.orm import FineTuningJob
from tests.api.helpers import assert_envelope, count_rows, make_client
from tests.factories import alpaca_records, jsonl

METHOD = "method.supervised.hyperparameters"


def _model_folder(root: Path, name: str, config: dict[str, Any] | None) -> str:
    folder = root / name
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.fixture
def checks_client(clean_db: None, queue_name: str, tmp_path: Path) -> Iterator[TestClient]:
    """The app with base models whose folders hold only a config.json (what the api reads), and an empty model
    store, so the builtin SmolLM2 is not prepared yet."""
    models = {
        "tiny-llama": _model_folder(tmp_path, "llama", {"model_type": "llama", "num_hidden_layers": 2}),
        "tiny-phi3": _model_folder(tmp_path, "phi3", {"model_type": "phi3", "num_hidden_layers": 2}),
        "mystery": _model_folder(tmp_path, "mystery", {"model_type": "mystery", "num_hidden_layers": 2}),
        "not-there": str(tmp_path / "missing"),
        "SmolLM2-135M-Instruct": "builtin:smollm2",
    }
    with make_client(BASE_MODELS=json.dumps(models), MODEL_STORE=str(tmp_path / "store")) as client:
        yield client


def _upload(client: TestClient, examples: int = 8) -> str:
    response = client.post(
        "/v1/files",
        files={"file": ("train.jsonl", jsonl(alpaca_records(examples)), "application/octet-stream")},
        data={"purpose": "fine-tune"},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


@pytest.fixture
def training_file(checks_client: TestClient) -> str:
    return _upload(checks_client)


def _create(client: TestClient, training_file: str, knobs: dict[str, Any], **body: Any) -> Any:
    method = {"type": "supervised", "supervised": {"hyperparameters": knobs}}
    return client.post(
        "/v1/fine_tuning/jobs",
        json={"model": body.pop("model", "tiny-llama"), "training_file": training_file, "method": method, **body},
    )


def _refused(response: Any, param: str, code: str | None, redis_client: redis.Redis, queue: str) -> None:
    assert_envelope(response, 422, param=param, code=code)
    assert count_rows(FineTuningJob) == 0
    assert redis_client.llen(queue) == 0


# ------------------------------------------------------------------------------------------------ non-finite


@pytest.mark.parametrize(
    ("where", "knob", "literal"),
    [
        ("method", "val_size", "Infinity"),
        ("method", "learning_rate", "NaN"),
        ("method", "lora_alpha", "Infinity"),
        ("method", "num_train_epochs", "-Infinity"),
        ("top", "learning_rate_multiplier", "Infinity"),
        ("top", "warmup_ratio", "NaN"),
    ],
)
def test_infinity_and_nan_are_refused_by_field(
    checks_client: TestClient,
    training_file: str,
    redis_client: redis.Redis,
    queue_name: str,
    where: str,
    knob: str,
    literal: str,
) -> None:
    # Python's JSON parser, which the app uses, reads these words as floats; a client can send them.
    knobs = f'{{"{knob}": {literal}}}'
    if where == "method":
        hp, param = f'"method": {{"type": "supervised", "supervised": {{"hyperparameters": {knobs}}}}}', METHOD
    else:
        hp, param = f'"hyperparameters": {knobs}', "hyperparameters"
    body = f'{{"model": "tiny-llama", "training_file": "{training_file}", {hp}}}'
    response = checks_client.post(
        "/v1/fine_tuning/jobs", content=body.encode(), headers={"Content-Type": "application/json"}
    )
    _refused(response, f"{param}.{knob}", "finite_number", redis_client, queue_name)


# ------------------------------------------------------------------------------------------------ lora_target


ACCEPTED_TARGETS: list[tuple[str, Any]] = [
    ("tiny-llama", "all"),
    ("tiny-llama", ["all"]),
    ("tiny-llama", ["q_proj", "v_proj"]),
    ("tiny-llama", "q_proj, v_proj"),
    ("tiny-llama", ["self_attn.o_proj", "mlp.down_proj"]),
    ("tiny-llama", ["model.layers.1.mlp.gate_proj", "layers.0.self_attn.k_proj"]),
    ("tiny-phi3", ["qkv_proj", "gate_up_proj"]),
    # Unknown architecture, or no config.json to read: left to the worker's own check.
    ("mystery", ["anything_goes"]),
    ("not-there", ["anything_goes"]),
    # The builtin model is not prepared yet; its architecture is known all the same (Llama, 30 layers).
    ("SmolLM2-135M-Instruct", ["q_proj", "model.layers.29.mlp.up_proj"]),
]


@pytest.mark.parametrize(("model", "target"), ACCEPTED_TARGETS)
def test_lora_targets_of_the_architecture_are_accepted(
    checks_client: TestClient, training_file: str, model: str, target: Any
) -> None:
    response = _create(checks_client, training_file, {"lora_target": target}, model=model)
    assert response.status_code == 200, response.text
    assert response.json()["conch_hyperparameters"]["lora_target"] == target


REFUSED_TARGETS: list[tuple[str, Any]] = [
    ("tiny-llama", ["c_attn"]),
    ("tiny-llama", ["q_proj", "nope"]),
    ("tiny-llama", ["model.layers.2.mlp.down_proj"]),  # two layers: 0 and 1
    ("tiny-llama", ["lm_head"]),
    ("tiny-llama", ["embed_tokens"]),
    ("tiny-llama", ["self_attn"]),  # a block, not a linear module
    ("tiny-llama", ["mlp.q_proj"]),
    ("tiny-llama", ["all", "q_proj"]),
    ("tiny-llama", ""),
    ("tiny-llama", " , "),
    ("tiny-llama", ["q proj"]),
    ("tiny-llama", ["model..q_proj"]),
    ("tiny-llama", ["q" * 129]),
    ("tiny-llama", ["q_proj"] * 65),
    ("tiny-phi3", ["q_proj"]),
    ("SmolLM2-135M-Instruct", ["model.layers.30.mlp.up_proj"]),
    ("SmolLM2-135M-Instruct", ["c_attn"]),
    # Syntax is checked whatever the architecture.
    ("mystery", ["all", "q_proj"]),
]


@pytest.mark.parametrize(("model", "target"), REFUSED_TARGETS)
def test_lora_targets_outside_the_architecture_are_refused(
    checks_client: TestClient,
    training_file: str,
    redis_client: redis.Redis,
    queue_name: str,
    model: str,
    target: Any,
) -> None:
    response = _create(checks_client, training_file, {"lora_target": target}, model=model)
    _refused(response, f"{METHOD}.lora_target", "invalid_lora_target", redis_client, queue_name)


def test_lora_target_error_names_the_top_level_field_and_the_modules(
    checks_client: TestClient, training_file: str
) -> None:
    response = checks_client.post(
        "/v1/fine_tuning/jobs",
        json={"model": "tiny-llama", "training_file": training_file, "hyperparameters": {"lora_target": ["c_attn"]}},
    )
    error = assert_envelope(response, 422, param="hyperparameters.lora_target", code="invalid_lora_target")
    assert "'c_attn'" in error["message"] and "q_proj" in error["message"] and "down_proj" in error["message"]


# ------------------------------------------------------------------------------------------------ val_size


@pytest.mark.parametrize(
    "knobs",
    [{"val_size": 8}, {"val_size": 100}, {"val_size": 0.95}, {"val_size": 4, "max_samples": 4}],
    ids=["all_eight", "more_than_the_file", "fraction_rounds_to_all", "all_after_max_samples"],
)
def test_val_size_leaving_nothing_to_train_on_is_refused(
    checks_client: TestClient, training_file: str, redis_client: redis.Redis, queue_name: str, knobs: dict[str, Any]
) -> None:
    _refused(
        _create(checks_client, training_file, knobs), f"{METHOD}.val_size", "invalid_val_size", redis_client, queue_name
    )


def test_val_size_that_leaves_examples_is_accepted(checks_client: TestClient, training_file: str) -> None:
    assert _create(checks_client, training_file, {"val_size": 7}).status_code == 200
    assert _create(checks_client, training_file, {"val_size": 0.5}).status_code == 200
    # With a validation file the worker evaluates on it and holds nothing out, so val_size is not checked.
    validation = _upload(checks_client, 2)
    response = _create(checks_client, training_file, {"val_size": 8}, validation_file=validation)
    assert response.status_code == 200, response.text


# ------------------------------------------------------------------------------------------------ tokens per step


@pytest.mark.parametrize(
    ("knobs", "field"),
    [
        ({"per_device_train_batch_size": 8, "cutoff_len": 4096}, "per_device_train_batch_size"),
        ({"cutoff_len": 8192}, "cutoff_len"),  # x the default batch of 4
        ({"cutoff_len": 32768, "per_device_train_batch_size": 1}, "cutoff_len"),  # one example is already too long
        ({"per_device_train_batch_size": 32}, "per_device_train_batch_size"),  # x the default cutoff of 1024
        ({"batch_size": 64, "gradient_accumulation_steps": 1, "cutoff_len": 2048}, "batch_size"),
    ],
)
def test_more_tokens_per_step_than_the_ceiling_is_refused(
    checks_client: TestClient,
    training_file: str,
    redis_client: redis.Redis,
    queue_name: str,
    knobs: dict[str, Any],
    field: str,
) -> None:
    response = _create(checks_client, training_file, knobs)
    _refused(response, f"{METHOD}.{field}", "too_many_tokens_per_step", redis_client, queue_name)
    assert "MAX_TOKENS_PER_STEP" in response.json()["error"]["message"]


def test_tokens_per_step_at_the_ceiling_is_accepted(checks_client: TestClient, training_file: str) -> None:
    response = _create(checks_client, training_file, {"per_device_train_batch_size": 4, "cutoff_len": 4096})
    assert response.status_code == 200, response.text


def test_ceiling_comes_from_settings(clean_db: None, queue_name: str) -> None:
    with make_client(MAX_TOKENS_PER_STEP="2048") as client:
        training_file = _upload(client)
        assert_envelope(
            _create(client, training_file, {}), 422, param=f"{METHOD}.per_device_train_batch_size"
        )  # the defaults: 4 x 1024
        assert _create(client, training_file, {"per_device_train_batch_size": 2}).status_code == 200


# ------------------------------------------------------------------------------------------------ batch_size


@pytest.mark.parametrize(
    ("knobs", "per_device", "accumulation"),
    [
        ({"batch_size": 8}, 8, 1),
        ({"batch_size": 12, "gradient_accumulation_steps": 4}, 3, 4),
        ({"batch_size": 4, "gradient_accumulation_steps": 4}, 1, 4),
        # Larger than one step may hold: split into the fewest accumulation steps that fit (16 x 1024 tokens).
        ({"batch_size": 64}, 16, 4),
        ({"batch_size": 48, "cutoff_len": 2048}, 8, 6),
    ],
)
def test_openai_batch_size_round_trips(
    checks_client: TestClient, training_file: str, knobs: dict[str, Any], per_device: int, accumulation: int
) -> None:
    for sent in (
        _create(checks_client, training_file, knobs),
        checks_client.post(
            "/v1/fine_tuning/jobs",
            json={"model": "tiny-llama", "training_file": training_file, "hyperparameters": knobs},
        ),
    ):
        assert sent.status_code == 200, sent.text
        job = sent.json()
        assert job["hyperparameters"]["batch_size"] == knobs["batch_size"]
        assert job["method"]["supervised"]["hyperparameters"]["batch_size"] == knobs["batch_size"]
        hp = job["conch_hyperparameters"]
        assert (hp["per_device_train_batch_size"], hp["gradient_accumulation_steps"]) == (per_device, accumulation)
        again = checks_client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        assert again["hyperparameters"]["batch_size"] == knobs["batch_size"]


def test_batch_size_not_a_multiple_of_accumulation_is_refused(
    checks_client: TestClient, training_file: str, redis_client: redis.Redis, queue_name: str
) -> None:
    response = _create(checks_client, training_file, {"batch_size": 10, "gradient_accumulation_steps": 4})
    _refused(response, f"{METHOD}.batch_size", "invalid_batch_size", redis_client, queue_name)


# ------------------------------------------------------------------------------------------------ status


def test_a_new_job_is_queued_and_validating_files_matches_nothing(
    checks_client: TestClient, training_file: str
) -> None:
    job = _create(checks_client, training_file, {}).json()
    assert job["status"] == "queued"
    listed = checks_client.get("/v1/fine_tuning/jobs", params={"status": "validating_files"})
    assert listed.status_code == 200 and listed.json()["data"] == []
    schema = checks_client.get("/openapi.json").json()["components"]["schemas"]["JobOut"]["properties"]["status"]
    assert "never waits in OpenAI's validating_files" in schema["description"]
