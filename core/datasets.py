"""Dataset formats: detect, validate and normalise Alpaca, ShareGPT and OpenAI chat files, and their preference
(DPO) variants.

Every supervised format becomes the same thing: a conversation, a list of ``{"role", "content"}`` messages with
roles ``system``, ``user`` and ``assistant`` (assistant messages may carry ``"train": False``). Every preference
format becomes a ``PreferencePair``: the prompt conversation (ending on a user turn) and the preferred and the
rejected assistant reply. The api validates with it at upload time and the worker reads training examples with
it, so both agree on what a file means.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from core.settings import Settings, get_settings

Format = Literal["alpaca", "sharegpt", "openai", "openai_preference", "alpaca_preference", "sharegpt_preference"]
SUPERVISED_FORMATS: tuple[Format, ...] = ("alpaca", "sharegpt", "openai")
# OpenAI's DPO file (input.messages, preferred_output, non_preferred_output) and LLaMA-Factory's ranking datasets
# (Alpaca or ShareGPT with chosen/rejected).
PREFERENCE_FORMATS: tuple[Format, ...] = ("openai_preference", "alpaca_preference", "sharegpt_preference")
FORMATS: tuple[Format, ...] = SUPERVISED_FORMATS + PREFERENCE_FORMATS
Message = dict[str, Any]
Conversation = list[Message]


def is_preference_format(fmt: str | None) -> bool:
    """Whether files of this format hold preference pairs (for DPO) rather than conversations (for SFT)."""
    return fmt in PREFERENCE_FORMATS


@dataclass(frozen=True)
class PreferencePair:
    """One preference example: the prompt conversation (ends with a user message) and two assistant replies."""

    prompt: Conversation
    chosen: str
    rejected: str

    def conversation(self, *, preferred: bool = True) -> Conversation:
        """The prompt followed by the preferred (or rejected) reply, as a supervised conversation."""
        reply = self.chosen if preferred else self.rejected
        return [*self.prompt, {"role": "assistant", "content": reply}]


MAX_REPORTED_ERRORS = 20
JSON_TOO_LARGE = "json_too_large"


@dataclass(frozen=True)
class DatasetLimits:
    """The size and shape limits a dataset file is read under; the api (upload) and the worker (training) both take
    them from the settings, so a file accepted at upload is never refused later for a different number."""

    max_line_bytes: int = 8 * 1024 * 1024
    max_json_depth: int = 64
    max_json_array_bytes: int = 64 * 1024 * 1024

    @classmethod
    def from_settings(cls, settings: Settings) -> DatasetLimits:
        return cls(
            max_line_bytes=settings.max_line_bytes,
            max_json_depth=settings.max_json_depth,
            max_json_array_bytes=settings.max_json_array_bytes,
        )


def too_deep(value: Any, max_depth: int) -> bool:
    """Whether ``value`` nests objects and arrays deeper than ``max_depth`` (a flat object is depth 1). Walks with
    an explicit stack, so a hostile nesting costs no recursion."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


@dataclass
class ColumnMapping:
    """A LLaMA-Factory ``dataset_info.json`` entry: ``formatting``, ``columns`` and ``tags``."""

    formatting: Format | None = None
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    ranking: bool = False  # LLaMA-Factory's flag for a preference dataset (chosen/rejected columns)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ColumnMapping:
        if not isinstance(raw, dict):
            raise ValueError("column mapping must be a JSON object")
        formatting = raw.get("formatting")
        if formatting is not None and formatting not in FORMATS:
            raise ValueError(f"formatting must be one of {', '.join(FORMATS)}")
        ranking = raw.get("ranking", False)
        if not isinstance(ranking, bool):
            raise ValueError("ranking must be true or false")
        if ranking and formatting in ("alpaca", "sharegpt"):
            formatting = f"{formatting}_preference"
        columns = raw.get("columns") or {}
        tags = raw.get("tags") or {}
        if not isinstance(columns, dict) or not all(isinstance(v, str) for v in columns.values()):
            raise ValueError("columns must map names to strings")
        if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
            raise ValueError("tags must map names to strings")
        return cls(formatting=formatting, columns=dict(columns), tags=dict(tags), ranking=ranking)

    def to_json(self) -> dict[str, Any]:
        return {"formatting": self.formatting, "columns": self.columns, "tags": self.tags, "ranking": self.ranking}


