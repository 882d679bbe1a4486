"""Inference benchmark: the seed-style app against Conch, same model (SmolLM2-135M-Instruct), same prompts.

Prints figures and ratios, then a goals table; nothing is asserted. Three parts:

1. engine (in process): Conch's torch decoder in fp32, bf16, int8 and int4 (``lean_*``) and, when
   llama-cpp-python is installed (``make bench`` does it), Conch's llama.cpp backend exporting the model as f16
   (``cpp_f16``, the default route on a CPU), f32, bf16, Q8_0, Q4_1 and Q4_0 GGUF (``cpp_*``), against
   transformers ``generate`` (fp32, bf16) and llama-cpp-python itself on the same model's shipped Q4_1 GGUF
   (skipped, with a line saying so, where its build has AMX compiled in: that build segfaults on quantised types
   on Intel AMX machines): single-stream decode tokens/s, time to first token, a batch of 8, and how many greedy
   answers each route changes against Conch's fp32 (which itself must equal ``generate``'s);
2. conch (a uvicorn process per ``--quant`` route; default ``auto,none``): ``auto`` sets no INFERENCE_BACKEND,
   INFERENCE_QUANT or INFERENCE_DTYPE (what a user meets: llama.cpp on the f16 export, gated against the fp32
   reference), ``none`` the lean fp32 decoder, ``<quant>`` a quantised lean route, ``llamacpp:<type>`` a named
   llama.cpp route. Per route: the served route and its fidelity from ``/readyz``; ``GET /generate`` end to end
   on the seed's three prompts (and on 8 more), with finish reasons and token counts; time to first token and
   decode rate from the SSE stream; ``--clients`` concurrent streaming clients (p50/p99 time to first token,
   per-client decode tokens/s, aggregate tokens/s, p50/p99 latency); 8 clients sending one ``GET /generate``
   each at once; resident memory; and a published model answering after "model ready": a new folder gets its
   serving files as the worker writes them at publish (timed apart, as worker-side seconds), then the deployment
   is written and announced, and the time until the new model answers is the figure;
3. seed (a uvicorn process running bench/seed_app.py): the three seed prompts one at a time (15-60 s each), then
   ``--seed-requests`` sent together; its "8 clients at once" wall time is measured with ``--seed-requests 8``,
   else extrapolated from its single-request times (it serialises requests).

Every app gets the same CPU threads (``--threads``; default Conch's own with no training running: every core).

    python -m bench.inference_bench            # about 15-20 minutes on 2 idle cores, a third of it the seed app
    python -m bench.inference_bench --quick    # engine part only, about 4 minutes
    python -m bench.inference_bench --repeats 1 --tokens 16 --clients 2,3 --rounds 1 --seed-requests 1 --prompts 1
                                               # a quick check of every part
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.model_prep import MODEL_NAME, prepare_default_model  # noqa: E402

if TYPE_CHECKING:
    from inference.engine.engine import Engine

# The prompts the seed's own callers sent: the end-to-end goals are measured on these, the same three for the
# seed-style app and for Conch, each at the app's default length (the seed's max_length=512, Conch's
# MAX_NEW_TOKENS_DEFAULT).
SEED_PROMPTS = ["你好", "请问你是谁", "What is LoRA?"]
SEED_MAX_LENGTH = 512  # bench/seed_app.py: generate(max_length=512), prompt included
BURST_CLIENTS = 8  # "8 concurrent clients end to end": one GET /generate each, all sent at once
# More short prompts as the seed's callers sent them (no chat template on the seed side: some of these make the model
# run on to max_length, e.g. "What is deep learning" gives 508 tokens); Conch renders each as a user message.
PROMPTS = [
    "What is deep learning",
    "Hi, how are you",
    "What is the capital of France?",
    "Give me three tips for staying productive while working from home.",
    "Explain what a neural network is in two sentences.",
    "Write a haiku about the ocean.",
    "How do I make a cup of green tea?",
    "Why is the sky blue?",
]
# More prompts for the greedy-answer comparisons (cheap: they run batched).
PARITY_PROMPTS = [
    *PROMPTS,
    "Translate 'good morning' into French and Spanish.",
    "What is 12 times 12?",
    "Suggest a name for a seaside cafe.",
    "Summarise the plot of Romeo and Juliet in one sentence.",
    "What should I pack for a weekend hiking trip?",
    "How does a refrigerator keep food cold?",
    "Write a short thank-you note to a colleague.",
    "What is the difference between weather and climate?",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def ratio(ours: float, theirs: float, *, lower_is_better: bool = False) -> str:
    if ours <= 0 or theirs <= 0:
        return "-"
    return f"{(theirs / ours) if lower_is_better else (ours / theirs):.1f}x"


# ------------------------------------------------------------------------------------------ llama.cpp


@dataclass
class LlamaCpp:
    """llama.cpp (llama-cpp-python) on the same model's Q4_1 GGUF, the file the default model is prepared from.

    Optional: ``make bench`` installs it (the ``bench`` extra builds it from source once, a few minutes)."""

    llm: Any

    @classmethod
    def open(cls, threads: int) -> LlamaCpp | None:
        """The baseline, or None (and a line saying why) where it is not installed or must not run."""
        try:
            from llama_cpp import Llama
        except ImportError:
            print("llama-cpp-python is not installed (pip install -e '.[llamacpp]'): no llama.cpp baseline")
            return None
        from artifacts.llamacpp import amx_compiled_in, system_info
        from bench.model_prep import gguf_file

        info = system_info()
        print(f"llama.cpp system info: {info.strip()}")
        if amx_compiled_in(info):
            # Plain llama_cpp.Llama has no guard: on Intel AMX machines that build segfaults at the first decode
            # of a quantised type such as the shipped Q4_1 (ggml-org/llama.cpp#20824), ending this process.
            print(
                "llama.cpp baseline skipped: this llama-cpp-python build has AMX compiled in, which segfaults on "
                "quantised types (the shipped Q4_1 file) on Intel AMX machines; Conch's own llamacpp routes keep "
                "weights out of the AMX path"
            )
            return None

        llm = Llama(model_path=str(gguf_file()), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
        return cls(llm)

    def single(self, ids: list[int], tokens: int) -> tuple[float, float]:
        """(decode tokens/s, time to first token) for one greedy stream of ``tokens`` tokens from a cold cache."""
        self.llm.reset()  # no prefix reuse: the prompt is evaluated in full every time, as for the others
        started = time.perf_counter()
        first = now = 0.0
        count = 0
        for _ in self.llm.generate(ids, temp=0.0, top_k=1, reset=True):
            now = time.perf_counter()
            first = first or now
            count += 1
            if count >= tokens:
                break
        return (count - 1) / (now - first), first - started

    def greedy(self, ids: list[int], tokens: int, tokenizer: Any) -> str:
        self.llm.reset()
        out: list[int] = []
        for token in self.llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if token == self.llm.token_eos() or len(out) >= tokens:
                break
            out.append(int(token))
        return str(tokenizer.decode(out, skip_special_tokens=True))


# ------------------------------------------------------------------------------------------ engine part


@dataclass
class TimedSink:
    events: list[Any] = field(default_factory=list)
    first_at: float | None = None
    last_at: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)

    def put(self, event: Any) -> None:
        from inference.engine.engine import TextChunk

        now = time.perf_counter()
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        self.events.append(event)
        if not isinstance(event, TextChunk):
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(getattr(e, "text", "") for e in self.events)

    @property
    def tokens(self) -> int:
        return int(getattr(self.events[-1], "completion_tokens", 0))


# Conch's in-process routes, each a ``load_model`` call: the torch decoder (``lean_*``) in each precision, and
# llama.cpp's kernels behind the same engine (``cpp_*``) in each GGUF type, named by that type.
LEAN_ROUTES: dict[str, dict[str, Any]] = {
    "lean_fp32": {"dtype_setting": "fp32"},  # named, not "auto": auto means bf16 on CUDA
    "lean_bf16": {"dtype_setting": "bf16"},
    "lean_int8": {"quant_setting": "int8"},
    "lean_int4": {"quant_setting": "int4"},
}
CPP_ROUTES: dict[str, str] = {
    "cpp_f16": "f16",  # the default route on a CPU (inference.engine.routes)
    "cpp_f32": "none",
    "cpp_bf16": "bf16",
    "cpp_q8_0": "int8",
    "cpp_q4_1": "int4",
    "cpp_q4_0": "q4_0",
}
CONCH_PREFIXES = ("lean_", "cpp_")


def is_conch(key: str) -> bool:
    return key.startswith(CONCH_PREFIXES)


def short_name(key: str) -> str:
    """A route's name in the tables and in the ``*_differs`` figures: the lean routes by precision alone ("fp32",
    "int4"), as they are the default backend; llama.cpp routes keep their prefix ("cpp_q4_0"); baselines as keyed."""
    return key.removeprefix("lean_")


def llamacpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def default_engine_route() -> str:
    """The engine-part key of the route a service with no INFERENCE_* settings serves first on this machine
    (``inference.engine.routes.plan_routes``): llama.cpp f16 on a CPU, the lean decoder in bf16 on CUDA, the lean
    fp32 decoder where llama-cpp-python is missing."""
    import torch

    if torch.cuda.is_available():
        return "lean_bf16"
    return "cpp_f16" if llamacpp_installed() else "lean_fp32"


def conch_engines(folder: Path) -> dict[str, Engine]:
    """A started Engine per Conch route; the llama.cpp routes only where llama-cpp-python is installed."""
    import torch

    from inference.engine.engine import Engine
    from inference.engine.loader import LlamaCppOptions, load_model

    routes = dict(LEAN_ROUTES)
    if torch.cuda.is_available():
        # The weight-only int8/int4 kernels are CPU routes; on CUDA the engine refuses them.
        print("CUDA: the lean decoder runs fp32 and bf16 on the GPU; int8/int4 are CPU routes and are skipped")
        routes = {key: options for key, options in routes.items() if "quant_setting" not in options}
    models = {key: load_model(MODEL_NAME, folder, **options) for key, options in routes.items()}
    if llamacpp_installed():
        # Exports are cached by folder and type, so only the first run pays for writing and quantising them.
        options = LlamaCppOptions(
            cache_dir=ROOT / "var" / "bench" / "gguf",
            max_sequences=8,
            context_per_sequence=2048,
            threads=torch.get_num_threads(),
            batch_tokens=2048,
        )
        for key, quant in CPP_ROUTES.items():
            models[key] = load_model(
                MODEL_NAME, folder, backend_setting="llamacpp", quant_setting=quant, llamacpp=options
            )
    return {key: Engine(model, max_batch_size=8).start() for key, model in models.items()}


def engine_part(folder: Path, tokens: int, repeats: int) -> dict[str, Any]:
    """Every route measured ``repeats`` times, interleaved (a busy machine slows all of them alike), medians kept."""
    import torch
    from transformers import AutoModelForCausalLM

    from inference.engine.engine import GenerationRequest
    from inference.engine.sampling import SamplingParams

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the baseline runs where Conch runs
    engines = conch_engines(folder)
    libraries: dict[str, Any] = {
        name: AutoModelForCausalLM.from_pretrained(folder, dtype=dtype) for name, dtype in dtypes.items()
    }
    libraries = {name: library.to(device).eval() for name, library in libraries.items()}
    llama = LlamaCpp.open(torch.get_num_threads())
    model = engines["lean_fp32"].model
    encoded = [model.encode_chat([{"role": "user", "content": p}]) for p in PARITY_PROMPTS]

    def run(engine: Engine, ids: list[list[int]], params: SamplingParams) -> tuple[list[TimedSink], float]:
        sinks = [TimedSink() for _ in ids]
        started = time.perf_counter()
        for prompt_ids, sink in zip(ids, sinks, strict=True):
            engine.submit(GenerationRequest(prompt_ids, params, sink))
        for sink in sinks:
            sink.done.wait(600)
        return sinks, started

    fixed = SamplingParams(max_new_tokens=tokens, ignore_eos=True)

    def conch_single(key: str) -> tuple[float, float]:
        (sink,), started = run(engines[key], [encoded[0]], fixed)
        assert sink.first_at is not None
        return (sink.tokens - 1) / (sink.last_at - sink.first_at), sink.first_at - started

    def conch_batch(key: str) -> float:
        sinks, started = run(engines[key], encoded[:8], fixed)
        return sum(s.tokens for s in sinks) / (max(s.last_at for s in sinks) - started)

    def library_single(name: str) -> tuple[float, float]:
        ids = torch.tensor([encoded[0]], device=device)
        started = time.perf_counter()
        libraries[name].generate(ids, max_new_tokens=1, do_sample=False)
        first = time.perf_counter() - started
        started = time.perf_counter()
        libraries[name].generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return (tokens - 1) / (time.perf_counter() - started - first), first

    def library_batch(name: str) -> float:
        batch = model.tokenizer.pad({"input_ids": encoded[:8]}, padding=True, padding_side="left", return_tensors="pt")
        batch = {key: value.to(device) for key, value in batch.items()}
        started = time.perf_counter()
        libraries[name].generate(**batch, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return 8 * tokens / (time.perf_counter() - started)

    for engine in engines.values():  # warm-up: first calls pay one-off allocations
        run(engine, [encoded[0]], SamplingParams(max_new_tokens=4))
    samples: dict[str, list[Any]] = {}
    for _ in range(repeats):
        for name in dtypes:
            samples.setdefault(f"generate_{name}", []).append(library_single(name))
            samples.setdefault(f"generate_{name}_batch8", []).append(library_batch(name))
        for key in engines:
            samples.setdefault(key, []).append(conch_single(key))
            samples.setdefault(f"{key}_batch8", []).append(conch_batch(key))
        if llama:
            samples.setdefault("llamacpp", []).append(llama.single(encoded[0], tokens))
    out: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "llamacpp": bool(llama),
        "default_route": default_engine_route(),
        "prompt_tokens": len(encoded[0]),  # the single-stream prompt, as rendered by the chat template
    }
    for key, values in samples.items():
        if key.endswith("batch8"):
            out[key] = statistics.median(values)
        else:
            out[f"{key}_decode"] = statistics.median(v[0] for v in values)
            out[f"{key}_ttft"] = statistics.median(v[1] for v in values)

    # Greedy answers: Conch fp32 against the library's generate (fp32), every other route against Conch fp32.
    greedy = SamplingParams(max_new_tokens=64)
    answers = {key: [s.text for s in run(engine, encoded, greedy)[0]] for key, engine in engines.items()}
    same = 0
    for index, prompt_ids in enumerate(encoded[:4]):
        generated = libraries["fp32"].generate(
            torch.tensor([prompt_ids], device=device), max_new_tokens=64, do_sample=False
        )
        new = [t for t in generated[0, len(prompt_ids) :].tolist() if t not in model.stop_token_ids]
        same += model.tokenizer.decode(new, skip_special_tokens=True) == answers["lean_fp32"][index]
    out["lean_vs_generate_same"] = (same, 4)
    if llama:
        answers["llamacpp"] = [llama.greedy(ids, 64, model.tokenizer) for ids in encoded]
    for key, theirs in answers.items():
        if key != "lean_fp32":
            differ = sum(a != b for a, b in zip(answers["lean_fp32"], theirs, strict=True))
            out[f"{short_name(key)}_differs"] = (differ, len(PARITY_PROMPTS))
    for engine in engines.values():
        engine.stop()
    return out


# ------------------------------------------------------------------------------------------ servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A uvicorn process; ``env`` is laid over this process's environment, a None value removing the variable."""

    def __init__(self, target: str, env: dict[str, str | None], log: Path, *, factory: bool) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["--log-level", "warning"] + (["--factory"] if factory else [])
        self.log = log
        merged = {**os.environ, **env}
        environ = {key: value for key, value in merged.items() if value is not None}
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=environ, stdout=log.open("ab"), stderr=subprocess.STDOUT)
        self.base = f"http://127.0.0.1:{self.port}"

    def wait(self, path: str, timeout: float = 300.0) -> float:
        started = time.perf_counter()
        while time.perf_counter() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.base + path, timeout=2).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(path)

    def _status_mb(self, field: str) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
        return 0.0

    def peak_rss_mb(self) -> float:
        return self._status_mb("VmHWM:")

    def rss_mb(self) -> float:
        return self._status_mb("VmRSS:")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def concurrently(clients: int, work: Callable[[int], list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], float]:
    """Every client's ``work(index)`` started at once on its own thread; their results and the wall time until the
    last one finished."""
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def run(index: int) -> None:
        start.wait()
        got = work(index)
        with lock:
            results.extend(got)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - started


