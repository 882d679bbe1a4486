"""DPO jobs through the official openai SDK against a real api server: preference files upload and say what
they are, ``method.type = "dpo"`` is accepted and echoed as OpenAI echoes it, and a file of the wrong kind is
refused by name."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.api.helpers import create_key
from tests.api.test_openai_sdk import api_server  # noqa: F401  (the real api server fixture)
from tests.factories import openai_records, write_jsonl
from tests.preference_records import openai_preference_records, sharegpt_preference_records
from tests.processes import ServiceProcess

pytestmark = pytest.mark.e2e


def test_openai_sdk_creates_a_dpo_job(api_server: tuple[str, ServiceProcess], tmp_path: Path) -> None:  # noqa: F811
    base_url, _ = api_server
    client = OpenAI(base_url=base_url, api_key=create_key("dpo-tenant"), max_retries=0)

    with write_jsonl(tmp_path / "prefs.jsonl", openai_preference_records(8)).open("rb") as handle:
        preferences = client.files.create(file=handle, purpose="fine-tune")
    assert preferences.status == "processed"
    raw = client.files.with_raw_response.retrieve(preferences.id).http_response.json()
    assert raw["format"] == "openai_preference" and raw["validation"]["kind"] == "preference"

    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=preferences.id,
        method={
            "type": "dpo",
            "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2, "batch_size": 2, "learning_rate_multiplier": 2}},
        },
    )
    for seen in (job, client.fine_tuning.jobs.retrieve(job.id), client.fine_tuning.jobs.list().data[0]):
        assert seen.method is not None and seen.method.type == "dpo"
        assert seen.method.dpo is not None and seen.method.dpo.hyperparameters is not None
        knobs = seen.method.dpo.hyperparameters
        assert (knobs.beta, knobs.n_epochs, knobs.batch_size, knobs.learning_rate_multiplier) == (0.2, 2, 2, 2)
        assert seen.method.supervised is None

    # "auto" leaves beta at its default.
    auto = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=preferences.id, method={"type": "dpo", "dpo": {"hyperparameters": {}}}
    )
    assert auto.method is not None and auto.method.dpo is not None
    assert auto.method.dpo.hyperparameters is not None and auto.method.dpo.hyperparameters.beta == 0.1

    # The other kind of file is refused by name, for either method.
    with write_jsonl(tmp_path / "chat.jsonl", openai_records(4)).open("rb") as handle:
        conversations = client.files.create(file=handle, purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as dpo_on_chat:
        client.fine_tuning.jobs.create(model="tiny-llama", training_file=conversations.id, method={"type": "dpo"})
    assert dpo_on_chat.value.param == "training_file" and dpo_on_chat.value.code == "invalid_file_kind"
    with pytest.raises(openai.BadRequestError) as sft_on_prefs:
        client.fine_tuning.jobs.create(model="tiny-llama", training_file=preferences.id)
    assert sft_on_prefs.value.param == "training_file"
    with pytest.raises(openai.BadRequestError) as mixed:
        client.fine_tuning.jobs.create(
            model="tiny-llama",
            training_file=preferences.id,
            validation_file=conversations.id,
            method={"type": "dpo"},
        )
    assert mixed.value.param == "validation_file"

    # A malformed preference file is refused at upload with the line and the field.
    bad = sharegpt_preference_records(2)
    del bad[1]["rejected"]
    with (
        write_jsonl(tmp_path / "bad.jsonl", bad).open("rb") as handle,
        pytest.raises(openai.BadRequestError) as refused,
    ):
        client.files.create(file=handle, purpose="fine-tune")
    assert refused.value.param == "rejected" and "line 2" in refused.value.message
