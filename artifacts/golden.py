"""Golden prompts and the reference answers a serving route is held to (the fidelity gate).

The reference is the training stack's own view of a model: the folder loaded in fp32 by transformers (for a
fine-tune, the merged model, which equals base + adapter), answering each golden prompt greedily. It is
computed once, where the model is already in memory (the worker at publish, base-model preparation), and stored
with the model as JSON: each prompt's token ids, the reference's greedy continuation and, at every position of
it, the reference's top-k log-probabilities.

A serving route is then judged teacher-forced on that continuation (one pass, no generation): at each position,
does the route's most likely next token equal the reference's (next-token agreement), and how far apart are the
two next-token distributions (KL divergence of the reference from the route, over the reference's top-k tokens
plus one bucket for the rest: a coarsening that can only make the divergence smaller, never larger, so a route
failing on it fails on the full vocabulary too).

Golden prompts are the job's validation examples when it has some, else a small built-in set in English and
Chinese (the languages this project's users ask in; Chinese costs many tokens per character on small models).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.control_tokens import ControlTokens
from core.templates import Message, render_prompt, template_text

BUILTIN_PROMPTS: tuple[str, ...] = (
    "What is your name?",
    "Explain in two sentences what a LoRA adapter is.",
    "List three things to pack for a rainy hike.",
    "你好",
    "请问你是谁",
    "请用一句话介绍长城。",
)
# The gate reads every golden prompt and answer in one pass before a model may answer, so their size is the
# swap's cost: 6 prompts x 24 answer tokens took about 0.7 s on the default route (2 cores), and one disagreement
# in 144 positions (0.7%) still passes a 99% threshold while two do not.
MAX_PROMPTS = 6
CONTINUATION_TOKENS = 24
TOP_K = 32
MAX_PROMPT_TOKENS = 512  # a validation example longer than this is not a golden prompt (the gate must stay cheap)
REFERENCE_SOURCE = "transformers fp32, greedy"


class ReferenceError(Exception):
    """The reference itself is unusable (non-finite logits, empty answers, a template that does not render): such
    a model is never activated."""


@dataclass
class GoldenCase:
    prompt_ids: list[int]
    continuation: list[int]  # the reference's greedy tokens, up to and including a stop token
    top_ids: list[list[int]]  # per continuation position: the reference's top-k next tokens
    top_logprobs: list[list[float]]  # ... and their log-probabilities

    @property
    def sequence(self) -> list[int]:
        """Prompt and continuation: what a route reads teacher-forced."""
        return self.prompt_ids + self.continuation


@dataclass
class Reference:
    cases: list[GoldenCase]
    prompts: str  # "validation" or "builtin"
    source: str = REFERENCE_SOURCE
    top_k: int = TOP_K

    @property
    def tokens(self) -> int:
        return sum(len(case.continuation) for case in self.cases)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), separators=(",", ":")))

    @classmethod
    def load(cls, path: Path) -> Reference:
        raw = json.loads(path.read_text())
        cases = [GoldenCase(**case) for case in raw.pop("cases")]
        return cls(cases=cases, **raw)


@dataclass(frozen=True)
class Fidelity:
    """How closely a route follows the reference on the golden prompts."""

    agreement: float  # fraction of positions where the route's argmax is the reference's token
    max_kl: float  # largest per-token KL(reference || route), nats
    mean_kl: float
    tokens: int
    prompts: int
    disagreements: list[int] = field(default_factory=list)  # per prompt

    def to_json(self) -> dict[str, Any]:
        return {
            "agreement": round(self.agreement, 5),
            "max_kl": round(self.max_kl, 5),
            "mean_kl": round(self.mean_kl, 6),
            "positions": self.tokens,
            "prompts": self.prompts,
        }


# ---------------------------------------------------------------------------------------------- prompts


def golden_conversations(validation: Sequence[Sequence[Message]] | None = None) -> tuple[list[list[Message]], str]:
    """The prompts (conversations ending before an assistant answer) a model is judged on, and where they came
    from: the validation examples' prompts when there are any, else the built-in set."""
    prompts: list[list[Message]] = []
    for conversation in validation or ():
        messages = list(conversation)
        while messages and messages[-1].get("role") == "assistant":
            messages.pop()
        if messages and messages[-1].get("role") == "user":
            prompts.append([{"role": m["role"], "content": m["content"]} for m in messages])
        if len(prompts) == MAX_PROMPTS:
            break
    if prompts:
        return prompts, "validation"
    return [[{"role": "user", "content": text}] for text in BUILTIN_PROMPTS], "builtin"


