"""INFERENCE_BACKEND=vllm benchmark: Conch in front of vLLM against the same vLLM server called directly, and a
fine-tune served as a LoRA adapter against the base model on that server. Prints figures and ratios; asserts
nothing.

One Conch inference process (uvicorn, SQLite, no Redis) with INFERENCE_BACKEND=vllm serves the default model
(SmolLM2-135M-Instruct) and a fine-tune of it: a random rank-8 PEFT adapter on q/k/v/o (its answers are not the
point, its cost is). Conch starts the vLLM server itself; the bench reads the server's loopback address from the
admin ``/readyz`` and sends the same requests there directly. Every request is ``/v1/completions`` with the same
token ids, temperature 0 and ``--tokens`` new tokens (the figure is completion tokens per second of wall time,
from each answer's usage). Needs .venv-vllm (scripts/vllm_env.sh).

    python -m bench.vllm_bench                       # about 3-5 minutes on 2 cores
    python -m bench.vllm_bench --clients 8 --requests 2 --tokens 32
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.inference_bench import Server  # noqa: E402
from bench.model_prep import MODEL_NAME, prepare_default_model  # noqa: E402

FT_NAME = f"ft:{MODEL_NAME}:bench:ftjob-vllm"
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


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
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(str(folder / "adapter"))
    peft_model.merge_and_unload().save_pretrained(str(folder), safe_serialization=True)
    return folder


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


def publish_and_deploy(database_url: str, base_url: str, name: str) -> dict[str, float]:
    """Write the deployment of a new adapter model as the worker does at success, then time until the service's
    default answers with it, while a client keeps asking (its failed requests are counted)."""
    from sqlalchemy.orm import Session

    from core.db import make_engine
    from core.orm import DEFAULT_TENANT, Deployment

    failures = polls = 0
    with Session(make_engine(database_url)) as session:
        session.add(Deployment(tenant_id=DEFAULT_TENANT, model_id=name, status="pending", requested_by="bench"))
        session.commit()
    started = time.perf_counter()
    with httpx.Client(timeout=120) as client:
        while time.perf_counter() - started < 120:
            polls += 1
            response = client.get(f"{base_url}/generate", params={"prompt": "Hi", "max_new_tokens": 2})
            if response.status_code != 200:
                failures += 1
            elif response.headers.get("x-conch-model") == name:
                return {"seconds": time.perf_counter() - started, "failed": failures, "requests": polls}
            time.sleep(0.05)
    return {"seconds": float("inf"), "failed": failures, "requests": polls}


def run_clients(url: str, model: str, ids: list[int], clients: int, requests: int, tokens: int) -> dict[str, float]:
    body = {"model": model, "prompt": ids, "max_tokens": tokens, "temperature": 0}

    def one_client() -> int:
        done = 0
        with httpx.Client(timeout=600) as client:
            for _ in range(requests):
                response = client.post(f"{url}/v1/completions", json=body)
                response.raise_for_status()
                done += int(response.json()["usage"]["completion_tokens"])
        return done

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        total = sum(pool.map(lambda _: one_client(), range(clients)))
    wall = time.perf_counter() - started
    return {"tokens": total, "seconds": wall, "tokens_per_second": total / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="8", help="concurrent clients, comma-separated (e.g. 8,32)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    base = prepare_default_model()
    data_dir = Path(tempfile.mkdtemp(prefix="conch-vllm-bench-"))
    finetune = make_finetune(base, data_dir / "ft", args.rank)
    database_url = f"sqlite:///{data_dir / 'conch.db'}"
    add_model_row(database_url, finetune)
    ids = list(AutoTokenizer.from_pretrained(str(base))(PROMPT)["input_ids"])
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
        "VLLM_DTYPE": args.dtype,
        "VLLM_MAX_LORA_RANK": str(max(8, args.rank)),
        "LOG_LEVEL": "WARNING",
        "DEPLOYMENT_POLL_SECONDS": "0.5",  # no Redis here: the deployment is found by polling
    }
    server = Server("inference.app:create_app", env, data_dir / "conch.log", factory=True)
    try:
        ready_after = server.wait("/readyz", timeout=600)
        vllm = httpx.get(f"{server.base}/readyz", timeout=10).json()["vllm"][0]
        direct_url = vllm["url"]
        print(f"conch+vllm ready after {ready_after:.1f} s; vLLM server {direct_url} (pid {vllm['pid']})", flush=True)
        run_clients(server.base, FT_NAME, ids, 1, 1, 4)  # loads the adapter (and runs its fidelity gate)
        for entry in httpx.get(f"{server.base}/readyz", timeout=10).json()["models"]:
            gate = entry.get("fidelity") or {}
            print(
                f"fidelity gate {entry['id']} ({entry['route']}): agreement {gate.get('agreement')} "
                f"(threshold {gate.get('threshold')}), max KL {gate.get('max_kl')} (approximate), "
                f"{gate.get('positions')} positions in {gate.get('seconds')} s",
                flush=True,
            )
        # Warm both paths, and load the adapter (its first request loads it on the server).
        run_clients(server.base, MODEL_NAME, ids, 1, 1, 4)
        run_clients(server.base, FT_NAME, ids, 1, 1, 4)
        print(f"{'figure':52} {'tokens/s':>9} {'ratio':>7}")
        for clients in [int(c) for c in args.clients.split(",")]:
            direct = run_clients(direct_url, MODEL_NAME, ids, clients, args.requests, args.tokens)
            conch = run_clients(server.base, MODEL_NAME, ids, clients, args.requests, args.tokens)
            adapter = run_clients(server.base, FT_NAME, ids, clients, args.requests, args.tokens)
            rows = [
                (f"vLLM directly, base, {clients} clients", direct, None),
                (f"through Conch, base, {clients} clients (vs direct)", conch, direct),
                (f"through Conch, adapter, {clients} clients (vs base)", adapter, conch),
            ]
            for label, figure, baseline in rows:
                ratio = f"{figure['tokens_per_second'] / baseline['tokens_per_second']:.2f}x" if baseline else ""
                print(f"{label:52} {figure['tokens_per_second']:9.1f} {ratio:>7}", flush=True)
        second = f"{FT_NAME}-2"
        make_finetune(base, data_dir / "ft-2", args.rank, seed=1)
        add_model_row(database_url, data_dir / "ft-2", second)
        swap = publish_and_deploy(database_url, server.base, second)
        print(
            f"published adapter answering as the default {swap['seconds']:.2f} s after its deployment row "
            f"(polling every 0.5 s), {swap['failed']} failed of {swap['requests']} requests meanwhile"
        )
        adapter_bytes = sum(p.stat().st_size for p in (finetune / "adapter").glob("*.safetensors"))
        model_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        print(
            f"memory per extra fine-tune: adapter {adapter_bytes / 2**20:.1f} MiB vs merged model "
            f"{model_bytes / 2**20:.1f} MiB ({adapter_bytes / model_bytes:.3f}x)"
        )
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
