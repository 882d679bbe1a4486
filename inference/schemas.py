"""Request bodies. Responses are OpenAI's shapes, built in ``inference.responses``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_message(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # OpenAI's "developer" role is what older models call "system".
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


def _stops(value: Any) -> Any:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return value
    if len(value) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
    if any(isinstance(s, str) and (not s or len(s) > MAX_STOP_LENGTH) for s in value):
        raise ValueError(f"stop strings must be 1-{MAX_STOP_LENGTH} characters")
    return value


class SamplingFields(BaseModel):
    """Knobs every generation route takes. Unset ones fall back to the model's defaults (greedy unless its
    generation config samples), and to MAX_NEW_TOKENS_DEFAULT for the length."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(
        default=None, max_length=512, description="a model id; unset or 'default': the deployed one"
    )
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=100_000)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    stop: list[str] = Field(default_factory=list, description="a string or up to 16; the text ends before them")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool = False
    ignore_eos: bool = Field(default=False, description="keep generating past end-of-sequence (benchmarks)")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        return _stops(value)


class GenerateBody(SamplingFields):
    prompt: str | None = Field(default=None, description="one user message, rendered with the model's chat template")
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    max_new_tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_input(self) -> GenerateBody:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either 'prompt' or 'messages'")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class OpenAIFields(SamplingFields):
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1)
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    user: str | None = None


class ChatCompletionBody(OpenAIFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionBody(OpenAIFields):
    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
