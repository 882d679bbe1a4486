"""The ``conch`` command line: run the stack, run the demo, and drive the api like any other client."""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cli.client import ApiError, ConchClient

app = typer.Typer(help="Conch: fine-tune open LLMs with LoRA and serve them.", no_args_is_help=True)
models_app = typer.Typer(help="Base and fine-tuned models.", no_args_is_help=True)
files_app = typer.Typer(help="Training files.", no_args_is_help=True)
jobs_app = typer.Typer(help="Fine-tuning jobs.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(files_app, name="files")
app.add_typer(jobs_app, name="jobs")
app.add_typer(keys_app, name="keys")

console = Console()
ApiUrl = Annotated[str | None, typer.Option("--api-url", help="default: API_URL setting")]
InferenceUrl = Annotated[str | None, typer.Option("--inference-url", help="default: INFERENCE_URL setting")]


def _client(api_url: str | None = None, inference_url: str | None = None) -> ConchClient:
    return ConchClient.from_env(api_url, inference_url)


def _print_json(value: Any) -> None:
    console.print_json(json.dumps(value, default=str))


def _fail(exc: Exception) -> None:
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(1)


# ------------------------------------------------------------------------------------------------- services


@app.command()
def migrate() -> None:
    """Apply database migrations (alembic upgrade head)."""
    from cli.migrate import upgrade_head

    upgrade_head()
    console.print("database at head")


@app.command()
def up(
    flower: Annotated[bool, typer.Option(help="also start Flower (basic auth from FLOWER_BASIC_AUTH)")] = False,
    api_port: int = 8000,
    inference_port: int = 8001,
    flower_port: int = 5555,
) -> None:
    """Start api, worker and inference (and Flower) on this machine; Ctrl-C or SIGTERM stops them all."""
    from cli.migrate import upgrade_head
    from cli.stack import Stack, build_children
    from core.settings import get_settings
    from worker.pipeline.prepare import prepare_base_model

    settings = get_settings()
    if flower and not os.environ.get("FLOWER_BASIC_AUTH"):
        console.print("[red]--flower needs FLOWER_BASIC_AUTH=user:password (Flower never runs unauthenticated)[/red]")
        raise typer.Exit(2)
    upgrade_head()
    prepare_base_model(settings.default_base_model, settings)
    log_dir = settings.data_dir / "logs"
    env = {
        **os.environ,
        "API_URL": f"http://127.0.0.1:{api_port}",
        "INFERENCE_URL": f"http://127.0.0.1:{inference_port}",
    }
    stack = Stack(
        build_children(
            log_dir,
            api_port=api_port,
            inference_port=inference_port,
            flower=flower,
            flower_port=flower_port,
            queue=settings.training_queue,
            flower_basic_auth=os.environ.get("FLOWER_BASIC_AUTH"),
        ),
        env,
    )
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        stack.start()
        console.print(
            f"[green]api[/green] http://127.0.0.1:{api_port}   [green]inference[/green] "
            f"http://127.0.0.1:{inference_port}"
            + (f"   [green]flower[/green] http://127.0.0.1:{flower_port}" if flower else "")
        )
        console.print(f"logs in {log_dir}; Ctrl-C to stop")
        while not stopping.wait(1.0):
            # A supervisor: a service that dies (a crash in native code, the OOM killer) is started again; the
            # database and the broker hold every job and deployment, so nothing is lost but the restart time.
            restarted, given_up = stack.restart_dead()
            for description in restarted:
                console.print(f"[yellow]{description} exited; restarted[/yellow]")
            if given_up:
                console.print(f"[red]{'; '.join(given_up)} keeps exiting; stopping[/red]")
                break
    except KeyboardInterrupt:
        pass
    finally:
        console.print("stopping...")
        stack.stop()


@app.command()
def demo(
    prompt: str = "What is your name?",
    dataset: Path = Path("data/persona.jsonl"),
    expect: Annotated[str, typer.Option(help="text the fine-tuned answer must contain")] = "Pearl",
    epochs: int = 3,
) -> None:
    """Fine-tune the default model on the sample dataset through the real services; show /generate before/after."""
    from cli.demo import run_demo

    raise typer.Exit(run_demo(console, prompt=prompt, dataset=dataset, expect=expect, epochs=epochs))


@app.command()
def bench(
    quick: Annotated[bool, typer.Option(help="engine figures and one training pair only")] = False,
) -> None:
    """Run the benchmarks in bench/ (inference and training against their baselines); print one goals table."""
    from cli.benchmarks import run_benchmarks

    raise typer.Exit(run_benchmarks(console, quick=quick))


# ------------------------------------------------------------------------------------------------- models


@models_app.command("prepare")
def models_prepare(name: Annotated[str | None, typer.Argument(help="base model id")] = None) -> None:
    """Convert a base model into a safetensors folder in the model store (once)."""
    from core.settings import get_settings
    from worker.pipeline.prepare import prepare_base_model

    settings = get_settings()
    path = prepare_base_model(name or settings.default_base_model, settings)
    console.print(f"ready: {path}")


@models_app.command("list")
def models_list(api_url: ApiUrl = None) -> None:
    try:
        models = _client(api_url).list_models()
    except (ApiError, OSError) as exc:
        _fail(exc)
    table = Table("id", "kind", "base", "created")
    for m in models:
        extra = m.get("conch") or {}
        table.add_row(m["id"], str(extra.get("kind", "")), str(extra.get("base_model") or ""), str(m.get("created")))
    console.print(table)


@models_app.command("deploy")
def models_deploy(model_id: str, api_url: ApiUrl = None) -> None:
    try:
        _print_json(_client(api_url).deploy(model_id))
    except (ApiError, OSError) as exc:
        _fail(exc)


@models_app.command("rollback")
def models_rollback(model_id: str, api_url: ApiUrl = None) -> None:
    try:
        _print_json(_client(api_url).rollback(model_id))
    except (ApiError, OSError) as exc:
        _fail(exc)


# ------------------------------------------------------------------------------------------------- files, jobs


@files_app.command("upload")
def files_upload(path: Path, api_url: ApiUrl = None) -> None:
    try:
        _print_json(_client(api_url).upload_file(path))
    except ApiError as exc:
        _print_json(exc.body)
        raise typer.Exit(1) from exc
    except OSError as exc:
        _fail(exc)


@files_app.command("download")
def files_download(
    file_id: str,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="default: the file's name, here")] = None,
    api_url: ApiUrl = None,
) -> None:
    """Save a file's content (a dataset, or a job's step_metrics.csv or loss_curve.png)."""
    client = _client(api_url)
    try:
        meta = client._json(client.api.get(f"/v1/files/{file_id}"))
        target = output or Path(Path(str(meta["filename"])).name)
        with client.api.stream("GET", f"/v1/files/{file_id}/content") as response:
            if response.status_code >= 400:
                raise ApiError(response.status_code, response.read().decode(errors="replace"))
            with target.open("wb") as handle:
                for chunk in response.iter_bytes():
                    handle.write(chunk)
    except (ApiError, OSError) as exc:
        _fail(exc)
    console.print(f"{file_id} -> {target}")


