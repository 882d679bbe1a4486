"""The main job, end to end on the embedded defaults: prepare the default model, start the real services,
ask a question, fine-tune on the sample persona, wait for the hot-swap, ask again."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from cli.client import ConchClient

ROOT = Path(__file__).resolve().parents[1]
# Only the demo's own database, broker and artifacts are reset; prepared base models are kept between runs.
DEMO_DATA = ROOT / "var" / "demo"
MODEL_STORE = ROOT / "var" / "base-models"
EMBEDDED_OVERRIDES = (
    "DATABASE_URL",
    "BROKER_URL",
    "REDIS_URL",
    "ARTIFACT_ROOT",
    "AUTH_REQUIRED",
    "BASE_MODELS",
    "DEFAULT_BASE_MODEL",
    "TRAINING_QUEUE",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(what: str, check: Any, timeout: float, console: Console, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    with console.status(what):
        while time.monotonic() < deadline:
            result = check()
            if result:
                return result
            time.sleep(interval)
    raise TimeoutError(f"timed out: {what}")


def _ask(client: ConchClient, prompt: str) -> dict[str, Any]:
    response = client.inference.get("/generate", params={"prompt": prompt, "temperature": 0, "max_new_tokens": 64})
    response.raise_for_status()
    return dict(response.json())


def _environment(api_port: int, inference_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in EMBEDDED_OVERRIDES}
    env.update(
        {
            "DATA_DIR": str(DEMO_DATA),
            "MODEL_STORE": str(MODEL_STORE),
            "API_URL": f"http://127.0.0.1:{api_port}",
            "INFERENCE_URL": f"http://127.0.0.1:{inference_port}",
            # Single-tenant on loopback, whatever a .env copied from .env.example (auth on) says.
            "AUTH_REQUIRED": "false",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    return env


def run_demo(console: Console, *, prompt: str, dataset: Path, expect: str, epochs: int) -> int:
    from cli.follow import follow_job
    from cli.migrate import upgrade_head
    from cli.stack import Stack, build_children
    from core.db import reset_engine_cache
    from core.settings import get_settings

    started = time.monotonic()
    api_port, inference_port = _free_port(), _free_port()
    env = _environment(api_port, inference_port)
    shutil.rmtree(DEMO_DATA, ignore_errors=True)
    os.environ.clear()
    os.environ.update(env)
    get_settings.cache_clear()
    reset_engine_cache()
    settings = get_settings()

    console.rule("[bold]Conch demo")
    console.print(
        f"base model [bold]{settings.default_base_model}[/bold], dataset {dataset}, "
        f"embedded defaults in {DEMO_DATA.relative_to(ROOT)}"
    )
    from worker.pipeline.prepare import prepare_base_model

    prepare_base_model(settings.default_base_model, settings)
    upgrade_head()
    stack = Stack(
        build_children(
            DEMO_DATA / "logs",
            api_port=api_port,
            inference_port=inference_port,
            flower=False,
            queue=settings.training_queue,
        ),
        env,
    )
    client = ConchClient(env["API_URL"], env["INFERENCE_URL"])
    try:
        with console.status("starting api, worker and inference"):
            stack.start()
        _wait(
            "loading the base model into the inference service",
            lambda: client.inference.get("/readyz").status_code == 200,
            300,
            console,
        )
        before = _ask(client, prompt)
        console.print(Panel(before["generate_text"], title=f"before: {before.get('model')}", border_style="yellow"))

        uploaded = client.upload_file(ROOT / dataset if not dataset.is_absolute() else dataset)
        console.print(
            f"uploaded {uploaded['id']}: {uploaded.get('num_examples', '?')} examples ({uploaded.get('format', '?')})"
        )
        job = client.create_job(
            {
                "model": settings.default_base_model,
                "training_file": uploaded["id"],
                "suffix": "pearl",
                "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": epochs}}},
            }
        )
        console.print(f"job {job['id']} {job['status']}")
        job = follow_job(client, job["id"], console)
        if job["status"] != "succeeded":
            console.print(Panel(str(job.get("error")), title=f"job {job['status']}", border_style="red"))
            return 1
        model_id = job["fine_tuned_model"]
        published = time.monotonic()
        after = _wait(
            f"waiting for the inference service to swap in {model_id}",
            lambda: (a := _ask(client, prompt)).get("model") == model_id and a,
            120,
            console,
        )
        swap_seconds = time.monotonic() - published
        console.print(Panel(after["generate_text"], title=f"after: {after['model']}", border_style="green"))

        table = Table("", "answer", title=f"GET /generate?prompt={prompt}")
        table.add_row(f"before ({before.get('model')})", before["generate_text"])
        table.add_row(f"after ({after['model']})", after["generate_text"])
        console.print(table)
        metrics = job.get("metrics") or {}
        console.print(
            f"trained tokens {job.get('trained_tokens')}, final loss {metrics.get('train_loss', '?')}, "
            f"serving {swap_seconds:.1f}s after publish, demo took {time.monotonic() - started:.0f}s"
        )
        if expect.lower() in after["generate_text"].lower():
            console.print(f"[bold green]The fine-tuned model answers with the persona ({expect!r}).[/bold green]")
            return 0
        console.print(f"[bold red]The answer after training does not mention {expect!r}.[/bold red]")
        return 1
    finally:
        with console.status("stopping services"):
            stack.stop()
