"""INFERENCE_BACKEND=vllm benchmark: Conch in front of vLLM against the same vLLM server called directly, and a
fine-tune served as a LoRA adapter against the base model on that server. Prints figures and ratios; asserts
nothing.

One Conch inference process (uvicorn, SQLite, no Redis) with INFERENCE_BACKEND=vllm serves the default model
(SmolLM2-135M-Instruct) and fine-tunes of it: random rank-8 PEFT adapters on q/k/v/o (their answers are not the
point, their cost is). Conch starts the vLLM server itself; the bench reads the server's loopback address from the
admin ``/readyz`` and sends the same requests there directly.

The comparisons are paired: every request is ``/v1/completions`` with token ids from the same few prompts (client
``i`` sends prompt ``i mod 4`` on every side), temperature 0, exactly ``--tokens`` new tokens (``ignore_eos``, so
every side does the same work); each round runs the three sides back to back (vLLM directly, the base through
Conch, the adapter through Conch), in reverse order every other round, so noise from the machine hits every side
alike; a ratio is the median over rounds of that round's ratio. Figures are completion tokens per second of wall
time, from each answer's usage. Then a second fine-tune is deployed while clients keep asking (seconds until it
answers, failed requests meanwhile), and a third is loaded to measure the memory one more fine-tune costs (PSS of
the vLLM server's processes and of Conch's) against one more merged model. Needs .venv-vllm (scripts/vllm_env.sh).

    python -m bench.vllm_bench                 # 8 and 32 clients, 3 rounds: about 8-10 minutes on 2 cores
    python -m bench.vllm_bench --quick         # one short round of each, fp32 server: a check that it runs
    python -m bench.vllm_bench --clients 8 --requests 2 --tokens 32 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.inference_bench import Server  # noqa: E402
from bench.machine import cpu_name  # noqa: E402
from bench.model_prep import MODEL_NAME, prepare_default_model  # noqa: E402

FT_NAME = f"ft:{MODEL_NAME}:bench:ftjob-vllm"
PROMPTS = (  # client i sends PROMPTS[i % 4], on every side of a comparison
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright while it moves.",
    "List three things to check before a long drive, and say why each matters.",
    "What is the difference between weather and climate?",
)


def make_finetune(base: Path, folder: Path, rank: int, seed: int = 0) -> Path:
    """As the worker publishes a fine-tune: merged weights with the base's tokenizer files, and the random PEFT
    adapter "trained" on the base in ``adapter/`` (the fidelity gate holds vLLM's adapter answers to the merged
    weights)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True)
    for path in base.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy2(path, folder / path.name)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    peft_model: Any = get_peft_model(model, lora)
    peft_model.save_pretrained(str(folder / "adapter"))
    peft_model.merge_and_unload().save_pretrained(str(folder), safe_serialization=True)
    return folder


def precompute_reference(folder: Path, cache_dir: Path) -> None:
    """The fidelity gate's fp32 reference answers of a published fine-tune, computed here into the service's cache,
    as the worker ships them with the model at publish: the service's loads then cost what they cost in
    production (no reference model built in its process)."""
    from inference.engine.loader import load_model
    from inference.gate import reference_for

    model = load_model(folder.name, folder, template="auto", device_setting="cpu", backend_setting="vllm")
    reference_for(folder, "auto", cache_dir.resolve(), sorted(model.stop_token_ids))


def add_model_row(database_url: str, folder: Path, name: str = FT_NAME) -> None:
    from sqlalchemy.orm import Session

    from core.db import make_engine
    from core.orm import DEFAULT_TENANT, Base, ModelRecord

    engine = make_engine(database_url)
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(
            ModelRecord(
                id=name,
                tenant_id=DEFAULT_TENANT,
                base_model=MODEL_NAME,
                status="ready",
                storage_path=str(folder),
                created_at=datetime.now(UTC),
            )
        )
        session.commit()


def publish_and_deploy(database_url: str, base_url: str, name: str, clients: int = 4) -> dict[str, float]:
    """Write the deployment of a new adapter model as the worker does at a job's success, then time until the
    service's default answers with it, while ``clients`` keep asking (their failed requests are counted)."""
    from sqlalchemy.orm import Session

    from core.db import make_engine
    from core.orm import DEFAULT_TENANT, Deployment

    counts = {"failed": 0, "requests": 0}
    answered: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client_loop() -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                try:
                    response = client.get(f"{base_url}/generate", params={"prompt": "Hi", "max_new_tokens": 2})
                    ok, model = response.status_code == 200, response.headers.get("x-conch-model")
                except httpx.HTTPError:
                    ok, model = False, None
                with lock:
                    counts["requests"] += 1
                    counts["failed"] += 0 if ok else 1
                    if ok and model == name and not answered:
                        answered.append(time.perf_counter())
                        stop.set()
                time.sleep(0.05)

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # the clients are answered by the current model first
    with Session(make_engine(database_url)) as session:
        session.add(Deployment(tenant_id=DEFAULT_TENANT, model_id=name, status="pending", requested_by="bench"))
        session.commit()
    started = time.perf_counter()
    stop.wait(120)
    stop.set()
    for thread in threads:
        thread.join(150)
    seconds = answered[0] - started if answered else float("inf")
    return {"seconds": seconds, "failed": counts["failed"], "requests": counts["requests"], "clients": clients}


