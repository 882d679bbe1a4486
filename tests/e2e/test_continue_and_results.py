"""Through the real api, Celery worker and inference processes: a job's result files download typed, a second job
continues the first one's model (and a third one of its checkpoints), and the continued model is what serves."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.fine_tuning import FineTuningJob
from typer.testing import CliRunner

from cli.main import app
from tests.e2e.conftest import Stack
from tests.e2e.helpers import wait_for_job
from tests.factories import alpaca_records, write_jsonl
from tests.polling import wait_until

pytestmark = pytest.mark.e2e

HYPERPARAMETERS: dict[str, float] = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 5.0}


def train(stack: Stack, client: openai.OpenAI, model: str, training_file: str, suffix: str) -> FineTuningJob:
    job = client.fine_tuning.jobs.create(
        model=model,
        training_file=training_file,
        suffix=suffix,
        method={"type": "supervised", "supervised": {"hyperparameters": HYPERPARAMETERS}},  # type: ignore[arg-type]
    )

    finished = wait_for_job(stack, client, job.id)
    assert finished.status == "succeeded", finished.error
    return finished


def test_result_files_and_a_fine_tune_continued_and_served(stack: Stack, tmp_path: Path) -> None:
    client = openai.OpenAI(base_url=f"{stack.api_url}/v1", api_key="unused", max_retries=0)
    with write_jsonl(tmp_path / "train.jsonl", alpaca_records(16)).open("rb") as handle:
        training_file = client.files.create(file=handle, purpose="fine-tune").id

    parent = train(stack, client, "tiny-llama", training_file, "first")
    assert len(parent.result_files) == 2
    names = {client.files.retrieve(f).filename: f for f in parent.result_files}
    assert set(names) == {"step_metrics.csv", "loss_curve.png"}
    picture = httpx.get(f"{stack.api_url}/v1/files/{names['loss_curve.png']}/content", timeout=30)
    assert picture.headers["content-type"] == "image/png" and picture.content.startswith(b"\x89PNG\r\n\x1a\n")
    table = list(csv.reader(io.StringIO(client.files.content(names["step_metrics.csv"]).text)))
    assert table[0] == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    events = client.fine_tuning.jobs.list_events(parent.id, limit=100).data
    data = [e.data for e in events if e.type == "metrics" and isinstance(e.data, dict)]
    logged = {d["step"] for d in data if "loss" in d}
    assert [int(row[0]) for row in table[1:]] == sorted(logged)

    # The CLI's job view lists them with their download command, and that command saves the file.
    cli = CliRunner()
    shown = cli.invoke(app, ["jobs", "show", parent.id, "--api-url", stack.api_url], env={"COLUMNS": "250"})
    assert shown.exit_code == 0, shown.output
    assert f"conch files download {names['loss_curve.png']}" in shown.output
    assert f"/v1/files/{names['loss_curve.png']}/content" in shown.output
    saved = tmp_path / "curve.png"
    fetched = cli.invoke(
        app, ["files", "download", names["loss_curve.png"], "-o", str(saved), "--api-url", stack.api_url]
    )
    assert fetched.exit_code == 0, fetched.output
    assert saved.read_bytes() == picture.content

    assert parent.fine_tuned_model is not None
    child = train(stack, client, parent.fine_tuned_model, training_file, "second")
    assert child.model == parent.fine_tuned_model
    assert child.fine_tuned_model == f"ft:tiny-llama:second:{child.id}"
    conch = httpx.get(f"{stack.api_url}/v1/models/{child.fine_tuned_model}", timeout=30).json()["conch"]
    assert conch["parent_model"] == parent.fine_tuned_model
    assert conch["lineage"] == ["tiny-llama", parent.fine_tuned_model]

    # The continued model is deployed (auto_deploy) and answers, without restarting anything.
    answer = wait_until(
        lambda: (
            (r := httpx.get(f"{stack.inference_url}/generate", params={"prompt": "What is your name?"}, timeout=60))
            .json()
            .get("model")
            == child.fine_tuned_model
            and r
        ),
        "the inference service to serve the continued model",
        timeout=60,
        interval=0.5,
        logs=stack.logs,
    )
    assert answer.headers["x-conch-model"] == child.fine_tuned_model

    checkpoint = client.fine_tuning.jobs.checkpoints.list(parent.id).data[-1].fine_tuned_model_checkpoint
    grandchild = train(stack, client, checkpoint, training_file, "third")
    conch = httpx.get(f"{stack.api_url}/v1/models/{grandchild.fine_tuned_model}", timeout=30).json()["conch"]
    assert conch["parent_model"] == checkpoint and conch["lineage"][-1] == checkpoint