class ExampleError(ValueError):
    def __init__(self, kind: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.field = field


@dataclass
class DatasetReport:
    format: Format | None = None
    container: Literal["jsonl", "json"] = "jsonl"
    num_examples: int = 0
    num_errors: int = 0
    error_counts: Counter[str] = field(default_factory=Counter)
    errors: list[dict[str, Any]] = field(default_factory=list)
    num_messages: int = 0
    num_characters: int = 0

    @property
    def ok(self) -> bool:
        return self.num_errors == 0 and self.num_examples > 0

    def add_error(self, position: int, kind: str, message: str, field_name: str | None = None) -> None:
        self.num_errors += 1
        self.error_counts[kind] += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            key = "line" if self.container == "jsonl" else "index"
            self.errors.append({key: position, "kind": kind, "message": message, "field": field_name})

    @property
    def preference(self) -> bool:
        return is_preference_format(self.format)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            # Preference files train DPO jobs, the others supervised ones.
            "kind": "preference" if self.preference else "supervised",
            "container": self.container,
            "num_examples": self.num_examples,
            "num_errors": self.num_errors,
            "error_counts": dict(self.error_counts),
            "errors": self.errors,
            "num_messages": self.num_messages,
            "num_characters": self.num_characters,
        }


# ---------------------------------------------------------------------------------------------- detection


def detect_format(record: Any) -> Format:
    if not isinstance(record, dict):
        raise ExampleError("invalid_type", "each example must be a JSON object")
    if "preferred_output" in record or "non_preferred_output" in record:
        return "openai_preference"
    if "chosen" in record or "rejected" in record:
        return "sharegpt_preference" if "conversations" in record else "alpaca_preference"
    if "messages" in record:
        return "openai"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record or "output" in record:
        return "alpaca"
    raise ExampleError(
        "unknown_format",
        "cannot tell the format: expected 'messages' (OpenAI chat), 'conversations' (ShareGPT), "
        "'instruction'/'output' (Alpaca), 'input'/'preferred_output'/'non_preferred_output' (OpenAI preference) "
        "or 'chosen'/'rejected' (Alpaca or ShareGPT preference)",
    )


# ---------------------------------------------------------------------------------------------- normalising


def _text(record: dict[str, Any], key: str, *, required: bool, allow_empty: bool = False) -> str:
    if key not in record or record[key] is None:
        if required:
            raise ExampleError("missing_field", f"'{key}' is required", key)
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise ExampleError("invalid_type", f"'{key}' must be a string", key)
    if required and not allow_empty and not value.strip():
        raise ExampleError("empty_field", f"'{key}' must not be empty", key)
    return value