def run_clients(url: str, model: str, prompts: list[list[int]], clients: int, requests: int, tokens: int) -> float:
    """Completion tokens per second of wall time: ``clients`` threads, each sending ``requests`` requests of
    exactly ``tokens`` new tokens (client i: prompt i mod len(prompts)), started together."""
    barrier = threading.Barrier(clients + 1)

    def one_client(index: int) -> int:
        body = {
            "model": model,
            "prompt": prompts[index % len(prompts)],
            "max_tokens": tokens,
            "temperature": 0,
            "ignore_eos": True,  # the same work on every side, whatever the weights answer
        }
        done = 0
        with httpx.Client(timeout=600) as client:
            barrier.wait()
            for _ in range(requests):
                response = client.post(f"{url}/v1/completions", json=body)
                if response.status_code != 200:
                    raise RuntimeError(f"{model} at {url}: {response.status_code} {response.text[:500]}")
                done += int(response.json()["usage"]["completion_tokens"])
        return done

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(one_client, i) for i in range(clients)]
        barrier.wait()
        started = time.perf_counter()
        total = sum(future.result() for future in futures)
    return total / (time.perf_counter() - started)


def compare(
    targets: dict[str, tuple[str, str]], prompts: list[list[int]], clients: int, rounds: int, requests: int, tokens: int
) -> dict[str, list[float]]:
    """Tokens/s of every side per round; the sides in order on even rounds, reversed on odd ones."""
    figures: dict[str, list[float]] = {side: [] for side in targets}
    for index in range(rounds):
        order = list(targets) if index % 2 == 0 else list(reversed(targets))
        for side in order:
            url, model = targets[side]
            figures[side].append(run_clients(url, model, prompts, clients, requests, tokens))
    return figures


def paired_ratio(figures: dict[str, list[float]], side: str, baseline: str) -> tuple[float, list[float]]:
    ratios = [a / b for a, b in zip(figures[side], figures[baseline], strict=True)]
    return statistics.median(ratios), ratios


