"""Chat templates, shared by training and serving so a model answers exactly as it was trained.

``auto`` renders with the base model's own chat template (from its tokenizer); the named templates are written
out here. Training turns a conversation into segments of text, each marked trainable or not, so the prompt can be
masked from the loss; serving renders the same conversation up to the generation prompt. The tokenizer is
duck-typed (anything with ``apply_chat_template``): this module imports no model library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

Message = dict[str, Any]

TEMPLATE_NAMES = ("auto", "chatml", "llama3", "qwen", "deepseekr1")


class ChatTokenizer(Protocol):
    chat_template: Any
    eos_token: Any

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool


_THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)


def strip_thinking(content: str) -> str:
    """Drop a leading ``<think>...</think>`` block (history turns of reasoning models carry only the answer)."""
    return _THINK.sub("", content, count=1)


# ------------------------------------------------------------------------------------------ named templates


@dataclass(frozen=True)
class _Named:
    prefix: str
    default_system: str | None
    system: str
    user: str
    assistant_open: str
    assistant_close: str
    stop: tuple[str, ...]

    def system_text(self, content: str) -> str:
        return self.system.format(content=content)


_CHATML = _Named(
    prefix="",
    default_system=None,
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_open="<|im_start|>assistant\n",
    assistant_close="<|im_end|>\n",
    stop=("<|im_end|>",),
)
_NAMED: dict[str, _Named] = {
    "chatml": _CHATML,
    "qwen": _Named(
        prefix="",
        default_system="You are a helpful assistant.",
        system=_CHATML.system,
        user=_CHATML.user,
        assistant_open=_CHATML.assistant_open,
        assistant_close=_CHATML.assistant_close,
        stop=("<|im_end|>", "<|endoftext|>"),
    ),
    "llama3": _Named(
        prefix="<|begin_of_text|>",
        default_system=None,
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_open="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant_close="<|eot_id|>",
        stop=("<|eot_id|>", "<|end_of_text|>"),
    ),
    # DeepSeek-R1 distills: the generation prompt opens a <think> block; history turns keep only their answer.
    "deepseekr1": _Named(
        prefix="<｜begin▁of▁sentence｜>",
        default_system=None,
        system="{content}",
        user="<｜User｜>{content}",
        assistant_open="<｜Assistant｜><think>\n",
        assistant_close="<｜end▁of▁sentence｜>",
        stop=("<｜end▁of▁sentence｜>",),
    ),
}


def _deepseek_answer(content: str, *, keep_thinking: bool) -> str:
    """The text after the ``<think>\\n`` that the generation prompt already holds."""
    if not keep_thinking:
        return "\n</think>\n\n" + strip_thinking(content)
    stripped = content.lstrip()
    if stripped.startswith("<think>"):
        return stripped[len("<think>") :].lstrip("\n")
    return "\n</think>\n\n" + content


def _named_segments(template: _Named, name: str, messages: list[Message], add_generation_prompt: bool) -> list[Segment]:
    segments: list[Segment] = []
    prompt = template.prefix
    rest = messages
    if messages and messages[0]["role"] == "system":
        prompt += template.system_text(messages[0]["content"])
        rest = messages[1:]
    elif template.default_system is not None:
        prompt += template.system_text(template.default_system)
    last_assistant = max((i for i, m in enumerate(rest) if m["role"] == "assistant"), default=-1)
    for i, message in enumerate(rest):
        if message["role"] == "user":
            prompt += template.user.format(content=message["content"])
        elif message["role"] == "assistant":
            prompt += template.assistant_open
            segments.append(Segment(prompt, False))
            prompt = ""
            content = message["content"]
            if name == "deepseekr1":
                content = _deepseek_answer(content, keep_thinking=i == last_assistant)
            segments.append(Segment(content + template.assistant_close, bool(message.get("train", True))))
        else:
            raise ValueError(f"unexpected role {message['role']!r} after the first message")
    if add_generation_prompt:
        prompt += template.assistant_open
    if prompt:
        segments.append(Segment(prompt, False))
    return segments


# ------------------------------------------------------------------------------------------ the model's own


def _render_own(tokenizer: ChatTokenizer, messages: list[Message], add_generation_prompt: bool) -> str:
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt)
    return str(text)


def _own_segments(tokenizer: ChatTokenizer, messages: list[Message], add_generation_prompt: bool) -> list[Segment]:
    """Split the model's own rendering by rendering growing prefixes of the conversation."""
    segments: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render_own(tokenizer, messages[:i], add_generation_prompt=True)
        full = _render_own(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("the model's chat template does not render conversations as growing prefixes")
        segments.append(Segment(prompt[len(done) :], False))
        segments.append(Segment(full[len(prompt) :], bool(message.get("train", True))))
        done = full
    if add_generation_prompt or not segments:
        tail = _render_own(tokenizer, messages, add_generation_prompt=add_generation_prompt)
        if not tail.startswith(done):
            raise ValueError("the model's chat template does not render conversations as growing prefixes")
        if tail[len(done) :]:
            segments.append(Segment(tail[len(done) :], False))
    return segments


# ------------------------------------------------------------------------------------------ public


def resolve_template(name: str, tokenizer: ChatTokenizer | None) -> str:
    """``auto`` means the tokenizer's own template, or ChatML where the tokenizer has none."""
    if name not in TEMPLATE_NAMES:
        raise ValueError(f"unknown template {name!r}; choose one of {', '.join(TEMPLATE_NAMES)}")
    if name == "auto" and (tokenizer is None or not getattr(tokenizer, "chat_template", None)):
        return "chatml"
    return name


def conversation_segments(
    tokenizer: ChatTokenizer | None,
    messages: list[Message],
    template: str = "auto",
    *,
    add_generation_prompt: bool = False,
) -> list[Segment]:
    """The conversation as text segments; assistant replies are trainable unless marked ``train: False``."""
    name = resolve_template(template, tokenizer)
    if name == "auto":
        assert tokenizer is not None
        return _own_segments(tokenizer, messages, add_generation_prompt)
    return _named_segments(_NAMED[name], name, messages, add_generation_prompt)


def render_prompt(tokenizer: ChatTokenizer | None, messages: list[Message], template: str = "auto") -> str:
    """The text a model continues to answer ``messages``: everything up to and including the generation prompt.

    Rendered once: the segments' growing prefixes (which training needs to mask the prompt) would cost one render
    per assistant turn, each as long as the conversation so far, i.e. quadratic in the number of turns."""
    name = resolve_template(template, tokenizer)
    if name == "auto":
        assert tokenizer is not None
        return _render_own(tokenizer, messages, add_generation_prompt=True)
    return "".join(s.text for s in _named_segments(_NAMED[name], name, messages, add_generation_prompt=True))


def template_text(template: str, tokenizer: ChatTokenizer | None) -> str:
    """The template's own text (its markers among it): the named template's parts, or the model's Jinja source."""
    name = resolve_template(template, tokenizer)
    if name in _NAMED:
        named = _NAMED[name]
        return "".join((named.prefix, named.system, named.user, named.assistant_open, named.assistant_close))
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):  # several named templates in one tokenizer
        return "".join(str(v) for v in source.values())
    return str(source or "")


def stop_strings(template: str, tokenizer: ChatTokenizer | None) -> list[str]:
    """Text that ends an answer besides the tokenizer's EOS token."""
    name = resolve_template(template, tokenizer)
    stops: list[str] = list(_NAMED[name].stop) if name in _NAMED else []
    eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else None
    if isinstance(eos, str) and eos not in stops:
        stops.append(eos)
    return stops