def _alpaca(record: dict[str, Any], mapping: ColumnMapping) -> Conversation:
    col = {
        "prompt": "instruction",
        "query": "input",
        "response": "output",
        "system": "system",
        "history": "history",
    }
    col.update(mapping.columns)
    instruction = _text(record, col["prompt"], required=True)
    query = _text(record, col["query"], required=False)
    response = _text(record, col["response"], required=True)
    system = _text(record, col["system"], required=False)
    conversation: Conversation = []
    if system.strip():
        conversation.append({"role": "system", "content": system})
    history = record.get(col["history"])
    if history is not None:
        if not isinstance(history, list):
            raise ExampleError("invalid_type", f"'{col['history']}' must be a list of [prompt, response] pairs")
        for turn in history:
            if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
                raise ExampleError(
                    "invalid_type",
                    f"'{col['history']}' must be a list of [prompt, response] pairs",
                    col["history"],
                )
            conversation += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    user = f"{instruction}\n\n{query}" if query.strip() else instruction
    conversation += [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
    return conversation


def _alternating_turns(conversation: Conversation, field_name: str) -> Conversation:
    """The turns after an optional leading system message, checked to alternate user, assistant, user, ..."""
    if any(m["role"] == "system" for m in conversation[1:]):
        raise ExampleError("invalid_order", "a system message may only come first", field_name)
    turns = [m for m in conversation if m["role"] != "system"]
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ExampleError(
                "invalid_order",
                f"turn {i + 1} should be from the {expected}, not the {message['role']}",
                field_name,
            )
    return turns


def _check_turns(conversation: Conversation, field_name: str) -> Conversation:
    turns = _alternating_turns(conversation, field_name)
    if not turns:
        raise ExampleError("no_assistant", "the conversation has no assistant message", field_name)
    if turns[-1]["role"] != "assistant":
        raise ExampleError("no_assistant", "the conversation must end with an assistant message", field_name)
    if not any(m.get("train", True) for m in turns if m["role"] == "assistant"):
        raise ExampleError("no_assistant", "every assistant message has weight 0: nothing to train on", field_name)
    return conversation


def _sharegpt_tags(mapping: ColumnMapping) -> tuple[dict[str, str], dict[str, str]]:
    """The tag names of a ShareGPT file (LLaMA-Factory's ``tags``) and what each role tag means."""
    tags = {
        "role_tag": "from",
        "content_tag": "value",
        "user_tag": "human",
        "assistant_tag": "gpt",
        "system_tag": "system",
    }
    tags.update(mapping.tags)
    roles = {
        tags["user_tag"]: "user",
        tags["assistant_tag"]: "assistant",
        tags["system_tag"]: "system",
        "user": "user",
        "assistant": "assistant",
    }
    return tags, roles


def _sharegpt_message(item: Any, where: str, tags: dict[str, str], roles: dict[str, str]) -> Message:
    if not isinstance(item, dict):
        raise ExampleError("invalid_type", f"{where} must be an object", where)
    role = roles.get(item.get(tags["role_tag"]))  # type: ignore[arg-type]
    if role is None:
        raise ExampleError(
            "invalid_role",
            f"{where}.{tags['role_tag']} must be one of {sorted(roles)}",
            f"{where}.{tags['role_tag']}",
        )
    content = item.get(tags["content_tag"])
    if not isinstance(content, str):
        raise ExampleError("invalid_type", f"{where}.{tags['content_tag']} must be a string", where)
    return {"role": role, "content": content}


def _sharegpt_turns(record: dict[str, Any], mapping: ColumnMapping) -> tuple[Conversation, str]:
    """The system prompt and every message of the ``conversations`` list, unchecked for order; and its key."""
    messages_key = mapping.columns.get("messages", "conversations")
    system_key = mapping.columns.get("system", "system")
    tags, roles = _sharegpt_tags(mapping)
    raw = record.get(messages_key)
    if not isinstance(raw, list) or not raw:
        raise ExampleError("missing_field", f"'{messages_key}' must be a non-empty list", messages_key)
    conversation: Conversation = []
    system = _text(record, system_key, required=False)
    if system.strip():
        conversation.append({"role": "system", "content": system})
    for i, item in enumerate(raw):
        conversation.append(_sharegpt_message(item, f"{messages_key}[{i}]", tags, roles))
    return conversation, messages_key


def _sharegpt(record: dict[str, Any], mapping: ColumnMapping) -> Conversation:
    conversation, messages_key = _sharegpt_turns(record, mapping)
    return _check_turns(conversation, messages_key)


def _openai_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ExampleError("invalid_type", f"{where}.content parts must be text parts", f"{where}.content")
            parts.append(part["text"])
        return "".join(parts)
    raise ExampleError("invalid_type", f"{where}.content must be a string", f"{where}.content")


def _openai_messages(raw: Any, key: str) -> Conversation:
    if not isinstance(raw, list) or not raw:
        raise ExampleError("missing_field", f"'{key}' must be a non-empty list", key)
    conversation: Conversation = []
    for i, item in enumerate(raw):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise ExampleError("invalid_type", f"{where} must be an object", where)
        role = item.get("role")
        if role not in ("system", "user", "assistant"):
            raise ExampleError("invalid_role", f"{where}.role must be system, user or assistant", f"{where}.role")
        message: Message = {"role": role, "content": _openai_content(item.get("content"), where)}
        weight = item.get("weight")
        if weight is not None:
            if role != "assistant" or weight not in (0, 1):
                raise ExampleError("invalid_value", f"{where}.weight must be 0 or 1 on assistant messages", where)
            message["train"] = weight == 1
        conversation.append(message)
    return conversation


def _openai(record: dict[str, Any], mapping: ColumnMapping) -> Conversation:
    messages_key = mapping.columns.get("messages", "messages")
    conversation = _openai_messages(record.get(messages_key), messages_key)
    return _check_turns(conversation, messages_key)


_NORMALISERS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "openai": _openai}


