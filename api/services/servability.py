"""Can the serving engine serve what this job will produce? Checked at job creation, so a job that could never be
deployed is refused with the field to change (422) instead of training for hours and failing at deploy time.

The rules are ``core.servability``'s, the same the worker applies to the saved adapter at publish. Where
fine-tunes are served on vLLM (``INFERENCE_BACKEND=vllm`` here, or a live inference replica that serves adapters
and says so in its heartbeat), every fine-tune is served as a LoRA adapter on its base model's vLLM server: the rank
must be within ``--max-lora-rank`` (``VLLM_MAX_LORA_RANK``), the target modules ones the model class takes LoRA on,
the base model one of the types vLLM serves adapters on. The other backends serve the merged model, whatever the
adapter, so nothing is refused there.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.services import lora_targets
from api.services.hyperparameters import Resolved
from core import servability
from core.contracts import Hyperparameters
from core.deployments import adapter_replicas
from core.errors import ValidationFailed
from core.settings import Settings


def check_servable(session: Session, resolved: Resolved, base_model: str, settings: Settings) -> None:
    serving = servability.adapter_serving(settings, adapter_replicas(session, settings))
    if serving is None:
        return
    arch = lora_targets.architecture(base_model, settings)
    hp = resolved.hp
    adapter = servability.Adapter(rank=hp.lora_rank, target_modules=tuple(lora_targets.split_names(hp.lora_target)))
    base = servability.BaseModel(base_model, arch.model_type if arch else None)
    problem = servability.check(serving, base, adapter)
    if problem is None:
        return
    param = resolved.param(problem.field) if problem.field in Hyperparameters.model_fields else problem.field
    raise ValidationFailed(f"{param}: {problem.message}", param=param, code="not_servable")