def group_pss_mib(pgid: int) -> float:
    """Proportional set size of every process in process group ``pgid`` (shared pages counted once in all)."""
    total_kib = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            total_kib += process_pss_kib(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return total_kib / 1024


def process_pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="8,32", help="concurrent clients, comma-separated")
    parser.add_argument("--requests", type=int, default=2, help="requests per client per round")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request (exactly: ignore_eos)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per client count (median of paired ratios)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", default=None, help="VLLM_DTYPE (default bfloat16; float32 with --quick)")
    parser.add_argument("--budget-gib", type=int, default=8, help="MODEL_MEMORY_BUDGET_BYTES, in GiB")
    parser.add_argument("--quick", action="store_true", help="1 request of 16 tokens per client, 2 rounds, fp32")
    args = parser.parse_args()
    # A SIGTERM (a timeout, a stopped run) still stops Conch's service, and with it its vLLM server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.requests, args.tokens, args.rounds = 1, 16, 2
    dtype = args.dtype or ("float32" if args.quick else "bfloat16")

    from transformers import AutoTokenizer

    print(f"CPU {cpu_name()}, {os.cpu_count()} cores; VLLM_DTYPE {dtype}", flush=True)
    base = prepare_default_model()
    data_dir = Path(tempfile.mkdtemp(prefix="conch-vllm-bench-"))
    finetune = make_finetune(base, data_dir / "ft", args.rank)
    database_url = f"sqlite:///{data_dir / 'conch.db'}"
    add_model_row(database_url, finetune)
    second, third = f"{FT_NAME}-2", f"{FT_NAME}-3"
    for index, name in ((1, second), (2, third)):
        make_finetune(base, data_dir / f"ft-{index + 1}", args.rank, seed=index)
        add_model_row(database_url, data_dir / f"ft-{index + 1}", name)
    for folder in (finetune, data_dir / "ft-2", data_dir / "ft-3"):
        precompute_reference(folder, data_dir / "gguf")
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    prompts = [list(tokenizer(prompt)["input_ids"]) for prompt in PROMPTS]
    env: dict[str, str | None] = {
        "DATA_DIR": str(data_dir),
        "DATABASE_URL": database_url,
        "REDIS_URL": "",
        "NAMESPACE": f"conch-vllm-bench-{uuid.uuid4().hex[:8]}",
        "BROKER_URL": "",
        "BASE_MODELS": json.dumps({MODEL_NAME: str(base)}),
        "DEFAULT_BASE_MODEL": MODEL_NAME,
        "INFERENCE_BACKEND": "vllm",
        "VLLM_PYTHON": str(ROOT / ".venv-vllm" / "bin" / "python"),
        "VLLM_DTYPE": dtype,
        "VLLM_MAX_LORA_RANK": str(max(8, args.rank)),
        "LOG_LEVEL": "WARNING",
        "DEPLOYMENT_POLL_SECONDS": "0.5",  # no Redis here: the deployment is found by polling
        # Room for the base's server (weights and VLLM_CPU_KVCACHE_GIB) beside the registry's estimate of a
        # fine-tune loaded by name: the bench measures speed, not the memory budget.
        "MODEL_MEMORY_BUDGET_BYTES": str(args.budget_gib * 2**30),
    }
    server = Server("inference.app:create_app", env, data_dir / "conch.log", factory=True)
    try:
        ready_after = server.wait("/readyz", timeout=900)
        vllm = httpx.get(f"{server.base}/readyz", timeout=10).json()["vllm"][0]
        direct_url = vllm["url"]
        print(f"conch+vllm ready after {ready_after:.1f} s; vLLM server {direct_url} (pid {vllm['pid']})", flush=True)
        run_clients(server.base, FT_NAME, prompts, 1, 1, 4)  # loads the adapter (and runs its fidelity gate)
        for entry in httpx.get(f"{server.base}/readyz", timeout=10).json()["models"]:
            gate = entry.get("fidelity") or {}
            print(
                f"fidelity gate {entry['id']} ({entry['route']}): agreement {gate.get('agreement')} "
                f"(threshold {gate.get('threshold')}), max KL {gate.get('max_kl')} (approximate), "
                f"{gate.get('positions')} positions in {gate.get('seconds')} s",
                flush=True,
            )
        targets = {
            "direct": (direct_url, MODEL_NAME),
            "conch": (server.base, MODEL_NAME),
            "adapter": (server.base, FT_NAME),
        }
        counts = [int(c) for c in args.clients.split(",")]
        compare(targets, prompts, max(counts), 1, 1, 4)  # warm every path at the highest concurrency
        print(
            f"{args.rounds} rounds per client count, each side {args.requests} request(s) of {args.tokens} tokens per "
            "client per round, sides alternating order; tokens/s: median over rounds; ratio: median of the rounds' "
            "paired ratios [each round's]",
            flush=True,
        )
        print(f"{'figure':52} {'tokens/s':>9} {'ratio':>7}  target")
        for clients in counts:
            figures = compare(targets, prompts, clients, args.rounds, args.requests, args.tokens)
            over_direct, direct_rounds = paired_ratio(figures, "conch", "direct")
            over_base, base_rounds = paired_ratio(figures, "adapter", "conch")
            rows = [
                (f"vLLM directly, base, {clients} clients", "direct", None, ""),
                (
                    f"through Conch, base, {clients} clients (vs direct)",
                    "conch",
                    (over_direct, direct_rounds),
                    ">= 0.9x",
                ),
                (
                    f"through Conch, adapter, {clients} clients (vs base)",
                    "adapter",
                    (over_base, base_rounds),
                    ">= 0.8x",
                ),
            ]
            for label, side, ratio, target in rows:
                shown = f"{ratio[0]:.2f}x" if ratio else ""
                each = " [" + " ".join(f"{r:.2f}" for r in ratio[1]) + "]" if ratio else ""
                tokens_per_second = statistics.median(figures[side])
                print(f"{label:52} {tokens_per_second:9.1f} {shown:>7}  {target}{each}", flush=True)
        swap = publish_and_deploy(database_url, server.base, second)
        print(
            f"published adapter answering as the default {swap['seconds']:.2f} s after its deployment row "
            f"(polling every 0.5 s, no Redis) (target <= 10 s), {swap['failed']} failed of {swap['requests']} "
            f"requests from {swap['clients']} clients meanwhile (target 0)",
            flush=True,
        )
        # One more fine-tune served: what the vLLM server's processes and Conch's process grow by when it loads
        # (one 1-token request by name, so the KV cache is barely touched), against one more merged model.
        time.sleep(2)
        vllm_before, conch_before = group_pss_mib(int(vllm["pid"])), process_pss_kib(server.proc.pid) / 1024
        run_clients(server.base, third, prompts, 1, 1, 1)
        time.sleep(2)
        vllm_grew = group_pss_mib(int(vllm["pid"])) - vllm_before
        conch_grew = process_pss_kib(server.proc.pid) / 1024 - conch_before
        adapter_bytes = sum(p.stat().st_size for p in (finetune / "adapter").glob("*.safetensors"))
        model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        model_mib, adapter_mib = model_bytes / 2**20, adapter_bytes / 2**20
        print(
            f"memory per extra fine-tune: adapter file {adapter_mib:.1f} MiB vs merged model weights "
            f"{model_mib:.1f} MiB ({adapter_bytes / model_bytes:.3f}x); loading one more grew the vLLM server's "
            f"PSS by {vllm_grew:.1f} MiB and Conch's by {conch_grew:.1f} MiB "
            f"({(vllm_grew + conch_grew) / model_mib:.3f}x the merged weights; a merged model on its own server "
            f"costs that server's whole PSS, {vllm_before:.0f} MiB here)"
        )
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