def _check_nul(messages: Conversation) -> None:
    for message in messages:
        if "\x00" in message["content"]:
            raise ExampleError("invalid_value", "text must not contain NUL characters")


def normalise(record: Any, fmt: Format, mapping: ColumnMapping | None = None) -> Conversation:
    if not isinstance(record, dict):
        raise ExampleError("invalid_type", "each example must be a JSON object")
    if fmt not in _NORMALISERS:
        raise ExampleError("invalid_format", f"{fmt} files hold preference pairs, not conversations")
    conversation = _NORMALISERS[fmt](record, mapping or ColumnMapping())
    _check_nul(conversation)
    return conversation


# ---------------------------------------------------------------------------------------------- preference


def _check_prompt(conversation: Conversation, field_name: str) -> Conversation:
    """A preference prompt: an optional system message, then user and assistant turns ending on a user turn."""
    turns = _alternating_turns(conversation, field_name)
    if not turns or turns[-1]["role"] != "user":
        raise ExampleError("no_prompt", "the prompt must end with a user message", field_name)
    return [{"role": m["role"], "content": m["content"]} for m in conversation]


def _reply(text: str, field_name: str) -> str:
    if not text.strip():
        raise ExampleError("empty_field", f"'{field_name}' must not be empty", field_name)
    return text


def _openai_preference(record: dict[str, Any], mapping: ColumnMapping) -> PreferencePair:
    """OpenAI's DPO line: ``input.messages`` (the prompt), ``preferred_output`` and ``non_preferred_output`` (each
    a list holding one assistant message)."""
    given = record.get("input")
    if not isinstance(given, dict):
        raise ExampleError("missing_field", "'input' must be an object with 'messages'", "input")
    prompt = _check_prompt(_openai_messages(given.get("messages"), "input.messages"), "input.messages")
    replies: list[str] = []
    for key in ("preferred_output", "non_preferred_output"):
        raw = record.get(key)
        if not isinstance(raw, list) or len(raw) != 1:
            raise ExampleError("missing_field", f"'{key}' must be a list of one assistant message", key)
        (message,) = _openai_messages(raw, key)
        if message["role"] != "assistant":
            raise ExampleError("invalid_role", f"{key}[0].role must be assistant", f"{key}[0].role")
        replies.append(_reply(message["content"], f"{key}[0].content"))
    return PreferencePair(prompt, replies[0], replies[1])


def _alpaca_preference(record: dict[str, Any], mapping: ColumnMapping) -> PreferencePair:
    """LLaMA-Factory's Alpaca ranking line: ``instruction``, ``input``, ``chosen``, ``rejected`` (plus ``system``
    and ``history``)."""
    chosen_key = mapping.columns.get("chosen", "chosen")
    rejected_key = mapping.columns.get("rejected", "rejected")
    chosen = _text(record, chosen_key, required=True)
    rejected = _text(record, rejected_key, required=True)
    # The prompt is built as for a supervised Alpaca line whose response is the chosen reply.
    conversation = _alpaca(record, ColumnMapping(columns={**mapping.columns, "response": chosen_key}))
    return PreferencePair(conversation[:-1], chosen, rejected)