# ------------------------------------------------------------------------------------------ conch part


def stream_generate(base: str, prompt: str, max_new_tokens: int) -> dict[str, float]:
    body = {"prompt": prompt, "max_new_tokens": max_new_tokens, "ignore_eos": True, "stream": True}
    started = time.perf_counter()
    first = last = 0.0
    tokens = 0
    with httpx.stream("POST", f"{base}/generate", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            now = time.perf_counter()
            if event.get("text") and not first:
                first = now
            last = now
            if "usage" in event:
                tokens = int(event["usage"]["completion_tokens"])
    return {
        "ttft": first - started,
        "latency": last - started,
        "tokens": tokens,
        "decode_seconds": last - first,
        "decode": (tokens - 1) / (last - first) if last > first else 0.0,
    }


def conch_generate(base: str, prompt: str) -> dict[str, Any]:
    """One ``GET /generate`` as the seed's callers send it (the prompt only: the service's default length)."""
    started = time.perf_counter()
    body = httpx.get(f"{base}/generate", params={"prompt": prompt}, timeout=600).json()
    return {
        "prompt": prompt,
        "latency": time.perf_counter() - started,
        "finish_reason": body["finish_reason"],
        "eos": body["finish_reason"] == "stop",
        "tokens": body["usage"]["completion_tokens"],
        "text": body["generate_text"],
    }


def streaming_clients(base: str, clients: int, rounds: int, tokens: int) -> dict[str, Any]:
    """``clients`` clients at once, each streaming ``rounds`` requests of ``tokens`` tokens one after another."""

    def client(index: int) -> list[dict[str, Any]]:
        runs = [stream_generate(base, PROMPTS[(index + r) % len(PROMPTS)], tokens) for r in range(rounds)]
        return [{**run, "client": index} for run in runs]

    streams, wall = concurrently(clients, client)
    # A client's own decode rate: its tokens after the first over the time it spent receiving them.
    per_client = []
    for index in range(clients):
        mine = [r for r in streams if r["client"] == index]
        seconds = sum(r["decode_seconds"] for r in mine)
        per_client.append(sum(r["tokens"] - 1 for r in mine) / seconds if seconds > 0 else 0.0)
    ttft = [r["ttft"] for r in streams]
    latency = [r["latency"] for r in streams]
    return {
        "clients": clients,
        "streams": len(streams),
        "wall": wall,
        "ttft_p50": percentile(ttft, 0.5),
        "ttft_p99": percentile(ttft, 0.99),
        "client_decode_median": statistics.median(per_client),
        "client_decode_p10": percentile(per_client, 0.1),
        "aggregate": sum(r["tokens"] for r in streams) / wall,
        "latency_p50": percentile(latency, 0.5),
        "latency_p99": percentile(latency, 0.99),
    }


def burst_generate(
    base: str, clients: int, prompts: list[str], generate: Callable[[str, str], dict[str, Any]]
) -> dict[str, Any]:
    """``clients`` clients each sending one ``GET /generate`` of a seed prompt at the same moment: the wall time
    until every one is answered, and each answer."""
    answers, wall = concurrently(clients, lambda index: [generate(base, prompts[index % len(prompts)])])
    return {
        "clients": clients,
        "wall": wall,
        "latencies": sorted(round(a["latency"], 2) for a in answers),
        **eos(answers),
    }


def eos(answers: list[dict[str, Any]]) -> dict[str, Any]:
    return {"eos": sum(bool(a["eos"]) for a in answers), "answers": len(answers)}


@dataclass(frozen=True)
class ServiceRoute:
    """One ``--quant`` entry. ``auto``: no INFERENCE_BACKEND / INFERENCE_QUANT / INFERENCE_DTYPE at all (the
    default route chain, what a user meets); ``<quant>`` on the torch backend (``none``: the lean fp32 decoder,
    named explicitly, as leaving it unset would mean the default chain); ``<backend>:<quant>`` such as
    ``llamacpp:q4_0``."""

    name: str
    backend: str | None  # INFERENCE_BACKEND; None: unset
    quant: str | None  # INFERENCE_QUANT
    dtype: str | None  # INFERENCE_DTYPE

    @classmethod
    def parse(cls, text: str, dtype: str) -> ServiceRoute:
        from inference.engine.backends import BACKENDS

        name = text.strip()
        if name == "auto":
            return cls(name, None, None, None)
        backend, _, quant = name.rpartition(":")
        if backend and backend not in BACKENDS:
            raise ValueError(f"--quant route {text!r}: the backend must be one of {', '.join(BACKENDS)}")
        backend, quant = backend or "auto", quant or "none"
        if backend == "auto" and quant == "none" and dtype in ("", "auto"):
            dtype = "fp32"  # "none" is the lean fp32 decoder; with nothing named, the default chain would serve
        # Set explicitly, so an INFERENCE_* in the caller's environment cannot change a named route.
        return cls(name, backend, quant, dtype)

    def env(self) -> dict[str, str | None]:
        return {"INFERENCE_BACKEND": self.backend, "INFERENCE_QUANT": self.quant, "INFERENCE_DTYPE": self.dtype}

    def describe(self) -> str:
        if self.backend is None:
            return "no INFERENCE_BACKEND/QUANT/DTYPE set (the default)"
        return f"INFERENCE_BACKEND={self.backend} INFERENCE_QUANT={self.quant} INFERENCE_DTYPE={self.dtype}"


def served(base: str, model_id: str) -> dict[str, Any]:
    """What ``/readyz`` says serves ``model_id``: route, fidelity (agreement, max_kl, ...), backend, type."""
    body = httpx.get(f"{base}/readyz", timeout=10).json()
    for entry in body.get("models", []):
        if entry["id"] == model_id:
            keys = ("route", "fidelity", "backend", "dtype", "quant", "bytes")
            return {key: entry.get(key) for key in keys} | {"threads": body.get("threads")}
    raise RuntimeError(f"/readyz lists no {model_id}: {body}")


def fresh_copy(folder: Path, target: Path) -> Path:
    """A new folder with ``folder``'s files, as a published fine-tune always is: hard links where the filesystem
    allows (instant, no disk), else a copy. Nothing cached for ``folder`` (a GGUF export) applies to it."""
    try:
        shutil.copytree(folder, target, copy_function=os.link)
    except OSError:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder, target)
    return target