def encode_prompts(tokenizer: Any, template: str, conversations: Sequence[Sequence[Message]]) -> list[list[int]]:
    """Token ids of each prompt, rendered exactly as serving renders a chat request."""
    encoded = []
    control: ControlTokens | None = None  # built once: its private text encoder copies the tokenizer's backend
    for messages in conversations:
        try:
            control = control or ControlTokens(tokenizer, template_text(template, tokenizer))
            text = render_prompt(tokenizer, control.mark(messages), template)
        except Exception as exc:  # a broken template: whatever the library raises
            raise ReferenceError(f"the chat template does not render a golden prompt: {exc}") from exc
        ids = control.encode(text)  # message text stays text, as serving encodes it
        if ids and len(ids) <= MAX_PROMPT_TOKENS:
            encoded.append(ids)
    if not encoded:
        raise ReferenceError("no golden prompt renders to a usable token sequence")
    return encoded


# ---------------------------------------------------------------------------------------------- reference


def compute_reference(
    model: Any,
    tokenizer: Any,
    template: str,
    conversations: Sequence[Sequence[Message]],
    *,
    prompts: str,
    stop_ids: Sequence[int],
    max_new_tokens: int = CONTINUATION_TOKENS,
) -> Reference:
    """Greedy answers of ``model`` (a transformers causal LM, converted to fp32 in place) to the golden prompts,
    with the top-k log-probabilities at each step. Raises ReferenceError if the answers are unusable."""
    import torch

    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()  # (a model already in fp32 is left as it is: one loaded from GGUF refuses .float())
    model.eval()
    encoded = encode_prompts(tokenizer, template, conversations)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else int(stop_ids[0])
    longest = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), longest), pad, dtype=torch.long)
    attention = torch.zeros((len(encoded), longest), dtype=torch.long)
    for row, ids in enumerate(encoded):  # left padding: every row's next token is at the same column
        input_ids[row, longest - len(ids) :] = torch.tensor(ids)
        attention[row, longest - len(ids) :] = 1
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=list(stop_ids),
            pad_token_id=pad,
            output_logits=True,
            return_dict_in_generate=True,
        )
    logits = torch.stack(out.logits, dim=1).float()  # [rows, steps, vocab], the raw next-token logits
    if not bool(torch.isfinite(logits).all()):
        raise ReferenceError("the reference model produced non-finite logits (NaN or inf weights)")
    logprobs = torch.log_softmax(logits, dim=-1)
    top = torch.topk(logprobs, k=min(TOP_K, logprobs.shape[-1]), dim=-1)
    generated = out.sequences[:, longest:].tolist()
    stops = set(int(s) for s in stop_ids)
    cases = []
    for row, ids in enumerate(encoded):
        continuation: list[int] = []
        for token in generated[row]:
            continuation.append(int(token))
            if token in stops:
                break
        steps = len(continuation)
        cases.append(
            GoldenCase(
                prompt_ids=ids,
                continuation=continuation,
                top_ids=top.indices[row, :steps].tolist(),
                top_logprobs=[[round(v, 5) for v in values] for values in top.values[row, :steps].tolist()],
            )
        )
    empty = sum(1 for case in cases if len(case.continuation) <= 1)  # nothing, or the stop token at once
    if empty * 2 > len(cases):
        raise ReferenceError(f"the reference model gave empty answers to {empty} of {len(cases)} golden prompts")
    return Reference(cases=cases, prompts=prompts)


# ---------------------------------------------------------------------------------------------- comparison


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def compare(reference: Reference, route_logits: Sequence[np.ndarray]) -> Fidelity:
    """Judge a route by its logits at each continuation position of each case ([steps, vocab] per case)."""
    agree = total = 0
    kls: list[float] = []
    disagreements: list[int] = []
    for case, logits in zip(reference.cases, route_logits, strict=True):
        steps = len(case.continuation)
        if logits.shape[0] != steps:
            raise ValueError(f"{logits.shape[0]} rows of logits for a continuation of {steps} tokens")
        if not np.isfinite(logits).all():
            kls.append(math.inf)
            disagreements.append(steps)
            total += steps
            continue
        route = _log_softmax(logits)
        chosen = route.argmax(axis=-1)
        wrong = 0
        for step in range(steps):
            total += 1
            if int(chosen[step]) == case.continuation[step]:
                agree += 1
            else:
                wrong += 1
            ids = case.top_ids[step]
            p = np.exp(np.asarray(case.top_logprobs[step], dtype=np.float64))
            q = np.exp(route[step, ids])
            p_rest, q_rest = max(0.0, 1.0 - p.sum()), max(0.0, 1.0 - q.sum())
            kl = float(np.sum(p * (np.log(np.maximum(p, 1e-30)) - np.log(np.maximum(q, 1e-30)))))
            if p_rest > 1e-12:
                kl += p_rest * (math.log(p_rest) - math.log(max(q_rest, 1e-30)))
            kls.append(max(0.0, kl))
        disagreements.append(wrong)
    return Fidelity(
        agreement=agree / total if total else 0.0,
        max_kl=max(kls, default=0.0),
        mean_kl=sum(kls) / len(kls) if kls else 0.0,
        tokens=total,
        prompts=len(reference.cases),
        disagreements=disagreements,
    )
