"""Map OpenAI's hyperparameters and LLaMA-Factory's knobs into Conch's one typed ``Hyperparameters``, and check
at creation everything that can be known then, so a job the worker would refuse minutes later is a 422 now.

OpenAI's ``n_epochs``/``batch_size``/``learning_rate_multiplier`` (each possibly "auto") become
``num_train_epochs``/``per_device_train_batch_size`` x ``gradient_accumulation_steps``/``learning_rate`` =
default rate x multiplier. Naming the same knob both ways is refused, and errors name the field the client
actually sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from api.schemas import HyperparametersIn, OpenAIDpoHyperparameters, OpenAIHyperparameters
from api.services import lora_targets
from core.contracts import Hyperparameters, MethodType, held_out_examples
from core.errors import ValidationFailed
from core.settings import Settings

DEFAULT_LEARNING_RATE: float = Hyperparameters.model_fields["learning_rate"].default
# OpenAI name -> the Conch (LLaMA-Factory) field it sets.
OPENAI_ALIASES = {
    "n_epochs": "num_train_epochs",
    "batch_size": "per_device_train_batch_size",
    "learning_rate_multiplier": "learning_rate",
}
MAX_ACCUMULATION: int = next(
    m.le for m in Hyperparameters.model_fields["gradient_accumulation_steps"].metadata if hasattr(m, "le")
)


@dataclass(frozen=True)
class Resolved:
    """The typed knobs, and how to name each one the way this client sent it."""

    hp: Hyperparameters
    prefix: str
    sent_as: dict[str, str]

    def param(self, field: str) -> str:
        return f"{self.prefix}.{self.sent_as.get(field, field)}"

    def sent(self, field: str) -> bool:
        return field in self.sent_as


def resolve(
    given: HyperparametersIn | None,
    *,
    param_prefix: str,
    settings: Settings,
    method: MethodType = "supervised",
) -> Resolved:
    values: dict[str, Any] = {"method": method}
    sent_as: dict[str, str] = {}
    raw = given.model_dump(exclude_none=True) if given else {}
    for name, value in raw.items():
        target = OPENAI_ALIASES.get(name)
        if name == "beta" and value == "auto":
            continue  # DPO's beta left to the default
        if name == "quantization_bit":
            _quantization_bit(value, raw, values, sent_as, param_prefix)
            continue
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
    if isinstance(raw.get("batch_size"), int):
        _split_openai_batch(values, raw, param_prefix, settings)
    try:
        hp = Hyperparameters(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        field = sent_as.get(loc[0], loc[0]) if loc else None
        param = f"{param_prefix}.{field}" if field else param_prefix
        raise ValidationFailed(f"{param}: {first.get('msg')}", param=param, code=str(first.get("type"))) from exc
    resolved = Resolved(hp, param_prefix, sent_as)
    _check_lora_target_syntax(resolved)
    _check_tokens_per_step(resolved, settings)
    _check_devices(resolved, settings)
    return resolved


def _quantization_bit(
    value: int, raw: dict[str, Any], values: dict[str, Any], sent_as: dict[str, str], prefix: str
) -> None:
    """LLaMA-Factory's ``quantization_bit: 4`` (bitsandbytes) is Conch's ``quantization: "4bit"``."""
    if "quantization" in raw:
        raise ValidationFailed(
            f"{prefix}.quantization_bit and {prefix}.quantization set the same thing; send one of them.",
            param=f"{prefix}.quantization_bit",
            code="conflicting_parameters",
        )
    if value != 4:
        raise ValidationFailed(
            f"{prefix}.quantization_bit: only 4 (QLoRA: bitsandbytes NF4 with double quantization) is supported.",
            param=f"{prefix}.quantization_bit",
            code="unsupported_quantization",
        )
    values["quantization"] = "4bit"
    sent_as["quantization"] = "quantization_bit"


def _split_openai_batch(values: dict[str, Any], raw: dict[str, Any], prefix: str, settings: Settings) -> None:
    """OpenAI's ``batch_size`` is examples per optimiser step, so it is per-device batch x accumulation: given
    with ``gradient_accumulation_steps`` it is divided by it (and must be a multiple of it), so the job reports
    back the batch_size it was sent. Without it, the batch is split into the fewest accumulation steps that keep
    one step within MAX_TOKENS_PER_STEP, as a hosted service picks its own micro-batch."""
    batch: int = raw["batch_size"]
    if batch < 1:
        return  # the range check on per_device_train_batch_size names batch_size
    accumulation = raw.get("gradient_accumulation_steps")
    if isinstance(accumulation, int):
        if accumulation < 1:
            return  # its own range check names it
        if batch % accumulation:
            raise ValidationFailed(
                f"{prefix}.batch_size ({batch}) is the number of examples per optimiser step, so it must be a "
                f"multiple of {prefix}.gradient_accumulation_steps ({accumulation}).",
                param=f"{prefix}.batch_size",
                code="invalid_batch_size",
            )
        values["per_device_train_batch_size"] = batch // accumulation
        return
    cutoff = values.get("cutoff_len", Hyperparameters.model_fields["cutoff_len"].default)
    if not isinstance(cutoff, int) or cutoff < 1:
        return
    for steps in range(1, min(batch, MAX_ACCUMULATION) + 1):
        if batch % steps == 0 and (batch // steps) * cutoff * _sequences_per_example(values) <= (
            settings.max_tokens_per_step
        ):
            if steps > 1:
                values["per_device_train_batch_size"] = batch // steps
                values["gradient_accumulation_steps"] = steps
            return


def _check_lora_target_syntax(resolved: Resolved) -> None:
    problem = lora_targets.syntax_error(resolved.hp.lora_target)
    if problem:
        param = resolved.param("lora_target")
        raise ValidationFailed(f"{param}: {problem}.", param=param, code="invalid_lora_target")


def _sequences_per_example(values: dict[str, Any]) -> int:
    """A DPO example is a pair: both replies go through the model in the same step."""
    return 2 if values.get("method") == "dpo" else 1


def _check_tokens_per_step(resolved: Resolved, settings: Settings) -> None:
    hp = resolved.hp
    per_example = _sequences_per_example({"method": hp.method})
    tokens = hp.per_device_train_batch_size * per_example * hp.cutoff_len
    if tokens <= settings.max_tokens_per_step:
        return
    # Name the knob to change: cutoff_len if one example alone is too long, else the one the client sent.
    cutoff_is_it = hp.cutoff_len > settings.max_tokens_per_step or (
        resolved.sent("cutoff_len") and not resolved.sent("per_device_train_batch_size")
    )
    param = resolved.param("cutoff_len" if cutoff_is_it else "per_device_train_batch_size")
    raise ValidationFailed(
        f"{param}: {hp.per_device_train_batch_size} examples{' x 2 replies' if per_example == 2 else ''} x "
        f"cutoff_len {hp.cutoff_len} = {tokens} tokens per "
        f"training step, above this server's limit of {settings.max_tokens_per_step} (MAX_TOKENS_PER_STEP); lower "
        "the per-device batch or cutoff_len (gradient_accumulation_steps keeps the effective batch).",
        param=param,
        code="too_many_tokens_per_step",
    )


def _check_devices(resolved: Resolved, settings: Settings) -> None:
    devices = resolved.hp.num_devices
    param = resolved.param("num_devices")
    if devices is not None and devices > 1 and resolved.hp.method != "supervised":
        raise ValidationFailed(
            f"{param}: {resolved.hp.method} jobs train on one device; send num_devices=1 or leave it out.",
            param=param,
            code="unsupported_num_devices",
        )
    if devices is None or devices <= settings.training_devices_max:
        return
    raise ValidationFailed(
        f"{param}: {devices} devices asked for, above this server's limit of {settings.training_devices_max} "
        "(TRAINING_DEVICES_MAX).",
        param=param,
        code="too_many_devices",
    )


def check_lora_modules(resolved: Resolved, model: str, settings: Settings) -> None:
    found = lora_targets.unknown_modules(resolved.hp.lora_target, model, settings)
    if found is None:
        return
    unknown, offered = found
    param = resolved.param("lora_target")
    raise ValidationFailed(
        f"{param}: {', '.join(repr(n) for n in unknown[:5])} names no module of {model}; use 'all' or some of "
        f"{', '.join(offered)} (a path such as self_attn.q_proj or model.layers.0.mlp.down_proj works too).",
        param=param,
        code="invalid_lora_target",
    )


def check_val_size(resolved: Resolved, training_examples: int) -> None:
    """The worker holds out ``val_size`` of the training file (after ``max_samples``) when no validation file
    is given; it must leave something to train on."""
    hp = resolved.hp
    available = min(training_examples, hp.max_samples) if hp.max_samples else training_examples
    held = held_out_examples(hp.val_size, available)
    if held and held >= available:
        param = resolved.param("val_size")
        raise ValidationFailed(
            f"{param}: {hp.val_size:g} holds out {held} of the {available} training examples, leaving none to "
            "train on; send a smaller val_size or a validation_file.",
            param=param,
            code="invalid_val_size",
        )


def openai_view(hp: Hyperparameters) -> OpenAIHyperparameters:
    epochs = hp.num_train_epochs
    return OpenAIHyperparameters(
        n_epochs=int(epochs) if float(epochs).is_integer() else epochs,
        # OpenAI's batch size is the number of examples per optimiser step.
        batch_size=hp.per_device_train_batch_size * hp.gradient_accumulation_steps,
        learning_rate_multiplier=round(hp.learning_rate / DEFAULT_LEARNING_RATE, 10),
    )


def dpo_view(hp: Hyperparameters) -> OpenAIDpoHyperparameters:
    """OpenAI's ``method.dpo.hyperparameters``: the supervised three plus ``beta``."""
    return OpenAIDpoHyperparameters(**openai_view(hp).model_dump(), beta=hp.beta)