def worker_publish_files(folder: Path) -> dict[str, Any]:
    """What the worker does at publish with the merged model still in memory (``worker.pipeline.serving``):
    ``write_serving_files`` with the default CPU route's export and llama.cpp's quantiser on every core. The model
    is loaded first to stand for the one the worker holds; only the writing is the worker-side figure."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from artifacts import llamacpp
    from artifacts.serving import export_types, write_serving_files
    from worker.pipeline.merge import stop_token_ids

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    loaded = time.perf_counter() - started
    available = llamacpp.available()
    started = time.perf_counter()
    files = write_serving_files(
        folder,
        model=model,
        tokenizer=tokenizer,
        template="auto",
        stop_ids=stop_token_ids(tokenizer, "auto"),
        validation=None,
        file_types=export_types("auto", available),
        quantize=(lambda src, dst, kind: llamacpp.quantize(src, dst, kind, threads=0)) if available else None,
    )
    written = time.perf_counter() - started
    del model
    return {"seconds": written, "parts": files.seconds, "gguf": sorted(files.gguf), "model_load_seconds": loaded}


def conch_part(folder: Path, args: argparse.Namespace, route: ServiceRoute) -> dict[str, Any]:
    from core.db import make_engine
    from core.orm import Base

    data_dir = Path(tempfile.mkdtemp(prefix="conch-bench-"))
    database_url = f"sqlite:///{data_dir / 'conch.db'}"
    db_engine = make_engine(database_url)
    Base.metadata.create_all(db_engine)
    env: dict[str, str | None] = {
        "DATA_DIR": str(data_dir),
        "DATABASE_URL": database_url,
        "REDIS_URL": args.redis,  # empty: the deployment is found by polling only
        "NAMESPACE": f"conch-bench-{uuid.uuid4().hex[:8]}",
        "BROKER_URL": "",
        "BASE_MODELS": json.dumps({MODEL_NAME: str(folder)}),
        "DEFAULT_BASE_MODEL": MODEL_NAME,
        "DEPLOYMENT_POLL_SECONDS": "0.2",
        "LOG_LEVEL": "WARNING",
        **route.env(),
    }
    server = Server("inference.app:create_app", env, data_dir / "conch.log", factory=True)
    seed_prompts = SEED_PROMPTS[: args.prompts or None]
    prompts = PROMPTS[: args.prompts or None]
    out: dict[str, Any] = {"route_setting": route.describe()}
    try:
        out["ready_after"] = server.wait("/readyz")
        out["served"] = served(server.base, MODEL_NAME)
        print(
            f"conch {route.name}: ready after {out['ready_after']:.1f} s, serving {out['served']['route']}",
            flush=True,
        )
        httpx.get(f"{server.base}/generate", params={"prompt": "Hi", "max_new_tokens": 4}, timeout=120)

        # The seed's prompts, one at a time, end to end as its callers send them.
        answers = [conch_generate(server.base, p) for p in seed_prompts]
        out["seed_prompts"] = answers
        out["seed_e2e_median"] = statistics.median(a["latency"] for a in answers)
        out["seed_eos"] = eos(answers)
        # The wider set (cheap on Conch).
        wider = [conch_generate(server.base, p) for p in prompts]
        out["e2e"] = [round(a["latency"], 3) for a in wider]
        out["e2e_median"] = statistics.median(a["latency"] for a in wider)
        out["eos_terminated"] = eos(wider)
        out["answer_tokens"] = statistics.median(a["tokens"] for a in wider)
        out["example"] = answers[-1]["text"]

        single = [stream_generate(server.base, p, args.tokens) for p in prompts[:3]]
        out["ttft"] = statistics.median(r["ttft"] for r in single)
        out["decode"] = statistics.median(r["decode"] for r in single)
        out["concurrency"] = {
            str(n): streaming_clients(server.base, n, args.rounds, args.tokens) for n in args.client_counts
        }
        out["burst"] = burst_generate(server.base, BURST_CLIENTS, seed_prompts, conch_generate)

        out["rss_before_swap_mb"] = server.rss_mb()
        out["swap"] = publish_and_swap(server, folder, data_dir, db_engine, args.redis, str(env["NAMESPACE"]))
        out["peak_rss_mb"] = server.peak_rss_mb()
        out["rss_after_swap_mb"] = server.rss_mb()
        print(
            f"conch {route.name}: the published model answered {out['swap']['seconds']:.2f} s after its announcement",
            flush=True,
        )
    finally:
        server.stop()
    return out


def publish_and_swap(
    server: Server, folder: Path, data_dir: Path, db_engine: Any, redis_url: str, namespace: str
) -> dict[str, Any]:
    """A worker's publish, mimicked: a new folder (the same weights under a new id, as every published fine-tune
    is a new folder), its serving files written, the model and a pending deployment committed and announced; then
    the time from the announcement until the new model answers."""
    from sqlalchemy.orm import Session

    from core.orm import Deployment, ModelRecord

    new_id = f"ft:{MODEL_NAME}:bench:ftjob-{uuid.uuid4().hex[:8]}"
    tuned = fresh_copy(folder, data_dir / f"ft-{uuid.uuid4().hex[:8]}")
    out: dict[str, Any] = {"worker": worker_publish_files(tuned)}
    with Session(db_engine) as session:
        session.add(ModelRecord(id=new_id, base_model=MODEL_NAME, storage_path=str(tuned)))
        session.commit()
        row = Deployment(model_id=new_id, status="pending", requested_by="bench")
        session.add(row)
        session.commit()
        announced = time.perf_counter()
        row_id = row.id
        if redis_url:
            from core.contracts import DeploymentAnnouncement
            from core.pubsub import announce_deployment
            from core.settings import Settings

            announce_deployment(
                DeploymentAnnouncement(deployment_id=str(row.id), model_id=new_id, tenant_id=row.tenant_id),
                Settings(redis_url=redis_url, namespace=namespace),
            )
    while True:
        answer = httpx.get(f"{server.base}/generate", params={"prompt": "Hi", "max_new_tokens": 2}, timeout=60)
        if answer.json().get("model") == new_id:
            break
        if time.perf_counter() - announced > 180:
            raise TimeoutError("the deployment was not served")
        # The old model answers meanwhile. Each poll costs the old model a prompt and a token on every core;
        # polling every 50 ms kept the cores busy and measured 2.8 s where 0.2 s measured about 1.5 s.
        time.sleep(0.2)
    out["seconds"] = time.perf_counter() - announced
    out["via"] = "announced over Redis" if redis_url else "found by polling every 0.2 s"
    with Session(db_engine) as session:
        deployed = session.get(Deployment, row_id)
        out["recorded"] = deployed.latency_seconds if deployed else None
    out["served"] = served(server.base, new_id)
    return out


# ------------------------------------------------------------------------------------------ seed part


def seed_part(folder: Path, requests: int, prompt_cap: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    log = Path(tempfile.mkdtemp(prefix="seed-bench-")) / "seed.log"
    server = Server("bench.seed_app:app", {"SEED_MODEL_DIR": str(folder)}, log, factory=False)
    prompts = SEED_PROMPTS[: prompt_cap or None]
    out: dict[str, Any] = {}

    def seed_generate(base: str, prompt: str) -> dict[str, Any]:
        started = time.perf_counter()
        text = httpx.get(f"{base}/generate", params={"prompt": prompt}, timeout=3600).json()["generate_text"]
        latency = time.perf_counter() - started
        total = len(tokenizer(text)["input_ids"])  # the seed echoes the prompt into its answer
        return {
            "prompt": prompt,
            "latency": latency,
            "tokens": total - len(tokenizer(prompt)["input_ids"]),
            # No finish reason in its answer: it stopped at EOS if it stopped short of max_length=512.
            "eos": total < SEED_MAX_LENGTH,
            "text": text,
        }

    try:
        server.wait("/healthz")
        answers = []
        for prompt in prompts:
            answers.append(seed_generate(server.base, prompt))
            print(f"seed: {prompt!r} answered in {answers[-1]['latency']:.1f} s", flush=True)
        out["seed_prompts"] = answers
        out["e2e_median"] = statistics.median(a["latency"] for a in answers)
        out["seed_eos"] = eos(answers)
        out["tokens"] = statistics.median(a["tokens"] for a in answers)
        out["decode"] = sum(a["tokens"] for a in answers) / sum(a["latency"] for a in answers)
        out["requests"] = requests
        if requests > 1:
            together = burst_generate(server.base, requests, prompts, seed_generate)
            out["together"] = together
            out["serialised"] = together["latencies"]
    finally:
        server.stop()
    out["burst"] = seed_burst(out, BURST_CLIENTS)
    return out


def seed_burst(seed: dict[str, Any], clients: int) -> dict[str, Any]:
    """The seed-style app's wall time for ``clients`` simultaneous ``GET /generate`` of the seed prompts: measured
    when that many were sent together, else the sum of its single-request times for the same prompts (it
    handles one request at a time, so the last answer comes after all of them)."""
    together = seed.get("together")
    if together and together["clients"] >= clients:
        return {"wall": together["wall"], "extrapolated": False}
    latency = {a["prompt"]: a["latency"] for a in seed["seed_prompts"]}
    prompts = [a["prompt"] for a in seed["seed_prompts"]]
    return {"wall": sum(latency[prompts[i % len(prompts)]] for i in range(clients)), "extrapolated": True}


# ------------------------------------------------------------------------------------------ report


ROUTE_NAMES = {
    "generate_fp32": "transformers generate, fp32",
    "generate_bf16": "transformers generate, bf16",
    "llamacpp": "llama.cpp, Q4_1 GGUF (llama-cpp-python)",
    "cpp_f16": "Conch, llama.cpp on the f16 export (the CPU default)",
    "lean_fp32": "Conch lean fp32 (faithful fall-back: generate's greedy tokens)",
    "lean_bf16": "Conch, INFERENCE_DTYPE=bf16",
    "lean_int8": "Conch, INFERENCE_QUANT=int8",
    "lean_int4": "Conch, INFERENCE_QUANT=int4",
    "cpp_f32": "Conch, INFERENCE_BACKEND=llamacpp, f32 (the default's fall-back)",
    "cpp_bf16": "Conch, INFERENCE_BACKEND=llamacpp, INFERENCE_QUANT=bf16",
    "cpp_q8_0": "Conch, INFERENCE_BACKEND=llamacpp, INFERENCE_QUANT=int8 (Q8_0)",
    "cpp_q4_1": "Conch, INFERENCE_BACKEND=llamacpp, INFERENCE_QUANT=int4 (Q4_1)",
    "cpp_q4_0": "Conch, INFERENCE_BACKEND=llamacpp, INFERENCE_QUANT=q4_0",
}


def report_engine(engine: dict[str, Any]) -> None:
    default = engine["default_route"]
    print(
        f"== engine (in process, {engine['threads']} threads for every route, medians of {engine['repeats']} "
        "interleaved runs; decode ratios against transformers generate fp32 and against llama.cpp) =="
    )
    base, base_batch = engine["generate_fp32_decode"], engine["generate_fp32_batch8"]
    llama = engine.get("llamacpp_decode", 0.0)
    print(
        f"{'route':68} {'decode tok/s':>12} {'vs gen':>6} {'vs llama':>8} {'TTFT s':>7} {'batch 8 tok/s':>13} "
        f"{'vs gen':>6} {'answers changed':>15}"
    )
    for key, name in ROUTE_NAMES.items():
        if f"{key}_decode" not in engine:
            continue
        decode = engine[f"{key}_decode"]
        batch = engine.get(f"{key}_batch8", 0.0)
        changed = engine.get(f"{short_name(key)}_differs")
        name = f"* {name}" if key == default else name
        print(
            f"{name:68} {decode:12.1f} {ratio(decode, base):>6} {ratio(decode, llama):>8} "
            f"{engine[f'{key}_ttft']:7.3f} {(f'{batch:.1f}' if batch else '-'):>13} {ratio(batch, base_batch):>6} "
            f"{(f'{changed[0]}/{changed[1]}' if changed else '-'):>15}"
        )
    same, total = engine["lean_vs_generate_same"]
    print(f"* the default route with no INFERENCE_* settings on this machine ({default})")
    print(f"time to first token: a {engine['prompt_tokens']}-token prompt (one short question in the chat template)")
    print(f"greedy answers, Conch fp32 == transformers generate fp32: {same}/{total} prompts")
    print("answers changed: greedy answers (64 tokens) that differ from Conch fp32's on the same prompts")


def fidelity_text(served_entry: dict[str, Any]) -> str:
    fidelity = served_entry.get("fidelity")
    if not fidelity:
        return "no fidelity reported"
    text = f"next-token agreement {fidelity['agreement']:.2%}, max KL {fidelity['max_kl']:.4f}"
    text += f" on {fidelity.get('positions')} positions of {fidelity.get('prompts')} golden prompts"
    if fidelity.get("seconds") is not None:
        text += f" (gate {fidelity['seconds']:.2f} s)"
    fell = fidelity.get("fell_back_from") or []
    if fell:
        text += "; fell back from " + ", ".join(f"{f['route']} ({f['reason']})" for f in fell)
    return text


def label(name: str, conch: dict[str, Any]) -> str:
    """A service run's name in the tables: the route it served, marked when it is the default's."""
    route = str(conch["served"]["route"])
    return f"default {route}" if name == "auto" else route


def report_service(name: str, conch: dict[str, Any]) -> None:
    served_entry = conch["served"]
    print()
    print(f"== Conch service --quant {name}: {conch['route_setting']} ==")
    print(
        f"serving route {served_entry['route']} ({served_entry['backend']} backend, {served_entry['dtype']}, quant "
        f"{served_entry['quant']}), {served_entry['threads']} threads, ready {conch['ready_after']:.1f} s after start"
    )
    print(f"fidelity (/readyz): {fidelity_text(served_entry)}")
    print(
        f"resident memory: {conch['rss_before_swap_mb']:.0f} MB serving one model, "
        f"{conch['rss_after_swap_mb']:.0f} MB holding two after a swap (peak {conch['peak_rss_mb']:.0f} MB)"
    )
    print("GET /generate, the seed's prompts one at a time (default max_new_tokens):")
    for answer in conch["seed_prompts"]:
        print(
            f"  {answer['prompt']!r:24} {answer['latency']:6.2f} s  finish_reason {answer['finish_reason']:7} "
            f"{answer['tokens']:4d} tokens  {json.dumps(answer['text'], ensure_ascii=False)[:80]}"
        )
    done = conch["eos_terminated"]
    print(
        f"GET /generate, seed prompts median {conch['seed_e2e_median']:.2f} s; {done['answers']} other prompts median "
        f"{conch['e2e_median']:.2f} s, {done['eos']}/{done['answers']} ending at EOS, median "
        f"{conch['answer_tokens']:.0f} tokens"
    )
    print(f"one streaming client: time to first token {conch['ttft']:.3f} s, decode {conch['decode']:.1f} tokens/s")
    print(
        f"{'streaming clients':>18} {'streams':>8} {'TTFT p50 s':>10} {'TTFT p99 s':>10} {'client tok/s':>12} "
        f"{'p10':>6} {'aggregate tok/s':>15} {'latency p50 s':>13} {'p99 s':>7}"
    )
    for figures in conch["concurrency"].values():
        print(
            f"{figures['clients']:18d} {figures['streams']:8d} {figures['ttft_p50']:10.3f} {figures['ttft_p99']:10.3f} "
            f"{figures['client_decode_median']:12.1f} {figures['client_decode_p10']:6.1f} "
            f"{figures['aggregate']:15.1f} {figures['latency_p50']:13.2f} {figures['latency_p99']:7.2f}"
        )
    burst = conch["burst"]
    print(
        f"{burst['clients']} clients, one GET /generate each at once: all answered after {burst['wall']:.2f} s "
        f"(latencies {burst['latencies']} s), {burst['eos']}/{burst['answers']} ending at EOS"
    )
    swap = conch["swap"]
    worker = swap["worker"]
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in worker["parts"].items())
    print(
        f"publish: worker-side serving files {worker['seconds']:.2f} s ({parts}; exports {worker['gguf'] or 'none'}; "
        f"before the announcement, not in the swap)"
    )
    print(
        f"announcement -> first answer from the new model: {swap['seconds']:.2f} s (recorded latency_seconds "
        f"{swap['recorded'] if swap['recorded'] is None else round(swap['recorded'], 2)}; {swap['via']}); "
        f"served by {swap['served']['route']}, {fidelity_text(swap['served'])}"
    )


def report_against_seed(services: dict[str, dict[str, Any]], seed: dict[str, Any]) -> None:
    print()
    print(f"== seed-style vs Conch (same model, same prompts {[a['prompt'] for a in seed['seed_prompts']]}) ==")
    burst = seed["burst"]
    mark = " (extrapolated)" if burst["extrapolated"] else ""
    rows: list[tuple[str, float, Callable[[dict[str, Any]], float], bool]] = [
        ("GET /generate end to end, s (median)", seed["e2e_median"], lambda c: c["seed_e2e_median"], True),
        ("time to first token, s", seed["e2e_median"], lambda c: c["ttft"], True),
        ("decode tokens/s, 1 client", seed["decode"], lambda c: c["decode"], False),
        (f"{BURST_CLIENTS} clients at once, all answered, s{mark}", burst["wall"], lambda c: c["burst"]["wall"], True),
    ]
    # A column per route, as wide as its name ("conch default llamacpp:f16").
    names = {r: f"conch {label(r, c)}" for r, c in services.items()}
    widths = {r: max(12, len(names[r])) for r in services}
    header = "".join(f" {names[r]:>{widths[r]}} {'ratio':>7}" for r in services)
    print(f"{'metric':52} {'seed-style':>11}{header}")
    for name, theirs, figure, lower in rows:
        cells = "".join(
            f" {figure(c):{widths[r]}.3f} {ratio(figure(c), theirs, lower_is_better=lower):>7}"
            for r, c in services.items()
        )
        print(f"{name:52} {theirs:11.2f}{cells}")
    ended = seed["seed_eos"]
    cells = "".join(f" {c['seed_eos']['eos']:>{widths[r]}}/{c['seed_eos']['answers']:<7}" for r, c in services.items())
    print(f"{'answers ending at EOS':52} {ended['eos']:>9}/{ended['answers']:<1}{cells}")
    for answer in seed["seed_prompts"]:
        print(
            f"seed {answer['prompt']!r:24} {answer['latency']:6.2f} s {answer['tokens']:4d} tokens "
            f"(EOS: {answer['eos']}) {json.dumps(answer['text'], ensure_ascii=False)[:80]}"
        )
    if seed.get("together"):
        print(
            f"seed latencies when {seed['requests']} requests were sent together: {seed['serialised']} s (serialised)"
        )


def goals(
    engine: dict[str, Any] | None, services: dict[str, dict[str, Any]], seed: dict[str, Any] | None
) -> list[tuple[str, str, str, str, str]]:
    """The performance goals, each as (goal, baseline figure, Conch figure and route, ratio, target); the service
    goals once per ``--quant`` route."""
    rows: list[tuple[str, str, str, str, str]] = []
    if seed:
        ended = seed["seed_eos"]
        for name, c in services.items():
            mine, figure = c["seed_eos"], c["seed_e2e_median"]
            rows.append(
                (
                    f"GET /generate, {len(c['seed_prompts'])} seed prompts, end to end (median)",
                    f"seed {seed['e2e_median']:.2f} s, {ended['eos']}/{ended['answers']} EOS",
                    f"{figure:.2f} s, {mine['eos']}/{mine['answers']} EOS ({label(name, c)})",
                    ratio(figure, seed["e2e_median"], lower_is_better=True),
                    ">= 20x, ends at EOS",
                )
            )
        burst = seed["burst"]
        for name, c in services.items():
            wall = c["burst"]["wall"]
            rows.append(
                (
                    f"{BURST_CLIENTS} concurrent clients end to end (GET /generate)",
                    f"seed {burst['wall']:.1f} s" + (" (extrapolated)" if burst["extrapolated"] else ""),
                    f"{wall:.2f} s ({label(name, c)})",
                    ratio(wall, burst["wall"], lower_is_better=True),
                    ">= 25x",
                )
            )
    if engine:
        default = engine["default_route"]
        decode, first = engine.get(f"{default}_decode"), engine.get(f"{default}_ttft")
        if decode is not None:
            llama = engine.get("llamacpp_decode")
            rows.append(
                (
                    "single-stream decode tokens/s, default route, same threads",
                    f"llama.cpp Q4_1 {llama:.1f}" if llama else "llama.cpp not run",
                    f"{decode:.1f} ({short_name(default)})",
                    ratio(decode, llama) if llama else "-",
                    ">= 1.0x",
                )
            )
        if first is not None:
            theirs = engine["generate_fp32_ttft"]
            rows.append(
                (
                    f"time to first token, {engine['prompt_tokens']}-token prompt, default route",
                    f"generate fp32 {theirs:.3f} s",
                    f"{first:.3f} s ({short_name(default)})",
                    ratio(first, theirs, lower_is_better=True),
                    "<= 0.1 s",
                )
            )
    for name, c in services.items():
        swap = c["swap"]
        rows.append(
            (
                'published model answering after "model ready"',
                f"worker {swap['worker']['seconds']:.1f} s before",
                f"{swap['seconds']:.2f} s ({label(name, c)})",
                "-",
                "<= 2 s",
            )
        )
    for name, c in services.items():
        fidelity = c["served"].get("fidelity") or {}
        agreement = fidelity.get("agreement")
        rows.append(
            (
                "next-token agreement vs fp32 reference (/readyz)",
                "fp32 reference 100%",
                f"{agreement:.2%} ({label(name, c)})" if agreement is not None else f"- ({label(name, c)})",
                "-",
                ">= 99%",
            )
        )
    for name, c in services.items():
        for figures in c["concurrency"].values():
            rows.append(
                (
                    f"p50 / p99 time to first token, {figures['clients']} clients",
                    "-",
                    f"{figures['ttft_p50']:.3f} / {figures['ttft_p99']:.3f} s ({label(name, c)})",
                    "-",
                    "reported",
                )
            )
    for name, c in services.items():
        two = c["rss_after_swap_mb"] / c["rss_before_swap_mb"] if c["rss_before_swap_mb"] else 0.0
        rows.append(
            ("memory holding two models during a swap", "-", f"{two:.2f}x one ({label(name, c)})", "-", "< 2.5x")
        )
    return rows


def report(
    engine: dict[str, Any] | None, services: dict[str, dict[str, Any]], seed: dict[str, Any] | None
) -> list[tuple[str, str, str, str, str]]:
    print()
    if engine:
        report_engine(engine)
    for name, conch in services.items():
        report_service(name, conch)
    if services and seed:
        report_against_seed(services, seed)
    rows = goals(engine, services, seed)
    if rows:
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        print()
        print("== goals ==")
        heads = ("goal", "baseline", "Conch", "ratio", "target")
        print(
            " ".join(f"{h:{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(heads, widths, strict=True)))
        )
        for row in rows:
            print(
                " ".join(
                    f"{c:{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths, strict=True))
                )
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="engine part only")
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--skip-seed", action="store_true")
    parser.add_argument(
        "--seed-requests",
        type=int,
        default=2,
        help="seed-style requests sent together after its single ones (15-60 s each); 8 measures its 8-client "
        "wall time instead of extrapolating it; 1: none",
    )
    parser.add_argument("--tokens", type=int, default=96, help="tokens per fixed-length stream")
    parser.add_argument("--clients", default="8,32", help="comma-separated counts of concurrent streaming clients")
    parser.add_argument("--rounds", type=int, default=2, help="streams per concurrent client")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each engine measurement")
    parser.add_argument(
        "--prompts", type=int, default=0, help="only the first N prompts of each list, for quick checks (0: all)"
    )
    parser.add_argument(
        "--dtype", default="auto", help="INFERENCE_DTYPE of the named service routes (never set for auto)"
    )
    parser.add_argument(
        "--quant",
        default="auto,none",
        help="comma-separated service routes: auto (no INFERENCE_BACKEND/QUANT/DTYPE: the default), <quant> "
        "(INFERENCE_QUANT on the torch backend; none: the lean fp32 decoder) or llamacpp:<quant>",
    )
    parser.add_argument(
        "--redis", default="", help="announce the deployment over this Redis (default: the service polls only)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for every app (0: Conch's default with no training running, every core)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures and the goals table here")
    args = parser.parse_args()
    started = time.perf_counter()
    from inference.engine.device import Threads, auto_threads, configure_threads

    threads = args.threads or auto_threads(training_here=False).prefill
    # The same thread count for the baselines and for Conch in process. The Conch servers run on their own
    # default (INFERENCE_THREADS unset: prompts on every core, decoding on every core but one, which their event
    # loop needs) unless --threads names a count for them too.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if args.threads:
        os.environ["INFERENCE_THREADS"] = str(threads)
    else:
        os.environ.pop("INFERENCE_THREADS", None)
    configure_threads(Threads(threads, threads))

    # Parsed first: a mistyped route should fail before the engine part's minutes, not after.
    routes = {r.strip(): ServiceRoute.parse(r, args.dtype) for r in args.quant.split(",") if r.strip()}
    args.client_counts = [int(n) for n in args.clients.split(",") if n.strip()]
    folder = prepare_default_model()
    engine = None if args.skip_engine else engine_part(folder, args.tokens, args.repeats)
    services: dict[str, dict[str, Any]] = {}
    seed = None
    if not args.quick:
        for name, route in routes.items():
            services[name] = conch_part(folder, args, route)
        if not args.skip_seed:
            seed = seed_part(folder, args.seed_requests, args.prompts)
    rows = report(engine, services, seed)
    print(f"\n{threads} threads for every app; the benchmark took {time.perf_counter() - started:.0f} s")
    if args.json:
        figures = {"engine": engine, "services": services, "seed": seed, "goals": rows, "threads": threads}
        args.json.write_text(json.dumps(figures, indent=1, default=str, ensure_ascii=False))


if __name__ == "__main__":
    main()