def _sharegpt_preference(record: dict[str, Any], mapping: ColumnMapping) -> PreferencePair:
    """LLaMA-Factory's ShareGPT ranking line: ``conversations`` ending on a user turn, and ``chosen`` and
    ``rejected`` assistant messages (``{"from": "gpt", "value": ...}``)."""
    conversation, messages_key = _sharegpt_turns(record, mapping)
    prompt = _check_prompt(conversation, messages_key)
    tags, roles = _sharegpt_tags(mapping)
    replies: list[str] = []
    for key in (mapping.columns.get("chosen", "chosen"), mapping.columns.get("rejected", "rejected")):
        if key not in record:
            raise ExampleError("missing_field", f"'{key}' is required", key)
        message = _sharegpt_message(record[key], key, tags, roles)
        if message["role"] != "assistant":
            raise ExampleError(
                "invalid_role", f"{key}.{tags['role_tag']} must be {tags['assistant_tag']}", f"{key}.{tags['role_tag']}"
            )
        replies.append(_reply(message["content"], key))
    return PreferencePair(prompt, replies[0], replies[1])


_PREFERENCE_NORMALISERS = {
    "openai_preference": _openai_preference,
    "alpaca_preference": _alpaca_preference,
    "sharegpt_preference": _sharegpt_preference,
}


def normalise_pair(record: Any, fmt: Format, mapping: ColumnMapping | None = None) -> PreferencePair:
    if not isinstance(record, dict):
        raise ExampleError("invalid_type", "each example must be a JSON object")
    if fmt not in _PREFERENCE_NORMALISERS:
        raise ExampleError("invalid_format", f"{fmt} files hold conversations, not preference pairs")
    pair = _PREFERENCE_NORMALISERS[fmt](record, mapping or ColumnMapping())
    _check_nul([*pair.prompt, {"content": pair.chosen}, {"content": pair.rejected}])
    return pair


# ---------------------------------------------------------------------------------------------- reading


def _records(path: Path, report: DatasetReport, limits: DatasetLimits) -> Iterator[tuple[int, Any]]:
    """Yield (line or index, parsed record); parse errors and records nested too deeply go to the report."""
    for position, record in _parsed(path, report, limits):
        if too_deep(record, limits.max_json_depth):
            report.add_error(position, "too_deep", f"the example is nested deeper than {limits.max_json_depth} levels")
            continue
        yield position, record


def _parsed(path: Path, report: DatasetReport, limits: DatasetLimits) -> Iterator[tuple[int, Any]]:
    max_line_bytes = limits.max_line_bytes
    with path.open("rb") as handle:
        head = handle.read(4096)
        handle.seek(0)
        stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
        if not stripped:
            report.add_error(1, "empty_file", "the file is empty")
            return
        if b"\x00" in head:
            report.add_error(1, "binary_file", "the file is binary, not UTF-8 JSON or JSONL text")
            return
        if stripped.startswith(b"["):
            report.container = "json"
            # A JSON array is parsed whole (several times its size in memory), so it has its own, smaller cap;
            # datasets beyond it must be JSONL, which is read one line at a time.
            size = path.stat().st_size
            if size > limits.max_json_array_bytes:
                report.add_error(
                    0,
                    JSON_TOO_LARGE,
                    f"a JSON-array dataset may be at most {limits.max_json_array_bytes} bytes (this one is {size});"
                    " send larger datasets as JSONL, one example per line",
                )
                return
            data = handle.read()
            try:
                parsed = json.loads(data.decode("utf-8-sig"))
            except UnicodeDecodeError as exc:
                report.add_error(0, "invalid_encoding", f"the file is not UTF-8 (byte {exc.start})")
                return
            except RecursionError:
                report.add_error(0, "too_deep", "JSON is nested too deeply")
                return
            except json.JSONDecodeError as exc:
                report.add_error(0, "invalid_json", f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}")
                return
            if not isinstance(parsed, list):
                report.add_error(0, "invalid_json", "a JSON file must hold an array of examples")
                return
            yield from enumerate(parsed)
            return
        line_number = 0
        while True:
            raw = handle.readline(max_line_bytes + 1)
            if not raw:
                break
            line_number += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                report.add_error(line_number, "line_too_long", f"the line is longer than {max_line_bytes} bytes")
                # Skip the rest of this line without holding it in memory.
                while raw and not raw.endswith(b"\n"):
                    raw = handle.readline(1024 * 1024)
                continue
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                report.add_error(line_number, "invalid_encoding", f"the line is not UTF-8 (byte {exc.start})")
                continue
            try:
                yield line_number, json.loads(text)
            except RecursionError:
                report.add_error(line_number, "too_deep", "JSON is nested too deeply")
            except json.JSONDecodeError as exc:
                report.add_error(line_number, "invalid_json", f"invalid JSON at column {exc.colno}: {exc.msg}")