def _print_result_files(client: ConchClient, job: dict[str, Any]) -> None:
    """The job's result files, each with how to fetch it."""
    ids = job.get("result_files") or []
    if not ids:
        return
    base = str(client.api.base_url).rstrip("/")
    table = Table("result file", "name", "download")
    for file_id in ids:
        try:
            name = str(client._json(client.api.get(f"/v1/files/{file_id}"))["filename"])
        except ApiError:
            name = "(deleted)"
        table.add_row(file_id, name, f"conch files download {file_id}  |  {base}/v1/files/{file_id}/content")
    console.print(table)


@jobs_app.command("create")
def jobs_create(
    training_file: str,
    model: Annotated[
        str | None,
        typer.Option(
            help="base model id, or a fine-tuned model (ft:...) or checkpoint (ft:...:ckpt-step-N) to continue"
        ),
    ] = None,
    suffix: str | None = None,
    hyperparameters: Annotated[str | None, typer.Option(help="JSON object of hyperparameters")] = None,
    follow: bool = False,
    api_url: ApiUrl = None,
) -> None:
    from core.settings import get_settings

    body: dict[str, Any] = {"model": model or get_settings().default_base_model, "training_file": training_file}
    if suffix:
        body["suffix"] = suffix
    if hyperparameters:
        body["method"] = {"type": "supervised", "supervised": {"hyperparameters": json.loads(hyperparameters)}}
    client = _client(api_url)
    try:
        job = client.create_job(body)
        _print_json(job)
        if follow:
            from cli.follow import follow_job

            _print_result_files(client, follow_job(client, job["id"], console))
    except (ApiError, OSError) as exc:
        _fail(exc)


