"""Fidelity and speed of each serving route on one model: the measurement behind the default route and the
fidelity gate's threshold.

For each route: next-token agreement and the largest per-token KL divergence against the fp32 reference on the
golden prompts (teacher-forced, as the gate measures them), greedy answers that differ from the faithful
route's over longer answers, single-stream decode tokens/s and time to first token through the engine, all in
one run on the same prompts and threads.

    python -m bench.fidelity_bench [--model FOLDER] [--routes llamacpp:bf16,llamacpp:f16,...] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.model_prep import prepare_default_model  # noqa: E402

DEFAULT_ROUTES = "auto:fp32,llamacpp:f32,llamacpp:bf16,llamacpp:f16,llamacpp:q8_0,llamacpp:q4_1,llamacpp:q4_0"
ANSWER_PROMPTS = (
    "What is LoRA?",
    "你好",
    "请问你是谁",
    "Give me three tips for writing clear emails.",
    "Why is the sky blue?",
    "用三句话介绍一下杭州。",
)


def parse_route(text: str) -> Any:
    from inference.engine.routes import Route

    backend, _, kind = text.partition(":")
    if backend == "llamacpp":
        return Route("llamacpp", kind or "f32")
    return Route(backend, "none", kind or "auto")


def load(route: Any, folder: Path, cache: Path, threads: int) -> Any:
    from inference.engine.loader import LlamaCppOptions, load_model

    options = LlamaCppOptions(
        cache_dir=cache,
        max_sequences=8,
        context_per_sequence=2048,
        threads=threads,
        batch_threads=threads,
        batch_tokens=2048,
    )
    model = load_model(
        "bench",
        folder,
        backend_setting=route.backend,
        quant_setting=route.quant,
        dtype_setting=route.dtype,
        llamacpp=options if route.backend == "llamacpp" else None,
    )
    model.route = route.name
    return model


def answers_and_speed(model: Any, max_new_tokens: int) -> tuple[list[str], float, float]:
    """Greedy answers to ANSWER_PROMPTS (one at a time), median decode tokens/s and time to first token."""
    import threading

    from inference.engine.engine import Engine, Failed, Finished, GenerationRequest, TextChunk
    from inference.engine.sampling import SamplingParams

    class Sink:
        def __init__(self) -> None:
            self.done = threading.Event()
            self.first: float | None = None
            self.finished: Finished | None = None
            self.text: list[str] = []

        def put(self, event: Any) -> None:
            if self.first is None:
                self.first = time.perf_counter()
            if isinstance(event, TextChunk):
                self.text.append(event.text)
            if isinstance(event, Finished | Failed):
                self.finished = event if isinstance(event, Finished) else None
                self.done.set()

    engine = Engine(model, max_batch_size=8).start()
    answers: list[str] = []
    rates: list[float] = []
    firsts: list[float] = []
    try:
        for prompt in ANSWER_PROMPTS:
            ids = model.encode_chat([{"role": "user", "content": prompt}])
            sink = Sink()
            started = time.perf_counter()
            engine.submit(GenerationRequest(ids, SamplingParams(max_new_tokens=max_new_tokens), sink))
            sink.done.wait(300)
            ended = time.perf_counter()
            assert sink.finished is not None and sink.first is not None
            firsts.append(sink.first - started)
            if sink.finished.completion_tokens > 1:
                rates.append((sink.finished.completion_tokens - 1) / (ended - sink.first))
            answers.append("".join(sink.text))
    finally:
        engine.stop()
    return answers, statistics.median(rates) if rates else 0.0, statistics.median(firsts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model folder (default: the prepared default model)")
    parser.add_argument("--routes", default=DEFAULT_ROUTES)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: every core)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from artifacts.golden import compute_reference, golden_conversations
    from inference.gate import run_gate

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    folder = args.model or prepare_default_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    reference_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    conversations, source = golden_conversations(None)
    stop_ids = [int(tokenizer.eos_token_id)]
    reference = compute_reference(reference_model, tokenizer, "auto", conversations, prompts=source, stop_ids=stop_ids)
    del reference_model
    print(
        f"model {folder.name}; {len(reference.cases)} golden prompts, {reference.tokens} reference tokens; "
        f"{threads} threads"
    )
    rows = []
    faithful: list[str] | None = None
    with tempfile.TemporaryDirectory(prefix="fidelity-bench-") as cache:
        for text in args.routes.split(","):
            route = parse_route(text.strip())
            model = load(route, folder, Path(cache), threads)
            gate = run_gate(model, reference, route.name, threshold=0.99)
            answers, rate, first = answers_and_speed(model, args.max_new_tokens)
            faithful = faithful or answers  # the first route listed is the one others are compared with
            changed = sum(a != b for a, b in zip(answers, faithful, strict=True))
            close = getattr(model.decoder, "close", None)
            if close:
                close()
            rows.append((route.name, gate.fidelity, rate, first, changed))
            print(
                f"  {route.name:16s} agreement {gate.fidelity.agreement:.4f}  max KL {gate.fidelity.max_kl:.4f}  "
                f"decode {rate:6.1f} tokens/s  first token {first:.3f} s  changed {changed}/{len(answers)}  "
                f"gate {gate.seconds:.2f} s",
                flush=True,
            )
    print(
        f"\n| route | next-token agreement | max KL (nats) | mean KL | decode tokens/s | time to first token | "
        f"answers changed ({args.max_new_tokens} tokens) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, fidelity, rate, first, changed in rows:
        print(
            f"| {name} | {fidelity.agreement:.2%} | {fidelity.max_kl:.4f} | {fidelity.mean_kl:.5f} | {rate:.1f} | "
            f"{first:.3f} s | {changed}/{len(ANSWER_PROMPTS)} |"
        )


if __name__ == "__main__":
    main()