def scan_dataset(
    path: Path,
    *,
    fmt: Format | None = None,
    mapping: ColumnMapping | None = None,
    limits: DatasetLimits | None = None,
    keep_examples: bool = False,
) -> tuple[DatasetReport, list[Any]]:
    """Validate every example of a JSON or JSONL file; return the report and (optionally) the examples: one
    conversation per line for supervised formats, one ``PreferencePair`` for preference formats."""
    report = DatasetReport()
    examples: list[Any] = []
    fmt = fmt or (mapping.formatting if mapping else None)
    for position, record in _records(path, report, limits or DatasetLimits()):
        try:
            if fmt is None:
                fmt = detect_format(record)
            if is_preference_format(fmt):
                pair = normalise_pair(record, fmt, mapping)
                example: Any = pair
                messages = [*pair.prompt, {"content": pair.chosen}, {"content": pair.rejected}]
            else:
                example = messages = normalise(record, fmt, mapping)
        except ExampleError as exc:
            report.add_error(position, exc.kind, str(exc), exc.field)
            continue
        except RecursionError:
            report.add_error(position, "too_deep", "JSON is nested too deeply")
            continue
        report.num_examples += 1
        report.num_messages += len(messages)
        report.num_characters += sum(len(m["content"]) for m in messages)
        if keep_examples:
            examples.append(example)
    report.format = fmt
    if report.num_examples == 0 and report.num_errors == 0:
        report.add_error(1, "empty_file", "the file holds no examples")
    return report, examples


def load_conversations(
    path: Path, fmt: Format, mapping: dict[str, Any] | None = None, *, limits: DatasetLimits | None = None
) -> list[Conversation]:
    """Read a validated supervised file for training; raises ValueError if it no longer validates. The limits
    default to the settings', the same ones the upload was checked under."""
    if is_preference_format(fmt):
        raise ValueError(f"a {fmt} file holds preference pairs, not conversations")
    return _load(path, fmt, mapping, limits)


def load_preference_pairs(
    path: Path, fmt: Format, mapping: dict[str, Any] | None = None, *, limits: DatasetLimits | None = None
) -> list[PreferencePair]:
    """Read a validated preference file for DPO; raises ValueError if it no longer validates."""
    if not is_preference_format(fmt):
        raise ValueError(f"a {fmt} file holds conversations, not preference pairs")
    return _load(path, fmt, mapping, limits)


def _load(path: Path, fmt: Format, mapping: dict[str, Any] | None, limits: DatasetLimits | None) -> list[Any]:
    if limits is None:
        limits = DatasetLimits.from_settings(get_settings())
    report, examples = scan_dataset(
        path,
        fmt=fmt,
        mapping=ColumnMapping.from_json(mapping) if mapping else None,
        limits=limits,
        keep_examples=True,
    )
    if not report.ok:
        raise ValueError(f"dataset no longer validates: {report.errors[:3]}")
    return examples
