"""Map OpenAI's hyperparameters and LLaMA-Factory's knobs into Conch's one typed ``Hyperparameters``.

OpenAI's ``n_epochs``/``batch_size``/``learning_rate_multiplier`` (each possibly "auto") become
``num_train_epochs``/``per_device_train_batch_size``/``learning_rate`` = default rate x multiplier. Naming the
same knob both ways is refused, and range errors name the field the client actually sent.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from api.schemas import HyperparametersIn, OpenAIHyperparameters
from core.contracts import Hyperparameters
from core.errors import ValidationFailed

DEFAULT_LEARNING_RATE: float = Hyperparameters.model_fields["learning_rate"].default
# OpenAI name -> the Conch (LLaMA-Factory) field it sets.
OPENAI_ALIASES = {
    "n_epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "learning_rate_multiplier": "learning_rate",
}


def resolve(given: HyperparametersIn | None, *, param_prefix: str) -> Hyperparameters:
    values: dict[str, Any] = {}
    sent_as: dict[str, str] = {}
    raw = given.model_dump(exclude_none=True) if given else {}
    for name, value in raw.items():
        target = OPENAI_ALIASES.get(name)
        if target is None:
            values[name] = value
            sent_as.setdefault(name, name)
            continue
        if target in raw:
            raise ValidationFailed(
                f"{param_prefix}.{name} and {param_prefix}.{target} set the same thing; send one of them.",
                param=f"{param_prefix}.{name}",
                code="conflicting_parameters",
            )
        if value == "auto":
            continue
        values[target] = value * DEFAULT_LEARNING_RATE if name == "learning_rate_multiplier" else value
        sent_as[target] = name
    try:
        return Hyperparameters(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        field = sent_as.get(loc[0], loc[0]) if loc else None
        param = f"{param_prefix}.{field}" if field else param_prefix
        raise ValidationFailed(f"{param}: {first.get('msg')}", param=param, code=str(first.get("type"))) from exc


def openai_view(hp: Hyperparameters) -> OpenAIHyperparameters:
    epochs = hp.num_train_epochs
    return OpenAIHyperparameters(
        n_epochs=int(epochs) if float(epochs).is_integer() else epochs,
        # OpenAI's batch size is the number of examples per optimiser step.
        batch_size=hp.per_device_train_batch_size * hp.gradient_accumulation_steps,
        learning_rate_multiplier=round(hp.learning_rate / DEFAULT_LEARNING_RATE, 10),
    )
