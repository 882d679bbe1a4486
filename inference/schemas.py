"""The protocol of the inference service: request bodies, and the response models (OpenAI's shapes) that the serving
layer (``inference.serving``) builds and the routes return, whole or as stream chunks."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from core.http.errors import ErrorResponse

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256

# One rule for every field of a generation request, OpenAI's or any other:
# - the fields declared on the models below are honoured (``name`` on a message and ``user`` are declared hints,
#   accepted and not used);
# - ACCEPTED_HINTS are metadata that cannot change the answer: accepted and ignored;
# - any other field is refused with 400 ``unsupported`` naming it (``logit_bias``, ``tools``, ``logprobs``,
#   ``response_format``, ``suffix``, ``tool_calls`` on a message, a field this server has never heard of ...), unless
#   it is null or holds the value that asks for nothing (NEUTRAL_VALUES), which clients often send by default.
# Extra fields are therefore allowed by the models and judged in ``inference.serving.openai.refuse_unsupported``.
ACCEPTED_HINTS = frozenset(
    {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key", "parallel_tool_calls"}
)
NEUTRAL_VALUES: dict[str, tuple[object, ...]] = {
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none",),
    "function_call": ("none",),
    "tool_calls": ([],),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "best_of": (1,),
    "suffix": ("",),
}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, description="accepted, not used")

    @property
    def text(self) -> str:
        content = self.content
        if isinstance(content, list):
            return "".join(part.text for part in content)
        return content or ""

    def as_template_message(self) -> dict[str, str]:
        # OpenAI's "developer" role is what older models call "system".
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text}


def _check_stops(value: str | list[str] | None) -> str | list[str] | None:
    stops = [value] if isinstance(value, str) else (value or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
    if any(not s or len(s) > MAX_STOP_LENGTH for s in stops):
        raise ValueError(f"stop strings must be 1-{MAX_STOP_LENGTH} characters")
    return value


class SamplingFields(BaseModel):
    """Knobs every generation route takes. Unset ones fall back to the model's defaults (greedy unless its
    generation config samples), and to MAX_NEW_TOKENS_DEFAULT for the length. Other fields: see the rule above."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = Field(
        default=None, max_length=512, description="a model id; unset or 'default': the deployed one"
    )
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=100_000)
    repetition_penalty: float | None = Field(default=None, ge=0.01, le=10.0)
    stop: str | list[str] | None = Field(default=None, description="a string or up to 16; the text ends before them")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stream: bool = False
    ignore_eos: bool = Field(default=False, description="keep generating past end-of-sequence (benchmarks)")

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        return _check_stops(value)

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


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
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class OpenAIFields(SamplingFields):
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1)
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    user: str | None = Field(default=None, description="accepted, not used")

    @property
    def include_usage(self) -> bool:
        """A stream ends with a chunk that carries only the usage."""
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionBody(OpenAIFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionBody(OpenAIFields):
    prompt: str | list[str] | list[int]
    echo: bool = False


# ------------------------------------------------------------------------------------------- responses
# What the routes return: FastAPI serialises them and lists them in the OpenAPI schema (clients and schema-driven
# tests read it). Stream chunks are not in the schema (an SSE body is one string per event there).


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"]


class GenerateResponse(BaseModel):
    generate_text: str
    model: str = Field(description="the model version that answered (also the x-conch-model header)")
    finish_reason: FinishReason
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: FinishReason


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelObject(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    base_model: str | None = None
    ready: bool = Field(description="its weights are in place (a base model may still be being prepared)")
    loaded: bool = Field(description="in memory now")
    deployed: bool = Field(description="the model requests naming none get")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelObject]


# ------------------------------------------------------------------------------------------- stream chunks


class _OmitsNone(BaseModel):
    """Leaves the fields named in ``omit_when_none`` out of the JSON while they are None: a stream chunk carries only
    what it says (a delta only what changed, the usage only on the last chunk), as OpenAI's do."""

    omit_when_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None or k not in self.omit_when_none}


class GenerateChunk(_OmitsNone):
    omit_when_none = frozenset({"finish_reason", "usage"})
    text: str
    model: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


class ChatDelta(_OmitsNone):
    omit_when_none = frozenset({"role", "content"})
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_OmitsNone):
    omit_when_none = frozenset({"usage"})
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChunkChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: FinishReason | None = None


class CompletionChunk(_OmitsNone):
    omit_when_none = frozenset({"usage"})
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in codes}


# Each server-sent event carries ``data: <json>``; the last one is ``data: [DONE]``.
SSE_EVENT = {
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    "required": ["data"],
}
SSE_CONTENT = {"text/event-stream": {"schema": SSE_EVENT}}
GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": SSE_CONTENT, "headers": {"x-conch-model": {"schema": {"type": "string"}}}},
    **error_responses(400, 401, 404, 413, 422, 500, 503),
}
READ_RESPONSES = error_responses(401, 404, 422)
