"""The fidelity gate: before a model becomes reachable, the route that will serve it is held to the fp32
reference on the golden prompts (``artifacts.golden``), teacher-forced on the reference's own greedy answers.

A route whose next-token agreement falls below ``FIDELITY_MIN_AGREEMENT`` is not used for that model; the
registry falls back to the next route (ending with the faithful one) and says so on the deployment.

The reference comes with the model (written at publish or base-model preparation); a folder without one (a base
model configured by path) gets it computed here once, with transformers in fp32, and cached beside the GGUF
exports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from artifacts.golden import Fidelity, Reference, compare, compute_reference, golden_conversations
from artifacts.serving import read_serving_files, weights_stamp
from inference.engine.loader import LoadedModel, from_pretrained_lock

log = logging.getLogger("conch.inference.gate")


@dataclass
class GateResult:
    route: str
    fidelity: Fidelity
    threshold: float
    seconds: float
    reference_prompts: str
    rejected: list[dict[str, Any]] = field(default_factory=list)  # routes tried before this one, and why

    @property
    def passed(self) -> bool:
        return self.fidelity.agreement >= self.threshold

    def to_json(self) -> dict[str, Any]:
        return {
            "route": self.route,
            **self.fidelity.to_json(),
            "threshold": self.threshold,
            "passed": self.passed,
            "golden_prompts": self.reference_prompts,
            "reference": "transformers fp32, greedy, teacher-forced",
            "seconds": round(self.seconds, 3),
            "fell_back_from": self.rejected,
        }


# ---------------------------------------------------------------------------------------------- reference


def _cache_path(folder: Path, template: str, cache_dir: Path) -> Path:
    key = hashlib.sha256(json.dumps([str(folder.resolve()), weights_stamp(folder), template]).encode()).hexdigest()
    return cache_dir / f"{folder.name}-{key[:20]}.reference.json"


def reference_for(folder: Path, template: str, cache_dir: Path, stop_ids: list[int]) -> Reference:
    """The folder's reference answers: from its serving files, else from the cache, else computed (and cached).
    Raises ReferenceError when the reference model itself is broken."""
    files = read_serving_files(folder)
    if files is not None and files.reference is not None:
        return Reference.load(files.reference)
    cached = _cache_path(folder, template, cache_dir)
    if cached.is_file():
        try:
            return Reference.load(cached)
        except (OSError, ValueError, TypeError):
            cached.unlink(missing_ok=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    with from_pretrained_lock():
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, use_safetensors=True, trust_remote_code=False
        )
    conversations, source = golden_conversations(None)
    reference = compute_reference(model, tokenizer, template, conversations, prompts=source, stop_ids=stop_ids)
    del model
    cache_dir.mkdir(parents=True, exist_ok=True)
    scratch = cached.with_name(f".{cached.name}.tmp")
    reference.save(scratch)
    scratch.replace(cached)
    log.info("reference.computed", extra={"folder": str(folder), "seconds": round(time.perf_counter() - started, 3)})
    return reference


# ---------------------------------------------------------------------------------------------- the route


def route_logits(model: LoadedModel, reference: Reference) -> list[np.ndarray]:
    """The route's next-token logits at every position of every reference answer, teacher-forced."""
    score = getattr(model.decoder, "score", None)
    if score is not None:  # llama.cpp and the lean decoder: every position of a sequence in one pass
        result: list[np.ndarray] = score(
            [(case.prompt_ids + case.continuation[:-1], len(case.prompt_ids) - 1) for case in reference.cases]
        )
        return result
    return _stepwise_logits(model, reference)


def _stepwise_logits(model: LoadedModel, reference: Reference) -> list[np.ndarray]:
    """Through the decoder protocol the engine uses: every prompt prefilled together (left-padded), then one
    reference token per row per step."""
    decoder, cases = model.decoder, reference.cases
    longest = max(len(case.prompt_ids) for case in cases)
    steps = max(len(case.continuation) for case in cases)
    ids = torch.full((len(cases), longest), model.pad_id, dtype=torch.long)
    mask = torch.zeros((len(cases), longest), dtype=torch.bool)
    for row, case in enumerate(cases):
        ids[row, longest - len(case.prompt_ids) :] = torch.tensor(case.prompt_ids)
        mask[row, longest - len(case.prompt_ids) :] = True
    collected: list[list[np.ndarray]] = [[] for _ in cases]
    cache = decoder.new_cache(len(cases), longest + steps)
    try:
        with torch.inference_mode():
            logits = decoder.forward(ids.to(decoder.device), mask.to(decoder.device), cache)
            for step in range(steps):
                rows = logits.float().cpu().numpy()
                for row, case in enumerate(cases):
                    if step < len(case.continuation):
                        collected[row].append(rows[row])
                if step == steps - 1:
                    break
                feed = [case.continuation[step] if step < len(case.continuation) else model.pad_id for case in cases]
                token = torch.tensor([[t] for t in feed], dtype=torch.long, device=decoder.device)
                logits = decoder.forward(token, torch.ones_like(token, dtype=torch.bool), cache)
    finally:
        cache.release()
    return [np.stack(rows) for rows in collected]


def run_gate(model: LoadedModel, reference: Reference, route: str, threshold: float) -> GateResult:
    started = time.perf_counter()
    fidelity = compare(reference, route_logits(model, reference))
    result = GateResult(
        route=route,
        fidelity=fidelity,
        threshold=threshold,
        seconds=time.perf_counter() - started,
        reference_prompts=reference.prompts,
    )
    log.info("fidelity.measured", extra={"model": model.name, **result.to_json()})
    return result