@jobs_app.command("list")
def jobs_list(limit: int = 20, api_url: ApiUrl = None) -> None:
    try:
        jobs = _client(api_url).list_jobs(limit)["data"]
    except (ApiError, OSError) as exc:
        _fail(exc)
    table = Table("id", "status", "model", "fine_tuned_model")
    for j in jobs:
        table.add_row(j["id"], j["status"], j["model"], j.get("fine_tuned_model") or "")
    console.print(table)


@jobs_app.command("show")
def jobs_show(job_id: str, api_url: ApiUrl = None) -> None:
    client = _client(api_url)
    try:
        job = client.get_job(job_id)
        _print_json(job)
        _print_result_files(client, job)
    except (ApiError, OSError) as exc:
        _fail(exc)


@jobs_app.command("follow")
def jobs_follow(job_id: str, api_url: ApiUrl = None) -> None:
    from cli.follow import follow_job

    client = _client(api_url)
    try:
        job = follow_job(client, job_id, console)
        console.print(f"{job['id']}: {job['status']} {job.get('fine_tuned_model') or ''}")
        _print_result_files(client, job)
    except (ApiError, OSError) as exc:
        _fail(exc)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, api_url: ApiUrl = None) -> None:
    try:
        _print_json(_client(api_url).cancel_job(job_id))
    except (ApiError, OSError) as exc:
        _fail(exc)


@app.command()
def generate(
    prompt: str,
    max_new_tokens: int | None = None,
    model: str | None = None,
    inference_url: InferenceUrl = None,
) -> None:
    """Ask the inference service (GET /generate)."""
    try:
        answer = _client(inference_url=inference_url).generate(prompt, max_new_tokens, model)
    except (ApiError, OSError) as exc:
        _fail(exc)
    console.print(f"[dim]{answer.get('model')}[/dim]\n{answer['generate_text']}")


@keys_app.command("create")
def keys_create(
    tenant: str,
    name: str = "default",
    admin: Annotated[bool, typer.Option(help="may manage keys and read /metrics and the probes' details")] = False,
) -> None:
    """Create an API key for a tenant; the key is shown once and stored only as a hash."""
    from core.api_keys import create_api_key
    from core.db import session_scope

    try:
        with session_scope() as session:
            key = create_api_key(session, tenant, name, admin=admin)
    except ValueError as exc:
        _fail(exc)
    console.print(key)


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="only this tenant's keys")] = None,
    revoked: Annotated[bool, typer.Option("--revoked", help="also list revoked keys")] = False,
) -> None:
    """List API keys: id, tenant, name, visible prefix, admin, created, last used, revoked (never the key)."""
    from core.api_keys import list_api_keys
    from core.db import session_scope

    table = Table("id", "tenant", "name", "prefix", "admin", "created", "last used", "revoked")
    with session_scope() as session:
        for key in list_api_keys(session, tenant_id=tenant, include_revoked=revoked):
            table.add_row(
                str(key.id),
                key.tenant_id,
                key.name,
                key.prefix,
                "yes" if key.is_admin else "",
                _when(key.created_at),
                _when(key.last_used_at),
                _when(key.revoked_at),
            )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="the key's id, or its visible prefix")]) -> None:
    """Revoke an API key (final; the inference service's cache forgets it within seconds)."""
    from core.api_keys import find_api_key, revoke_key
    from core.db import session_scope

    with session_scope() as session:
        found = find_api_key(session, key)
        if len(found) != 1:
            _fail(ValueError(f"{len(found)} keys match {key!r}; give the key's id"))
        revoke_key(session, found[0])
        console.print(f"revoked {found[0].id} ({found[0].prefix}, tenant {found[0].tenant_id})")


def _when(moment: Any) -> str:
    return moment.strftime("%Y-%m-%d %H:%M") if moment is not None else ""


if __name__ == "__main__":
    app()
