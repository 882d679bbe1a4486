"""Inference benchmark: the seed-style app against Conch, same model (SmolLM2-135M-Instruct), same prompts.

Prints figures and ratios, then a goals table; nothing is asserted. Three parts:

1. engine (in process): Conch's torch decoder in fp32, bf16, int8 and int4 (``lean_*``) and, when
   llama-cpp-python is installed (``make bench`` does it), Conch's llama.cpp backend exporting the model as f32,
   bf16, Q8_0, Q4_1 and Q4_0 GGUF (``cpp_*``), against transformers ``generate`` (fp32, bf16) and llama.cpp itself on
   the same model's shipped Q4_1 GGUF: single-stream decode tokens/s, time to first token, a batch of 8, and how
   many greedy answers each route changes against Conch's fp32 (which itself must equal ``generate``'s);
2. conch (a uvicorn process per ``--quant`` route: ``<quant>`` on the torch backend, ``llamacpp:<quant>`` on
   llama.cpp's; default none, int4, llamacpp:bf16 and llamacpp:q4_0): ``GET /generate`` end to end, time to
   first token and decode rate from the SSE stream, 8 concurrent clients, resident memory, and
   publish-to-serving latency of a deployment whose model is a new folder (as every published fine-tune is:
   nothing exported for it yet);
3. seed (a uvicorn process running bench/seed_app.py): a few requests only, as each takes 15-30 s; its 8-client
   figures are extrapolated from its serialised handling unless ``--seed-requests 8``.

Every app gets the same CPU threads (``--threads``; default Conch's own, half the cores).

    python -m bench.inference_bench            # about 10 minutes
    python -m bench.inference_bench --quick    # engine part only
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

# Short prompts as the seed's callers sent them (no chat template on the seed side: some of these make the model
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
        try:
            from llama_cpp import Llama
        except ImportError:
            print("llama-cpp-python is not installed (pip install -e '.[llamacpp]'): no llama.cpp baseline")
            return None
        from bench.model_prep import gguf_file

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
    libraries = {
        name: AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        for name, dtype in dtypes.items()
    }
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
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "repeats": repeats, "llamacpp": bool(llama)}
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
    def __init__(self, target: str, env: dict[str, str], log: Path, *, factory: bool) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(self.port)]
        argv += ["--log-level", "warning"] + (["--factory"] if factory else [])
        self.log = log
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env={**os.environ, **env}, stdout=log.open("ab"), stderr=subprocess.STDOUT
        )
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


def concurrently(clients: int, work: Callable[[int], list[dict[str, float]]]) -> tuple[list[dict[str, float]], float]:
    results: list[dict[str, float]] = []
    lock = threading.Lock()

    def run(index: int) -> None:
        got = work(index)
        with lock:
            results.extend(got)

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
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
        "decode": (tokens - 1) / (last - first) if last > first else 0.0,
    }


@dataclass(frozen=True)
class ServiceRoute:
    """One ``--quant`` entry: ``<quant>`` on the default (torch) backend, or ``<backend>:<quant>`` such as
    ``llamacpp:q4_0``."""

    backend: str  # INFERENCE_BACKEND
    quant: str  # INFERENCE_QUANT

    @classmethod
    def parse(cls, text: str) -> ServiceRoute:
        from inference.engine.loader import BACKENDS

        backend, _, quant = text.strip().rpartition(":")
        if backend and backend not in BACKENDS:
            raise ValueError(f"--quant route {text!r}: the backend must be one of {', '.join(BACKENDS)}")
        # Set explicitly, so an INFERENCE_BACKEND in the caller's environment cannot change a plain route.
        return cls(backend or "auto", quant or "none")


def fresh_copy(folder: Path, target: Path) -> Path:
    """A new folder with ``folder``'s files, as a published fine-tune always is: hard links where the filesystem
    allows (instant, no disk), else a copy. Nothing cached for ``folder`` (a GGUF export) applies to it."""
    try:
        shutil.copytree(folder, target, copy_function=os.link)
    except OSError:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder, target)
    return target


def conch_part(
    folder: Path, tokens: int, clients: int, rounds: int, dtype: str, redis_url: str, route: ServiceRoute
) -> dict[str, Any]:
    from sqlalchemy.orm import Session

    from core.db import make_engine
    from core.models import Base, Deployment, ModelRecord

    data_dir = Path(tempfile.mkdtemp(prefix="conch-bench-"))
    database_url = f"sqlite:///{data_dir / 'conch.db'}"
    db_engine = make_engine(database_url)
    Base.metadata.create_all(db_engine)
    env = {
        "DATA_DIR": str(data_dir),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,  # empty: the deployment is found by polling only
        "NAMESPACE": f"conch-bench-{uuid.uuid4().hex[:8]}",
        "BROKER_URL": "",
        "BASE_MODELS": json.dumps({MODEL_NAME: str(folder)}),
        "DEFAULT_BASE_MODEL": MODEL_NAME,
        "DEPLOYMENT_POLL_SECONDS": "0.2",
        "INFERENCE_DTYPE": dtype,
        "INFERENCE_BACKEND": route.backend,
        "INFERENCE_QUANT": route.quant,
        "LOG_LEVEL": "WARNING",
    }
    server = Server("inference.app:create_app", env, data_dir / "conch.log", factory=True)
    out: dict[str, Any] = {}
    try:
        out["ready_after"] = server.wait("/readyz")
        # What the service says it loaded (auto resolves to a backend; quant names the served type).
        served = httpx.get(f"{server.base}/readyz", timeout=10).json()["models"][0]
        out["served"] = {key: served[key] for key in ("backend", "dtype", "quant")}
        httpx.get(f"{server.base}/generate", params={"prompt": "Hi", "max_new_tokens": 4}, timeout=120)
        e2e, finished, answer_tokens = [], 0, []
        for prompt in PROMPTS:
            started = time.perf_counter()
            body = httpx.get(f"{server.base}/generate", params={"prompt": prompt}, timeout=600).json()
            e2e.append(time.perf_counter() - started)
            finished += body["finish_reason"] == "stop"
            answer_tokens.append(body["usage"]["completion_tokens"])
        out["e2e"] = e2e
        out["e2e_median"] = statistics.median(e2e)
        out["eos_terminated"] = (finished, len(PROMPTS))
        out["answer_tokens"] = statistics.median(answer_tokens)
        out["example"] = httpx.get(f"{server.base}/generate", params={"prompt": PROMPTS[0]}, timeout=600).json()
        single = [stream_generate(server.base, p, tokens) for p in PROMPTS[:3]]
        out["ttft"] = statistics.median(r["ttft"] for r in single)
        out["decode"] = statistics.median(r["decode"] for r in single)

        def client(index: int) -> list[dict[str, float]]:
            return [stream_generate(server.base, PROMPTS[(index + r) % len(PROMPTS)], tokens) for r in range(rounds)]

        many, wall = concurrently(clients, client)
        out["clients"] = clients
        out["aggregate"] = sum(r["tokens"] for r in many) / wall
        out["latency_p50"] = percentile([r["latency"] for r in many], 0.5)
        out["latency_p99"] = percentile([r["latency"] for r in many], 0.99)
        out["ttft_p50_many"] = percentile([r["ttft"] for r in many], 0.5)

        # A deployment of a "fine-tuned" model (the same weights under a new id, in a new folder as every published
        # fine-tune is): publish-to-serving latency, including whatever the backend does per new folder.
        out["rss_before_swap_mb"] = server.rss_mb()
        new_id = f"ft:{MODEL_NAME}:bench:ftjob-{uuid.uuid4().hex[:8]}"
        tuned = fresh_copy(folder, data_dir / "ft-copy")
        with Session(db_engine) as session:
            session.add(ModelRecord(id=new_id, base_model=MODEL_NAME, storage_path=str(tuned)))
            session.commit()
            row = Deployment(model_id=new_id, status="pending", requested_by="bench")
            session.add(row)
            session.commit()
            published = time.perf_counter()
            row_id = row.id
            if redis_url:
                from core.contracts import DeploymentAnnouncement
                from core.pubsub import announce_deployment
                from core.settings import Settings

                announce_deployment(
                    DeploymentAnnouncement(deployment_id=str(row.id), model_id=new_id, tenant_id=row.tenant_id),
                    Settings(redis_url=redis_url, namespace=env["NAMESPACE"]),
                )
        while True:
            answer = httpx.get(f"{server.base}/generate", params={"prompt": "Hi", "max_new_tokens": 2}, timeout=60)
            if answer.json().get("model") == new_id:
                break
            if time.perf_counter() - published > 120:
                raise TimeoutError("the deployment was not served")
        out["swap_seen"] = time.perf_counter() - published
        out["swap_via"] = "announced over Redis" if redis_url else "found by polling every 0.2 s"
        with Session(db_engine) as session:
            deployed = session.get(Deployment, row_id)
            out["swap_recorded"] = deployed.latency_seconds if deployed else None
        out["peak_rss_mb"] = server.peak_rss_mb()
        out["rss_after_swap_mb"] = server.rss_mb()
    finally:
        server.stop()
    return out


# ------------------------------------------------------------------------------------------ seed part


def seed_part(folder: Path, requests: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    log = Path(tempfile.mkdtemp(prefix="seed-bench-")) / "seed.log"
    server = Server("bench.seed_app:app", {"SEED_MODEL_DIR": str(folder)}, log, factory=False)
    out: dict[str, Any] = {}
    try:
        server.wait("/healthz")

        def one(index: int) -> list[dict[str, float]]:
            prompt = PROMPTS[index % len(PROMPTS)]
            started = time.perf_counter()
            text = httpx.get(f"{server.base}/generate", params={"prompt": prompt}, timeout=3600).json()["generate_text"]
            latency = time.perf_counter() - started
            generated = len(tokenizer(text)["input_ids"]) - len(tokenizer(prompt)["input_ids"])
            return [{"latency": latency, "tokens": generated}]

        results, wall = concurrently(requests, one)
        results.sort(key=lambda r: r["latency"])
        fastest = results[0]
        out["requests"] = requests
        out["latency"] = fastest["latency"]  # the one that ran first, alone
        out["tokens"] = statistics.median(r["tokens"] for r in results)
        out["decode"] = fastest["tokens"] / fastest["latency"]
        out["aggregate"] = sum(r["tokens"] for r in results) / wall
        out["serialised"] = [round(r["latency"], 1) for r in results]
        out["example"] = None
    finally:
        server.stop()
    return out


def seed_many(seed: dict[str, Any], clients: int) -> tuple[float, float, bool]:
    """p50/p99 latency of ``clients`` simultaneous requests: measured when that many ran, else from serialisation
    (the k-th request in line waits for the k-1 before it: k x one request)."""
    if seed["requests"] >= clients:
        lat = seed["serialised"]
        return percentile(lat, 0.5), percentile(lat, 0.99), False
    per = seed["latency"]
    lat = [per * k for k in range(1, clients + 1)]
    return percentile(lat, 0.5), percentile(lat, 0.99), True


# ------------------------------------------------------------------------------------------ report


ROUTE_NAMES = {
    "generate_fp32": "transformers generate, fp32",
    "generate_bf16": "transformers generate, bf16",
    "llamacpp": "llama.cpp, Q4_1 GGUF (llama-cpp-python)",
    "lean_fp32": "Conch, fp32 (default: same greedy tokens as generate)",
    "lean_bf16": "Conch, INFERENCE_DTYPE=bf16",
    "lean_int8": "Conch, INFERENCE_QUANT=int8",
    "lean_int4": "Conch, INFERENCE_QUANT=int4",
    "cpp_f32": "Conch, INFERENCE_BACKEND=llamacpp, f32",
    "cpp_bf16": "Conch, INFERENCE_BACKEND=llamacpp, INFERENCE_QUANT=bf16",
    "cpp_q8_0": "Conch, INFERENCE_BACKEND=llamacpp, INFERENCE_QUANT=int8 (Q8_0)",
    "cpp_q4_1": "Conch, INFERENCE_BACKEND=llamacpp, INFERENCE_QUANT=int4 (Q4_1)",
    "cpp_q4_0": "Conch, INFERENCE_BACKEND=llamacpp, INFERENCE_QUANT=q4_0",
}


def report_engine(engine: dict[str, Any]) -> None:
    print(
        f"== engine (in process, torch threads {engine['threads']}, medians of {engine['repeats']} interleaved "
        "runs; decode ratios against transformers generate fp32 and against llama.cpp) =="
    )
    base, base_batch = engine["generate_fp32_decode"], engine["generate_fp32_batch8"]
    llama = engine.get("llamacpp_decode", 0.0)
    print(
        f"{'route':64} {'decode tok/s':>12} {'vs gen':>6} {'vs llama':>8} {'TTFT s':>7} {'batch 8 tok/s':>13} "
        f"{'vs gen':>6} {'answers changed':>15}"
    )
    for key, name in ROUTE_NAMES.items():
        if f"{key}_decode" not in engine:
            continue
        decode = engine[f"{key}_decode"]
        batch = engine.get(f"{key}_batch8", 0.0)
        changed = engine.get(f"{short_name(key)}_differs")
        print(
            f"{name:64} {decode:12.1f} {ratio(decode, base):>6} {ratio(decode, llama):>8} "
            f"{engine[f'{key}_ttft']:7.3f} {(f'{batch:.1f}' if batch else '-'):>13} {ratio(batch, base_batch):>6} "
            f"{(f'{changed[0]}/{changed[1]}' if changed else '-'):>15}"
        )
    same, total = engine["lean_vs_generate_same"]
    print(f"greedy answers, Conch fp32 == transformers generate fp32: {same}/{total} prompts")
    print("answers changed: greedy answers (64 tokens) that differ from Conch fp32's on the same prompts")


def report_service(route: str, conch: dict[str, Any]) -> None:
    parsed = ServiceRoute.parse(route)
    served = conch["served"]
    print()
    print(
        f"== Conch service, INFERENCE_BACKEND={parsed.backend} INFERENCE_QUANT={parsed.quant} (serving: "
        f"{served['backend']} backend, {served['dtype']}, quant {served['quant']}): "
        f"ready {conch['ready_after']:.1f} s after start =="
    )
    print(
        f"resident memory: {conch['rss_before_swap_mb']:.0f} MB serving one model, "
        f"{conch['rss_after_swap_mb']:.0f} MB holding two after a swap (peak {conch['peak_rss_mb']:.0f} MB)"
    )
    done, total = conch["eos_terminated"]
    print(f"GET /generate answers ending at EOS: {done}/{total}, median {conch['answer_tokens']:.0f} tokens")
    print(f"example: {json.dumps(conch['example'])[:300]}")
    print(
        f"GET /generate median {conch['e2e_median']:.2f} s; streamed: time to first token {conch['ttft']:.3f} s, "
        f"decode {conch['decode']:.1f} tokens/s; {conch['clients']} clients: {conch['aggregate']:.1f} tokens/s "
        f"aggregate, p50/p99 latency {conch['latency_p50']:.2f}/{conch['latency_p99']:.2f} s"
    )
    print(
        f"deployment publish -> first answer from the new model: {conch['swap_seen']:.2f} s "
        f"(recorded latency_seconds {conch['swap_recorded']:.2f} s; {conch['swap_via']})"
    )


def report_against_seed(services: dict[str, dict[str, Any]], seed: dict[str, Any]) -> None:
    print()
    print(f"== seed-style vs Conch (same model, same prompts; seed figures from {seed['requests']} requests) ==")
    clients = next(iter(services.values()))["clients"]
    p50_seed, p99_seed, extrapolated = seed_many(seed, clients)
    mark = " (extrapolated)" if extrapolated else ""
    rows: list[tuple[str, float, str, bool]] = [
        ("GET /generate end to end, s (median)", seed["latency"], "e2e_median", True),
        ("time to first token, s", seed["latency"], "ttft", True),
        ("decode tokens/s, 1 client", seed["decode"], "decode", False),
        (f"aggregate tokens/s, {clients} clients", seed["aggregate"], "aggregate", False),
        (f"p50 latency, {clients} clients, s{mark}", p50_seed, "latency_p50", True),
        (f"p99 latency, {clients} clients, s{mark}", p99_seed, "latency_p99", True),
    ]
    # A column per route, as wide as its name ("conch llamacpp:q4_0").
    widths = {r: max(12, len(f"conch {r}")) for r in services}
    header = "".join(f" {'conch ' + r:>{widths[r]}} {'ratio':>7}" for r in services)
    print(f"{'metric':48} {'seed-style':>11}{header}")
    for name, theirs, key, lower in rows:
        cells = "".join(
            f" {c[key]:{widths[r]}.3f} {ratio(c[key], theirs, lower_is_better=lower):>7}" for r, c in services.items()
        )
        print(f"{name:48} {theirs:11.2f}{cells}")
    print(
        f"seed answers: {seed['tokens']:.0f} tokens each (max_length=512, no template); "
        f"its request latencies when sent together: {seed['serialised']} s (serialised)"
    )


def best_conch(engine: dict[str, Any], figure: str, *, lower: bool) -> tuple[str, float]:
    """The Conch route (any backend) with the best ``figure`` ("decode", "ttft") and that figure."""
    keys = [key for key in ROUTE_NAMES if is_conch(key) and f"{key}_{figure}" in engine]
    return (min if lower else max)(((key, engine[f"{key}_{figure}"]) for key in keys), key=lambda item: item[1])


def goals(engine: dict[str, Any] | None, services: dict[str, dict[str, Any]], seed: dict[str, Any] | None) -> list:
    """The performance goals, each as (goal, baseline figure, best Conch figure and route, ratio, target)."""
    rows: list[tuple[str, str, str, str, str]] = []

    def best(key: str, lower: bool) -> tuple[str, float]:
        pick = min if lower else max
        return pick(((r, c[key]) for r, c in services.items()), key=lambda item: item[1])

    if seed and services:
        route, e2e = best("e2e_median", True)
        rows.append(
            (
                "GET /generate end to end",
                f"seed {seed['latency']:.2f} s",
                f"{e2e:.2f} s ({route})",
                ratio(e2e, seed["latency"], lower_is_better=True),
                ">= 20x",
            )
        )
        route, agg = best("aggregate", False)
        rows.append(
            (
                "8-client aggregate tokens/s vs seed",
                f"seed {seed['aggregate']:.1f}",
                f"{agg:.1f} ({route})",
                ratio(agg, seed["aggregate"]),
                ">= 8x",
            )
        )
    if engine and engine.get("llamacpp_decode"):
        llama = engine["llamacpp_decode"]
        fastest, decode = best_conch(engine, "decode", lower=False)
        rows.append(
            (
                "single-stream decode vs llama.cpp",
                f"llama.cpp {llama:.1f}",
                f"{decode:.1f} ({short_name(fastest)})",
                ratio(decode, llama),
                ">= 1.0x",
            )
        )
        # The baseline runs the shipped Q4_1 file: Conch's export in that type isolates the serving overhead.
        if engine.get("cpp_q4_1_decode"):
            same_type = engine["cpp_q4_1_decode"]
            rows.append(
                (
                    "single-stream decode vs llama.cpp, same Q4_1 type",
                    f"llama.cpp {llama:.1f}",
                    f"{same_type:.1f} (cpp_q4_1)",
                    ratio(same_type, llama),
                    ">= 1.0x",
                )
            )
        if services:
            route, agg = best("aggregate", False)
            rows.append(
                (
                    "8-client aggregate vs llama.cpp single stream",
                    f"llama.cpp {llama:.1f}",
                    f"{agg:.1f} ({route})",
                    ratio(agg, llama),
                    ">= 2x",
                )
            )
    if engine:
        ttft = engine["lean_fp32_ttft"]
        fastest, quickest = best_conch(engine, "ttft", lower=True)
        figure = f"{ttft:.3f} s fp32" + ("" if fastest == "lean_fp32" else f"; {quickest:.3f} s {short_name(fastest)}")
        rows.append(("time to first token, 35-token prompt", "-", figure, "-", "<= 0.1 s"))
    for route, c in services.items():
        rows.append(("new model answers after publishing", "-", f"{c['swap_seen']:.2f} s ({route})", "-", "<= 2 s"))
        two = c["rss_after_swap_mb"] / c["rss_before_swap_mb"] if c["rss_before_swap_mb"] else 0.0
        rows.append(("memory holding two models during a swap", "-", f"{two:.2f}x one ({route})", "-", "< 2.5x"))
    return rows


def report(
    engine: dict[str, Any] | None, services: dict[str, dict[str, Any]], seed: dict[str, Any] | None
) -> list[tuple[str, str, str, str, str]]:
    print()
    if engine:
        report_engine(engine)
    for route, conch in services.items():
        report_service(route, conch)
    if services and seed:
        report_against_seed(services, seed)
    rows = goals(engine, services, seed)
    if rows:
        print()
        print("== goals ==")
        print(f"{'goal':50} {'baseline':>18} {'Conch':>34} {'ratio':>7} {'target':>9}")
        for row in rows:
            print(f"{row[0]:50} {row[1]:>18} {row[2]:>34} {row[3]:>7} {row[4]:>9}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="engine part only")
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--skip-seed", action="store_true")
    parser.add_argument("--seed-requests", type=int, default=2, help="seed-style requests sent together (~30 s each)")
    parser.add_argument("--tokens", type=int, default=96, help="tokens per fixed-length stream")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="streams per concurrent client")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each engine measurement")
    parser.add_argument("--dtype", default="auto", help="INFERENCE_DTYPE of the Conch service")
    parser.add_argument(
        "--quant",
        default="none,int4,llamacpp:bf16,llamacpp:q4_0",
        help="comma-separated service routes: <quant> (INFERENCE_QUANT, default backend) or llamacpp:<quant>",
    )
    parser.add_argument(
        "--redis", default="", help="announce the deployment over this Redis (default: the service polls only)"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="CPU threads for every app (0: Conch's default, half the cores)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures and the goals table here")
    args = parser.parse_args()
    from inference.engine.device import auto_threads, configure_threads

    threads = args.threads or auto_threads()
    # The same thread count for the baselines and for Conch, in process and in the servers.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["INFERENCE_THREADS"] = str(threads)
    configure_threads(threads)

    # Parsed first: a mistyped route should fail before the engine part's minutes, not after.
    routes = {r.strip(): ServiceRoute.parse(r) for r in args.quant.split(",") if r.strip()}
    folder = prepare_default_model()
    engine = None if args.skip_engine else engine_part(folder, args.tokens, args.repeats)
    services: dict[str, dict[str, Any]] = {}
    seed = None
    if not args.quick:
        for name, route in routes.items():
            services[name] = conch_part(folder, args.tokens, args.clients, args.rounds, args.dtype, args.redis, route)
        if not args.skip_seed:
            seed = seed_part(folder, args.seed_requests)
    rows = report(engine, services, seed)
    if args.json:
        figures = {"engine": engine, "services": services, "seed": seed, "goals": rows, "threads": threads}
        args.json.write_text(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    main()
