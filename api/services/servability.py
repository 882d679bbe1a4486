"""Can the serving engine serve what this job will produce? Checked at job creation, so a job that could never be
deployed is refused with the field to change (422) instead of training for hours and failing at deploy time.

With ``INFERENCE_BACKEND=vllm`` every fine-tune is served as a LoRA adapter on its base model's vLLM server,
which accepts adapters up to ``--max-lora-rank`` (``VLLM_MAX_LORA_RANK``). The other backends serve the merged
model, whatever the rank, so nothing is refused there.
"""

from __future__ import annotations

from api.services.hyperparameters import Resolved
from core.errors import ValidationFailed
from core.settings import Settings


def check_servable(resolved: Resolved, settings: Settings) -> None:
    if settings.inference_backend != "vllm":
        return
    limit = settings.vllm_max_lora_rank
    if resolved.hp.lora_rank > limit:
        param = resolved.param("lora_rank")
        raise ValidationFailed(
            f"{param}: {resolved.hp.lora_rank} is above the serving limit of {limit} (VLLM_MAX_LORA_RANK): the "
            "fine-tune could not be served as an adapter; send a lora_rank of at most that.",
            param=param,
            code="not_servable",
        )
